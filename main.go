// Spotify-token-swap keeps a Spotify app's client secret on the server, so
// that the app does not have to ship it. It swaps an authorization code for
// tokens (POST /api/token) and a refresh token for a new access token
// (POST /api/refresh_token) at Spotify's accounts service, and relays
// Spotify's answer unchanged. With ENCRYPTION_SECRET set, the refresh tokens
// it hands out are sealed, so a client never holds Spotify's raw one.
//
// Usage:
//
//	spotify-token-swap [-check | -healthcheck | -version]
//
// Without a flag it serves HTTP until SIGINT or SIGTERM. Settings come from
// the environment and from a .env file in the working directory; README.md
// lists them.
package main

import (
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/joho/godotenv"
)

// version is stamped at build time: go build -ldflags "-X main.version=v1.2.3".
var version string

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// A second signal, during SHUTDOWN_DELAY or the drain, stops at once.
	context.AfterFunc(ctx, stop)
	env, dotenv, err := readEnv(".env", os.Environ())
	if err == nil {
		err = run(ctx, os.Args[1:], env, dotenv, os.Stdout, os.Stderr)
	}
	if errors.Is(err, errNotSet) && dotenv == nil {
		dir, _ := os.Getwd()
		err = fmt.Errorf("%w\n(no .env file in %s, the working directory: settings come from the environment alone)", err, dir)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "spotify-token-swap: %v\n", err)
		if errors.As(err, new(setupError)) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// setupError is a problem the operator must fix before the service can start:
// a bad flag, a missing or invalid setting. main exits with status 2 for it.
type setupError struct{ err error }

func (e setupError) Error() string { return e.err.Error() }
func (e setupError) Unwrap() error { return e.err }

// readEnv returns the environment, environ, over the variables of a .env
// file at path (a variable already set wins), and the file's own, nil where
// there is no file. godotenv's parse errors quote the file's content,
// secrets included, so they are not passed on.
func readEnv(path string, environ []string) (env, dotenv map[string]string, err error) {
	dotenv, err = godotenv.Read(path)
	var pathErr *fs.PathError
	switch {
	case errors.Is(err, fs.ErrNotExist):
		dotenv = nil
	case errors.As(err, &pathErr):
		return nil, nil, setupError{fmt.Errorf("reading %s: %w", path, pathErr.Err)}
	case err != nil:
		return nil, nil, setupError{fmt.Errorf("%s does not parse: check the quoting and the variable names on each line", path)}
	}
	env = map[string]string{}
	maps.Copy(env, dotenv)
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env, dotenv, nil
}

// usage is printed for -h and for a bad flag, before the settings and flags.
const usage = `Usage: spotify-token-swap [-check | -healthcheck | -version]

Without a flag it serves the token swap on $PORT until SIGINT or SIGTERM.
Settings come from the environment and from the file .env in the working
directory (a variable set in the environment wins):

`

// run is the whole program behind main, with what comes from the operating
// system passed in, so that tests can drive it: env is the environment
// over .env, dotenv the .env file's own variables (nil without one).
func run(ctx context.Context, args []string, env, dotenv map[string]string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("spotify-token-swap", flag.ContinueOnError)
	flags.SetOutput(io.Discard) // the usage is printed below, the error by main
	showVersion := flags.Bool("version", false, "print the version and exit")
	check := flags.Bool("check", false, "check the settings and ask Spotify whether it accepts the client ID and secret, then exit")
	healthcheck := flags.Bool("healthcheck", false, "exit 0 if the service on 127.0.0.1:$PORT answers /healthz, 1 if not (for container health checks)")
	err := flags.Parse(args)
	if err == nil && flags.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", flags.Arg(0))
	}
	if err != nil {
		help, out := errors.Is(err, flag.ErrHelp), stderr
		if help {
			out = stdout // asked for: not an error
		}
		fmt.Fprint(out, usage)
		for _, s := range settingsTable() {
			fmt.Fprintf(out, "  %-28s %-29s %s\n", s.name, s.def, s.meaning)
		}
		fmt.Fprint(out, "\nFlags:\n")
		flags.SetOutput(out)
		flags.PrintDefaults()
		if help {
			return nil
		}
		return setupError{err}
	}

	switch {
	case *showVersion:
		fmt.Fprintln(stdout, buildVersion())
		return nil
	case *healthcheck:
		return checkHealth(env)
	}
	cfg, err := loadConfig(env, dotenv)
	if err != nil {
		return setupError{err}
	}
	spotify := newSpotifyClient(cfg.accountsURL, cfg.clientID, cfg.clientSecret, cfg.spotifyTimeout)
	if *check {
		for _, w := range cfg.warnings {
			fmt.Fprintln(stderr, "warning:", w)
		}
		return checkCredentials(ctx, spotify, cfg.accountsURL, stdout)
	}

	logs := &logBuffer{out: stderr}
	defer logs.flush()
	logger := slog.New(slog.NewJSONHandler(logs, nil))
	for _, w := range cfg.warnings {
		logger.Warn(w)
	}
	svc := wire(cfg, logger, spotify)
	srv := newHTTPServer(cfg, svc, logger)
	ln, err := net.Listen("tcp", srv.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	if cfg.metricsAddr != "" {
		mln, err := net.Listen("tcp", cfg.metricsAddr)
		if err != nil {
			ln.Close()
			return fmt.Errorf("listen on METRICS_ADDR: %w", err)
		}
		metrics := newHTTPServer(cfg, svc.metrics.handler(buildVersion()), logger) // its limits too
		go metrics.Serve(svc.guard.limitConnections(mln, true))
		defer metrics.Close()
		logger.Info("serving metrics", "addr", mln.Addr().String())
	}
	logger.Info("listening", "addr", ln.Addr().String(), "version", buildVersion(),
		"accounts_url", cfg.accountsURL, "sealing", cfg.sealer != nil, "cors", len(cfg.corsOrigins) > 0,
		"rate_limit", cmp.Or(env["RATE_LIMIT"], "off"), "trust_proxy", cmp.Or(env["TRUST_PROXY"], "0"),
		"connection_limit", cfg.connectionLimit)
	logs.flush()
	// Lines keep flowing until the very end, through the drain included.
	flushing, stopFlushing := context.WithCancel(context.Background())
	defer stopFlushing()
	go logs.flushEvery(flushing, logFlushInterval)
	return serve(ctx, srv, svc.guard.limitConnections(ln, false), svc, cfg, logger)
}

// wire builds the service's HTTP surface, its guard and its metrics for cfg.
func wire(cfg config, logger *slog.Logger, spotify *spotifyClient) *server {
	m := &metrics{start: time.Now()}
	g := newGuard(logger, m, cfg.trustProxy, cfg.limiter(), cfg.connectionLimit)
	return newServer(logger, g, m, spotify, cfg.sealer, cfg.callbackURLs, cfg.corsOrigins)
}

// logBuffer gathers log lines and writes them in batches: one write per
// request costs about a tenth of the service's throughput. As with nginx's
// buffered access log, a line waits at most logFlushInterval.
type logBuffer struct {
	mu  sync.Mutex
	out io.Writer
	buf []byte
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf)+len(p) > logBufferSize {
		b.flushLocked()
	}
	b.buf = append(b.buf, p...)
	return len(p), nil
}

// flush writes out what is buffered.
func (b *logBuffer) flush() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
}

// flushLocked writes the buffer out and empties it. A failed write loses
// those lines only: unlike bufio's, the error does not stick, so logging
// goes on once the output takes writes again.
func (b *logBuffer) flushLocked() {
	if len(b.buf) > 0 {
		b.out.Write(b.buf)
		b.buf = b.buf[:0]
	}
}

// flushEvery flushes the buffer at every tick until ctx is done.
func (b *logBuffer) flushEvery(ctx context.Context, interval time.Duration) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			b.flush()
		}
	}
}

// newHTTPServer sets the server's limits, so that slow or oversized requests
// cannot tie it up.
func newHTTPServer(cfg config, handler http.Handler, logger *slog.Logger) *http.Server {
	return &http.Server{
		Addr:              ":" + cfg.port,
		Handler:           handler,
		ReadHeaderTimeout: cfg.readHeaderTimeout,
		ReadTimeout:       cfg.readTimeout,
		// The answer to a request read in full may wait for Spotify's.
		WriteTimeout:   cfg.readTimeout + cfg.spotifyTimeout + 5*time.Second,
		IdleTimeout:    cfg.idleTimeout,
		MaxHeaderBytes: maxHeaderBytes,
		ErrorLog:       slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
	}
}

// serve runs srv on ln until ctx is done. Then, for cfg.shutdownDelay, it
// goes on serving while /healthz fails and every answer closes its
// connection, so that load balancers and keep-alive clients move away;
// then it stops accepting and waits up to cfg.shutdownTimeout for the
// requests in flight.
func serve(ctx context.Context, srv *http.Server, ln net.Listener, svc *server, cfg config, logger *slog.Logger) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	svc.stopping.Store(true)
	logger.Info("stopping", "in_flight", svc.metrics.inFlight.Load(), "delay", cfg.shutdownDelay.String())
	if cfg.shutdownDelay > 0 {
		delay := time.NewTimer(cfg.shutdownDelay)
		select {
		case <-delay.C:
		case err := <-errc:
			return fmt.Errorf("serve: %w", err)
		}
		logger.Info("draining", "in_flight", svc.metrics.inFlight.Load(), "grace", cfg.shutdownTimeout.String())
	}
	// A fresh context: ctx is already done, and Shutdown with it would
	// return at once and drop the requests in flight.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), cfg.shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		logger.Warn("stopped before every request had finished", "in_flight", svc.metrics.inFlight.Load(), "error", err.Error())
		return fmt.Errorf("shutdown: %w", err)
	}
	logger.Info("stopped")
	return nil
}

// buildVersion is the version stamped at build time, or else the module's.
func buildVersion() string {
	if version != "" {
		return version
	}
	if info, ok := debug.ReadBuildInfo(); ok && info.Main.Version != "" {
		return info.Main.Version
	}
	return "(devel)"
}

// checkHealth asks the service running on this machine for /healthz.
func checkHealth(env map[string]string) error {
	port := cmp.Or(strings.TrimSpace(env["PORT"]), defaultPort)
	if err := checkPort(port); err != nil {
		return setupError{err}
	}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Get("http://127.0.0.1:" + port + "/healthz")
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: /healthz answered %s", resp.Status)
	}
	return nil
}

// checkCredentials asks Spotify for a client-credentials token, which it
// grants only for a valid client ID and secret.
func checkCredentials(ctx context.Context, spotify *spotifyClient, accountsURL string, stdout io.Writer) error {
	ans, err := spotify.clientCredentials(ctx)
	if err != nil {
		return fmt.Errorf("check: %w", err)
	}
	if ans.status != http.StatusOK {
		code, description := oauthError(ans.body)
		why := cmp.Or(strings.TrimSuffix(code+": "+description, ": "), "the answer is not an OAuth error")
		if code == "invalid_client" {
			why += ": check SPOTIFY_CLIENT_ID and SPOTIFY_CLIENT_SECRET against the app's settings in the Spotify dashboard"
		}
		return fmt.Errorf("check: %s answered %d: %s", accountsURL, ans.status, why)
	}
	fmt.Fprintf(stdout, "ok: credentials accepted by %s\n", accountsURL)
	return nil
}

// setting is one variable the service reads, as -h shows it.
type setting struct{ name, def, meaning string }

// settingsTable lists the variables the service reads, the required ones
// first. README.md's table and .env.example say the same; a test keeps the
// three in agreement.
func settingsTable() []setting {
	return []setting{
		{"SPOTIFY_CLIENT_ID", "required", "the app's client ID, from the Spotify dashboard"},
		{"SPOTIFY_CLIENT_SECRET", "required", "the app's client secret"},
		{"SPOTIFY_CLIENT_CALLBACK_URL", "required", "the redirect URIs registered with Spotify, comma-separated; the first is used when a client sends none (the iOS SDK never does)"},
		{"PORT", defaultPort, "the TCP port to listen on, on all interfaces"},
		{"SPOTIFY_ACCOUNTS_URL", defaultAccountsURL, "the base URL of Spotify's accounts service (for tests and staging)"},
		{"SPOTIFY_TIMEOUT", defaultTimeout.String(), "the limit for one whole call to Spotify"},
		{"ENCRYPTION_SECRET", "off", "seal the refresh tokens handed to apps: secrets of 32+ characters, comma-separated; the first seals, each one opens"},
		{"CORS_ALLOWED_ORIGINS", "off", "origins of web pages allowed to call from a browser, comma-separated, or *"},
		{"RATE_LIMIT", "off", "requests each client address may make to the token endpoints: N/s, N/min or N/h, or off"},
		{"TRUST_PROXY", "0", "where the client address comes from: 0 (the TCP peer), a count of proxies, trusted proxy addresses and ranges, or a header name"},
		{"CONNECTION_LIMIT", strconv.Itoa(defaultConnectionLimit), "connections one client address may hold open at once, or off"},
		{"SHUTDOWN_DELAY", "0s", "after SIGTERM, keep serving this long with /healthz failing, then drain"},
		{"METRICS_ADDR", "off", "host:port of a second listener for GET /metrics (Prometheus)"},
	}
}

const (
	// settingPrefixes start the names that, unknown, are likely typos of a setting.
	settingPrefixes = "SPOTIFY_ CORS_ ENCRYPTION_ RATE_ TRUST_ METRICS_ SHUTDOWN_ CONNECTION_"

	defaultPort            = "8080"
	defaultAccountsURL     = "https://accounts.spotify.com"
	defaultTimeout         = 10 * time.Second
	defaultConnectionLimit = 256 // far above one carrier NAT's users: a swap is one short request an hour
	// maxHeaderBytes caps a request's headers at 16 KiB in all: net/http
	// reads 4 KiB past it.
	maxHeaderBytes   = 16<<10 - 4<<10
	logBufferSize    = 64 << 10
	logFlushInterval = 100 * time.Millisecond
	maxTrustProxy    = 10

	// The placeholders of .env.example, refused so that a copied but
	// unfilled .env fails at start rather than at Spotify.
	placeholderClientID     = "your-spotify-client-id"
	placeholderClientSecret = "your-spotify-client-secret"
	placeholderCallbackURL  = "your-app-scheme://callback"
	placeholderSecret       = "replace-with-a-random-secret-of-at-least-32-characters"
	minSecretLength         = 32
)

// errNotSet marks a required setting that is missing, so that main can say
// where settings are looked for.
var errNotSet = errors.New("not set")

// config is everything the service needs to run, read from the environment.
type config struct {
	// clientID and clientSecret are the Spotify app's credentials.
	clientID, clientSecret string
	// callbackURLs are the redirect URIs registered with Spotify that
	// clients may name; the first is used when a client names none.
	callbackURLs []string
	// port is the TCP port to listen on, on all interfaces.
	port string
	// accountsURL is the base URL of Spotify's accounts service, without a
	// trailing slash; the token endpoint is accountsURL + "/api/token".
	accountsURL string
	// spotifyTimeout limits one whole call to Spotify, body included.
	spotifyTimeout time.Duration
	// sealer seals the refresh tokens handed to clients; nil when
	// ENCRYPTION_SECRET is not set.
	sealer *sealer
	// corsOrigins are the browser origins allowed to call, or just "*".
	corsOrigins []string
	// rateLimit is how many token requests a client address may make at
	// once, earning one back every ratePer/rateLimit; 0 when RATE_LIMIT is off.
	rateLimit int
	ratePer   time.Duration
	// trustProxy says where the client address comes from.
	trustProxy trustProxy
	// connectionLimit caps the connections of one client address; 0 when off.
	connectionLimit int
	// shutdownDelay is how long the service keeps serving after SIGTERM,
	// with /healthz failing, before it drains.
	shutdownDelay time.Duration
	// metricsAddr is the host:port of the /metrics listener, or "" for none.
	metricsAddr string
	// warnings are problems that do not stop the service, such as
	// variables that look like settings but are none.
	warnings []string

	// The server's own limits: fixed, but fields so that tests can shorten them.
	readHeaderTimeout, readTimeout, idleTimeout time.Duration
	// shutdownTimeout bounds the drain: as long as a request may take, its
	// read and its call to Spotify, which may already have consumed a
	// single-use code.
	shutdownTimeout time.Duration
}

// limiter returns a rate limiter for RATE_LIMIT, or nil when it is off.
func (cfg config) limiter() *limiter {
	if cfg.rateLimit == 0 {
		return nil
	}
	return newLimiter(cfg.rateLimit, cfg.ratePer, time.Now)
}

// loadConfig reads and checks every setting in env, the environment over
// dotenv, the .env file's, and reports all problems at once.
func loadConfig(env, dotenv map[string]string) (config, error) {
	var problems []error
	var warnings []string
	problem := func(format string, args ...any) { problems = append(problems, fmt.Errorf(format, args...)) }
	get := func(name string) string {
		v := strings.TrimSpace(env[name])
		switch {
		case len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0]:
			problem("%s is in quotes, which docker's --env-file keeps as part of the value: write it without them", name)
		case strings.Contains(v, " #"):
			problem("%s has a comment after \" #\", which docker's --env-file keeps as part of the value: put the comment on a line of its own", name)
		}
		return v
	}
	// hides reports whether the environment sets name empty while .env
	// gives it a value: the empty one wins.
	hides := func(name string) bool {
		return strings.TrimSpace(env[name]) == "" && strings.TrimSpace(dotenv[name]) != ""
	}
	cfg := config{
		clientID:          get("SPOTIFY_CLIENT_ID"),
		clientSecret:      get("SPOTIFY_CLIENT_SECRET"),
		port:              cmp.Or(get("PORT"), defaultPort),
		metricsAddr:       get("METRICS_ADDR"),
		connectionLimit:   defaultConnectionLimit,
		readHeaderTimeout: 5 * time.Second,
		readTimeout:       10 * time.Second,
		idleTimeout:       60 * time.Second,
	}

	required := func(name, value, placeholder string) {
		switch {
		case hides(name):
			problem("%s is empty in the environment, which hides the value that .env gives it: unset the variable, or set it", name)
		case value == "":
			problem("%s is %w", name, errNotSet)
		case value == placeholder:
			problem("%s is still the placeholder from .env.example", name)
		}
	}
	required("SPOTIFY_CLIENT_ID", cfg.clientID, placeholderClientID)
	required("SPOTIFY_CLIENT_SECRET", cfg.clientSecret, placeholderClientSecret)
	callbacks := get("SPOTIFY_CLIENT_CALLBACK_URL")
	required("SPOTIFY_CLIENT_CALLBACK_URL", callbacks, "")
	for _, u := range splitList(callbacks) {
		switch parsed, err := url.Parse(u); {
		case callbacks == "":
		case u == placeholderCallbackURL:
			problem("SPOTIFY_CLIENT_CALLBACK_URL is still the placeholder from .env.example")
		case err != nil || parsed.Scheme == "":
			problem("SPOTIFY_CLIENT_CALLBACK_URL: %q is not an absolute URL such as myapp://callback", u)
		case parsed.Opaque != "": // localhost:3000/cb is scheme localhost
			problem("SPOTIFY_CLIENT_CALLBACK_URL: %q has no // after %q: write the whole URL, such as http://127.0.0.1:3000/callback or myapp://callback", u, parsed.Scheme+":")
		default:
			if strings.EqualFold(parsed.Hostname(), "localhost") {
				warnings = append(warnings, fmt.Sprintf("SPOTIFY_CLIENT_CALLBACK_URL: %q is on localhost, which Spotify refuses in redirect URIs: register and use 127.0.0.1 or [::1] instead", u))
			}
			cfg.callbackURLs = append(cfg.callbackURLs, u)
		}
	}

	problems = append(problems, checkPort(cfg.port)) // errors.Join drops the nils

	cfg.accountsURL = strings.TrimRight(cmp.Or(get("SPOTIFY_ACCOUNTS_URL"), defaultAccountsURL), "/")
	switch u, err := url.Parse(cfg.accountsURL); {
	case strings.Contains(cfg.accountsURL, "@"): // not quoted: it may hold a password
		problem("SPOTIFY_ACCOUNTS_URL must not hold a user or password: the service sends the client ID and secret itself")
	case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || strings.ContainsAny(cfg.accountsURL, "?#"):
		problem("SPOTIFY_ACCOUNTS_URL: %q is not an http or https base URL such as %s", cfg.accountsURL, defaultAccountsURL)
	case u.Scheme == "http" && !isLoopback(u.Hostname()):
		problem("SPOTIFY_ACCOUNTS_URL: %q is plain http to another machine: the client secret would cross the network in clear; use https", cfg.accountsURL)
	case strings.HasSuffix(u.Path, "/api/token"):
		problem("SPOTIFY_ACCOUNTS_URL: %q is the token endpoint; give the base URL, without /api/token, such as %s", cfg.accountsURL, defaultAccountsURL)
	}

	duration := func(name string, def time.Duration, what string) time.Duration {
		s := get(name)
		if s == "" {
			return def
		}
		d, err := time.ParseDuration(s)
		if err != nil || d < 0 || d == 0 && what == "positive" {
			problem("%s: %q is not a %s duration such as 15s", name, s, what)
		}
		return d
	}
	cfg.spotifyTimeout = duration("SPOTIFY_TIMEOUT", defaultTimeout, "positive")
	cfg.shutdownDelay = duration("SHUTDOWN_DELAY", 0, "non-negative")
	cfg.shutdownTimeout = cfg.readTimeout + cfg.spotifyTimeout + time.Second

	if s := get("ENCRYPTION_SECRET"); s != "" {
		secrets := splitList(s)
		for i, secret := range secrets {
			switch {
			case secret == placeholderSecret:
				problem("ENCRYPTION_SECRET is still the placeholder from .env.example")
			case utf8.RuneCountInString(secret) < minSecretLength:
				problem("ENCRYPTION_SECRET: secret %d of the list has %d characters, it needs at least %d", i+1, utf8.RuneCountInString(secret), minSecretLength)
			}
		}
		var err error
		cfg.sealer, err = newSealer(secrets)
		problems = append(problems, err)
	}

	if s := get("CORS_ALLOWED_ORIGINS"); s != "" {
		cfg.corsOrigins = splitList(s)
		for _, o := range cfg.corsOrigins {
			u, err := url.Parse(o)
			switch {
			case o == "*" && len(cfg.corsOrigins) > 1:
				problem("CORS_ALLOWED_ORIGINS: * allows every origin and must stand alone")
			case o == "*":
			case strings.ContainsFunc(o, func(r rune) bool { return r > unicode.MaxASCII }):
				problem("CORS_ALLOWED_ORIGINS: %q: browsers send a host that is not ASCII in its punycode form (xn--...); write it as the browser's Origin header shows it", o)
			case err == nil && u.Host != "" && strings.HasPrefix(o, u.Scheme+"://"+u.Host+"/"):
				problem("CORS_ALLOWED_ORIGINS: %q has a path, which an origin never has: write %s", o, u.Scheme+"://"+u.Host)
			case err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
				u.Scheme+"://"+u.Host != o || strings.ToLower(o) != o:
				problem("CORS_ALLOWED_ORIGINS: %q is not an origin such as https://app.example.com (lower case, no path, no trailing slash)", o)
			case u.Scheme == "https" && u.Port() == "443" || u.Scheme == "http" && u.Port() == "80":
				problem("CORS_ALLOWED_ORIGINS: %q names the default port, which browsers leave out of Origin: write %s", o, strings.TrimSuffix(o, ":"+u.Port()))
			}
		}
	}

	if s := get("RATE_LIMIT"); s != "" && s != "off" {
		n, per, _ := strings.Cut(s, "/")
		var err error
		cfg.rateLimit, err = strconv.Atoi(n)
		cfg.ratePer = map[string]time.Duration{"s": time.Second, "min": time.Minute, "h": time.Hour}[per]
		if err != nil || cfg.rateLimit <= 0 || cfg.ratePer == 0 {
			problem("RATE_LIMIT: %q is not a rate such as 10/min (N/s, N/min or N/h), nor off", s)
			cfg.rateLimit = 0
		}
	}
	var err error
	cfg.trustProxy, err = parseTrustProxy(cmp.Or(get("TRUST_PROXY"), "0"))
	problems = append(problems, err)
	if s := get("CONNECTION_LIMIT"); s == "off" {
		cfg.connectionLimit = 0
	} else if s != "" {
		if cfg.connectionLimit, err = strconv.Atoi(s); err != nil || cfg.connectionLimit <= 0 {
			problem("CONNECTION_LIMIT: %q is not a number of connections such as %d, nor off", s, defaultConnectionLimit)
		}
	}
	if cfg.metricsAddr != "" {
		switch _, port, err := net.SplitHostPort(cfg.metricsAddr); {
		case err != nil || checkPort(port) != nil:
			problem("METRICS_ADDR: %q is not a host:port such as :9090 or 127.0.0.1:9090", cfg.metricsAddr)
		case port == cfg.port && port != "0":
			problem("METRICS_ADDR: %q is on PORT, which the internet reaches; give /metrics a port of its own", cfg.metricsAddr)
		}
	}

	for _, s := range settingsTable()[3:] {
		if hides(s.name) {
			warnings = append(warnings, fmt.Sprintf("%s is empty in the environment, which hides the value that .env gives it: it is %s; unset the variable to use .env's", s.name, s.def))
		}
	}
	cfg.warnings = append(warnings, lookalikes(env)...)
	if errors.Join(problems...) != nil {
		for _, w := range cfg.warnings {
			problems = append(problems, errors.New(w))
		}
	}
	return cfg, errors.Join(problems...)
}

// parseTrustProxy reads TRUST_PROXY: a number of proxies, a header name, or
// a list of trusted proxy addresses and ranges.
func parseTrustProxy(s string) (trustProxy, error) {
	var t trustProxy
	if n, err := strconv.Atoi(s); err == nil {
		if n < 0 || n > maxTrustProxy {
			return t, fmt.Errorf("TRUST_PROXY: %q is not a number of proxies from 0 to %d", s, maxTrustProxy)
		}
		t.hops = n
		return t, nil
	}
	const headerChars = "-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
	if strings.Contains(s, "-") && strings.Trim(s, headerChars) == "" {
		if strings.EqualFold(s, "X-Forwarded-For") {
			return t, errors.New("TRUST_PROXY: X-Forwarded-For is a list that clients add to: give the number of proxies in front, or their addresses")
		}
		t.header = http.CanonicalHeaderKey(s)
		return t, nil
	}
	for _, item := range splitList(s) {
		p, err := netip.ParsePrefix(item)
		if addr, err2 := netip.ParseAddr(item); err2 == nil {
			p, err = addr.WithZone("").Prefix(addr.BitLen())
		}
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 { // ::ffff:10.0.0.0/104 is 10.0.0.0/8, as peers are seen
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		switch {
		case err != nil:
			return t, fmt.Errorf("TRUST_PROXY: %q is neither a number of proxies from 0 to %d, a header name such as Fly-Client-IP, nor a list of proxy addresses and ranges such as 10.0.0.0/8", s, maxTrustProxy)
		case p.Bits() < 7 || p.Addr().Is4() && p.Bits() < 8: // wider than 10.0.0.0/8 or fc00::/7, the private ranges
			return t, fmt.Errorf("TRUST_PROXY: %s trusts far more than a proxy's addresses (a range wider than 10.0.0.0/8 or fc00::/7): anyone could choose their own; list the proxies' ranges", item)
		}
		t.proxies = append(t.proxies, p.Masked())
	}
	return t, nil
}

// lookalikes warns of each variable that looks like a setting but is none,
// such as SPOTIFY_CLIENT_SECERT or RATELIMIT, naming the closest setting. It
// never shows a value.
func lookalikes(env map[string]string) []string {
	settings := settingsTable()
	var warnings []string
	for name := range env {
		if slices.ContainsFunc(settings, func(s setting) bool { return s.name == name }) {
			continue
		}
		// Closest: the most words in common, then the fewest edits between
		// the words run together, then between the names.
		rank := func(s setting) []int {
			common := 0
			for _, w := range words(name) {
				if slices.Contains(words(s.name), w) {
					common--
				}
			}
			return []int{common, editDistance(strings.Join(words(name), ""), strings.Join(words(s.name), "")), editDistance(name, s.name)}
		}
		closest := slices.MinFunc(settings, func(a, b setting) int { return slices.Compare(rank(a), rank(b)) })
		if rank(closest)[1] == 0 || slices.ContainsFunc(strings.Fields(settingPrefixes), func(p string) bool { return strings.HasPrefix(strings.ToUpper(name), p) }) {
			warnings = append(warnings, fmt.Sprintf("%s is not a setting of this service: a typo of %s?", name, closest.name))
		}
	}
	slices.Sort(warnings)
	return warnings
}

// words are a variable's words as look-alikes compare them: in capitals,
// with this service's words for other services' (CALLBACK URL for REDIRECT
// URI, TRUST PROXY for TRUSTED PROXIES), without the SPOTIFY and CLIENT they
// may put in front.
func words(name string) []string {
	ws := strings.Split(strings.ToUpper(name), "_")
	ours := map[string]string{"REDIRECT": "CALLBACK", "URI": "URL", "TRUSTED": "TRUST", "PROXIES": "PROXY",
		"METRIC": "METRICS", "CONNECTIONS": "CONNECTION"}
	for i, w := range ws {
		ws[i] = cmp.Or(ours[w], w)
	}
	for len(ws) > 1 && (ws[0] == "SPOTIFY" || ws[0] == "CLIENT") {
		ws = ws[1:]
	}
	return ws
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	row := make([]int, len(b)+1)
	for j := range row {
		row[j] = j
	}
	for i := range len(a) {
		diagonal := row[0]
		row[0] = i + 1
		for j := range len(b) {
			substitute := diagonal
			if a[i] != b[j] {
				substitute++
			}
			diagonal = row[j+1]
			row[j+1] = min(row[j+1]+1, row[j]+1, substitute)
		}
	}
	return row[len(b)]
}

// isLoopback reports whether host is this machine.
func isLoopback(host string) bool {
	addr, err := netip.ParseAddr(host)
	return host == "localhost" || err == nil && addr.IsLoopback()
}

// splitList splits a comma-separated setting, trimming spaces around each
// item; an empty item is kept, so that the checks report it.
func splitList(s string) []string {
	items := strings.Split(s, ",")
	for i, item := range items {
		items[i] = strings.TrimSpace(item)
	}
	return items
}

// checkPort checks a TCP port number.
func checkPort(s string) error {
	if n, err := strconv.Atoi(s); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("PORT: %q is not a port number from 0 (any free port) to 65535", s)
	}
	return nil
}
