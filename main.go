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
	"bufio"
	"cmp"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/joho/godotenv"
)

// version is stamped at build time: go build -ldflags "-X main.version=v1.2.3".
var version string

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := loadDotEnv(".env")
	if err == nil {
		err = run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
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

// loadDotEnv copies the settings of a .env file into the environment.
// Variables already set win, and a missing file is no error. godotenv's parse
// errors quote the file's content, secrets included, so they are not passed on.
func loadDotEnv(path string) error {
	err := godotenv.Load(path)
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return setupError{fmt.Errorf("reading %s: %w", path, pathErr.Err)}
	}
	return setupError{fmt.Errorf("%s does not parse: check the quoting and the variable names on each line", path)}
}

// run is the whole program behind main, with what comes from the operating
// system passed in, so that tests can drive it.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("spotify-token-swap", flag.ContinueOnError)
	flags.SetOutput(io.Discard) // the usage is printed below, the error by main
	showVersion := flags.Bool("version", false, "print the version and exit")
	check := flags.Bool("check", false, "check the configuration and ask Spotify whether it accepts the client ID and secret, then exit")
	healthcheck := flags.Bool("healthcheck", false, "exit 0 if the service on 127.0.0.1:$PORT answers /healthz, 1 if not (for container health checks)")
	err := flags.Parse(args)
	if err == nil && flags.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", flags.Arg(0))
	}
	if err != nil {
		flags.SetOutput(stderr)
		flags.Usage()
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return setupError{err}
	}

	switch {
	case *showVersion:
		fmt.Fprintln(stdout, buildVersion())
		return nil
	case *healthcheck:
		return checkHealth(ctx, getenv)
	}
	cfg, err := loadConfig(getenv)
	if err != nil {
		return setupError{err}
	}
	spotify := newSpotifyClient(cfg)
	if *check {
		return checkCredentials(ctx, spotify, cfg.accountsURL, stdout)
	}

	logs := &logBuffer{w: bufio.NewWriterSize(stderr, 64<<10)}
	defer logs.flush()
	logger := slog.New(slog.NewJSONHandler(logs, nil))
	srv := newHTTPServer(cfg, newServer(logger, cfg, spotify), logger)
	ln, err := net.Listen("tcp", srv.Addr)
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	logger.Info("listening", "addr", ln.Addr().String(), "version", buildVersion(),
		"accounts_url", cfg.accountsURL, "sealing", cfg.sealer != nil, "cors", len(cfg.corsOrigins) > 0)
	logs.flush()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go logs.flushEvery(ctx, logFlushInterval)
	return serve(ctx, srv, ln, cfg.shutdownTimeout)
}

// logBuffer gathers log lines and writes them in batches: one write per
// request costs about a tenth of the service's throughput. As with nginx's
// buffered access log, a line waits at most logFlushInterval.
type logBuffer struct {
	mu sync.Mutex
	w  *bufio.Writer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.w.Write(p)
}

// flush writes out what is buffered. A log that cannot be written is not
// worth stopping for, so the error is dropped.
func (b *logBuffer) flush() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.w.Flush()
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

// serve runs srv on ln until ctx is done, then stops accepting connections
// and waits up to grace for the requests in flight.
func serve(ctx context.Context, srv *http.Server, ln net.Listener, grace time.Duration) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serve: %w", err)
	case <-ctx.Done():
	}
	// A fresh context: ctx is already done, and Shutdown with it would
	// return at once and drop the requests in flight.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
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
func checkHealth(ctx context.Context, getenv func(string) string) error {
	port := cmp.Or(getenv("PORT"), defaultPort)
	if err := checkPort(port); err != nil {
		return setupError{err}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1:"+port+"/healthz", nil)
	if err != nil {
		return fmt.Errorf("healthcheck: %w", err)
	}
	resp, err := (&http.Client{Timeout: 2 * time.Second}).Do(req)
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
		return fmt.Errorf("check: %s answered %d: %s", accountsURL, ans.status, describeError(ans.body))
	}
	fmt.Fprintf(stdout, "ok: credentials accepted by %s\n", accountsURL)
	return nil
}

const (
	defaultPort        = "8080"
	defaultAccountsURL = "https://accounts.spotify.com"
	defaultTimeout     = 10 * time.Second
	maxHeaderBytes     = 64 << 10
	logFlushInterval   = 100 * time.Millisecond

	// The placeholders of .env.example, refused so that a copied but
	// unfilled .env fails at start rather than at Spotify.
	placeholderClientID     = "your-spotify-client-id"
	placeholderClientSecret = "your-spotify-client-secret"
	placeholderCallbackURL  = "your-app-scheme://callback"
	placeholderSecret       = "replace-with-a-random-secret-of-at-least-32-characters"
	minSecretLength         = 32
)

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

	// The server's own limits: fixed, but fields so that tests can shorten them.
	readHeaderTimeout, readTimeout, idleTimeout, shutdownTimeout time.Duration
}

// loadConfig reads and checks every setting, and reports all problems at once.
func loadConfig(getenv func(string) string) (config, error) {
	cfg := config{
		clientID:          strings.TrimSpace(getenv("SPOTIFY_CLIENT_ID")),
		clientSecret:      strings.TrimSpace(getenv("SPOTIFY_CLIENT_SECRET")),
		port:              cmp.Or(strings.TrimSpace(getenv("PORT")), defaultPort),
		readHeaderTimeout: 5 * time.Second,
		readTimeout:       10 * time.Second,
		idleTimeout:       60 * time.Second,
		shutdownTimeout:   10 * time.Second,
	}
	var problems []error
	problem := func(format string, args ...any) { problems = append(problems, fmt.Errorf(format, args...)) }

	required := func(name, value, placeholder string) {
		switch value {
		case "":
			problem("%s is not set", name)
		case placeholder:
			problem("%s is still the placeholder from .env.example", name)
		}
	}
	required("SPOTIFY_CLIENT_ID", cfg.clientID, placeholderClientID)
	required("SPOTIFY_CLIENT_SECRET", cfg.clientSecret, placeholderClientSecret)

	if callbacks := getenv("SPOTIFY_CLIENT_CALLBACK_URL"); strings.TrimSpace(callbacks) == "" {
		problem("SPOTIFY_CLIENT_CALLBACK_URL is not set")
	} else {
		for _, u := range splitList(callbacks) {
			switch parsed, err := url.Parse(u); {
			case u == placeholderCallbackURL:
				problem("SPOTIFY_CLIENT_CALLBACK_URL is still the placeholder from .env.example")
			case err != nil || parsed.Scheme == "":
				problem("SPOTIFY_CLIENT_CALLBACK_URL: %q is not an absolute URL such as myapp://callback", u)
			default:
				cfg.callbackURLs = append(cfg.callbackURLs, u)
			}
		}
	}

	if err := checkPort(cfg.port); err != nil {
		problems = append(problems, err)
	}

	cfg.accountsURL = strings.TrimRight(cmp.Or(strings.TrimSpace(getenv("SPOTIFY_ACCOUNTS_URL")), defaultAccountsURL), "/")
	if u, err := url.Parse(cfg.accountsURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" {
		problem("SPOTIFY_ACCOUNTS_URL: %q is not an http or https base URL such as %s", cfg.accountsURL, defaultAccountsURL)
	}

	cfg.spotifyTimeout = defaultTimeout
	if s := strings.TrimSpace(getenv("SPOTIFY_TIMEOUT")); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			problem("SPOTIFY_TIMEOUT: %q is not a positive duration such as 10s", s)
		}
		cfg.spotifyTimeout = d
	}

	if s := getenv("ENCRYPTION_SECRET"); strings.TrimSpace(s) != "" {
		secrets := splitList(s)
		for i, secret := range secrets {
			switch {
			case secret == placeholderSecret:
				problem("ENCRYPTION_SECRET is still the placeholder from .env.example")
			case len(secret) < minSecretLength:
				problem("ENCRYPTION_SECRET: secret %d of the list has %d characters, it needs at least %d", i+1, len(secret), minSecretLength)
			}
		}
		var err error
		if cfg.sealer, err = newSealer(secrets); err != nil {
			problems = append(problems, err)
		}
	}

	if s := getenv("CORS_ALLOWED_ORIGINS"); strings.TrimSpace(s) != "" {
		cfg.corsOrigins = splitList(s)
		for _, o := range cfg.corsOrigins {
			if o == "*" {
				if len(cfg.corsOrigins) > 1 {
					problem("CORS_ALLOWED_ORIGINS: * allows every origin and must stand alone")
				}
				continue
			}
			if u, err := url.Parse(o); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" ||
				u.Scheme+"://"+u.Host != o || strings.ToLower(o) != o {
				problem("CORS_ALLOWED_ORIGINS: %q is not an origin such as https://app.example.com (lower case, no path, no trailing slash)", o)
			}
		}
	}
	return cfg, errors.Join(problems...)
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
