package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/joho/godotenv"
)

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig(testEnv("http://127.0.0.1:9/", map[string]string{
		"PORT":                 "9090",
		"SPOTIFY_TIMEOUT":      "3s",
		"ENCRYPTION_SECRET":    testSecret + ", " + testSecret + "-old",
		"CORS_ALLOWED_ORIGINS": "https://app.example.com, http://localhost:5173",
	}))
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if cfg.clientID != testClientID || cfg.clientSecret != testClientSecret || cfg.port != "9090" ||
		cfg.accountsURL != "http://127.0.0.1:9" || cfg.spotifyTimeout != 3*time.Second ||
		strings.Join(cfg.callbackURLs, " ") != testCallback+" "+testWebCallback ||
		strings.Join(cfg.corsOrigins, " ") != "https://app.example.com http://localhost:5173" ||
		cfg.sealer == nil || len(cfg.sealer.aeads) != 2 {
		t.Errorf("loadConfig = %+v", cfg)
	}

	cfg, err = loadConfig(map[string]string{"SPOTIFY_CLIENT_ID": "id", "SPOTIFY_CLIENT_SECRET": "secret", "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://cb"})
	if err != nil {
		t.Fatalf("loadConfig with defaults: %v", err)
	}
	if cfg.port != "8080" || cfg.accountsURL != "https://accounts.spotify.com" || cfg.spotifyTimeout != 10*time.Second ||
		cfg.sealer != nil || cfg.corsOrigins != nil ||
		cfg.readHeaderTimeout != 5*time.Second || cfg.readTimeout != 10*time.Second || cfg.idleTimeout != 60*time.Second {
		t.Errorf("loadConfig defaults = %+v", cfg)
	}
}

// TestLoadConfigProblems checks that each bad setting is named, and that all
// problems come in one error.
func TestLoadConfigProblems(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  map[string]string
		want []string // each must appear in the error
	}{
		{"client ID missing", map[string]string{"SPOTIFY_CLIENT_ID": ""}, []string{"SPOTIFY_CLIENT_ID is not set"}},
		{"client ID blank", map[string]string{"SPOTIFY_CLIENT_ID": "  "}, []string{"SPOTIFY_CLIENT_ID is not set"}},
		{"client secret missing", map[string]string{"SPOTIFY_CLIENT_SECRET": ""}, []string{"SPOTIFY_CLIENT_SECRET is not set"}},
		{"callback missing", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": ""}, []string{"SPOTIFY_CLIENT_CALLBACK_URL is not set"}},
		{"all three missing", map[string]string{"SPOTIFY_CLIENT_ID": "", "SPOTIFY_CLIENT_SECRET": "", "SPOTIFY_CLIENT_CALLBACK_URL": ""},
			[]string{"SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "SPOTIFY_CLIENT_CALLBACK_URL"}},
		{"client ID placeholder", map[string]string{"SPOTIFY_CLIENT_ID": placeholderClientID}, []string{"SPOTIFY_CLIENT_ID is still the placeholder"}},
		{"client secret placeholder", map[string]string{"SPOTIFY_CLIENT_SECRET": placeholderClientSecret}, []string{"SPOTIFY_CLIENT_SECRET is still the placeholder"}},
		{"callback placeholder", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": placeholderCallbackURL}, []string{"SPOTIFY_CLIENT_CALLBACK_URL is still the placeholder"}},
		{"callback not a URL", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": "callback"}, []string{`SPOTIFY_CLIENT_CALLBACK_URL: "callback"`}},
		{"callback list with an empty item", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": "myapp://cb,"}, []string{`SPOTIFY_CLIENT_CALLBACK_URL: ""`}},
		{"port not a number", map[string]string{"PORT": "http"}, []string{`PORT: "http"`}},
		{"port too large", map[string]string{"PORT": "65536"}, []string{`PORT: "65536"`}},
		{"port negative", map[string]string{"PORT": "-1"}, []string{`PORT: "-1"`}},
		{"accounts URL not http", map[string]string{"SPOTIFY_ACCOUNTS_URL": "ftp://accounts.spotify.com"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"accounts URL without host", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"accounts URL with query", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://accounts.spotify.com/?x=1"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"timeout without unit", map[string]string{"SPOTIFY_TIMEOUT": "10"}, []string{`SPOTIFY_TIMEOUT: "10"`}},
		{"timeout zero", map[string]string{"SPOTIFY_TIMEOUT": "0s"}, []string{`SPOTIFY_TIMEOUT: "0s"`}},
		{"timeout negative", map[string]string{"SPOTIFY_TIMEOUT": "-1s"}, []string{`SPOTIFY_TIMEOUT: "-1s"`}},
		{"secret placeholder", map[string]string{"ENCRYPTION_SECRET": placeholderSecret}, []string{"ENCRYPTION_SECRET is still the placeholder"}},
		{"secret short", map[string]string{"ENCRYPTION_SECRET": strings.Repeat("s", 31)}, []string{"ENCRYPTION_SECRET: secret 1 of the list has 31 characters"}},
		{"second secret short", map[string]string{"ENCRYPTION_SECRET": testSecret + ",short"}, []string{"ENCRYPTION_SECRET: secret 2 of the list has 5 characters"}},
		{"origin with path", map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com/"}, []string{`CORS_ALLOWED_ORIGINS: "https://app.example.com/"`}},
		{"origin without scheme", map[string]string{"CORS_ALLOWED_ORIGINS": "app.example.com"}, []string{`CORS_ALLOWED_ORIGINS: "app.example.com"`}},
		{"origin in capitals", map[string]string{"CORS_ALLOWED_ORIGINS": "https://App.example.com"}, []string{`CORS_ALLOWED_ORIGINS: "https://App.example.com"`}},
		{"star among origins", map[string]string{"CORS_ALLOWED_ORIGINS": "*, https://app.example.com"}, []string{"* allows every origin and must stand alone"}},
		{"everything wrong at once",
			map[string]string{"SPOTIFY_CLIENT_ID": placeholderClientID, "SPOTIFY_CLIENT_SECRET": "", "PORT": "x", "SPOTIFY_TIMEOUT": "soon", "ENCRYPTION_SECRET": "short"},
			[]string{"SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "PORT", "SPOTIFY_TIMEOUT", "ENCRYPTION_SECRET"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := loadConfig(testEnv("https://accounts.spotify.com", tt.env))
			if err == nil {
				t.Fatalf("loadConfig = nil error, want one naming %q", tt.want)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("loadConfig error %q does not name %q", err, want)
				}
			}
			if lines := strings.Count(err.Error(), "\n") + 1; lines != len(tt.want) {
				t.Errorf("loadConfig error has %d problems, want %d:\n%v", lines, len(tt.want), err)
			}
			secrets := append(splitList(tt.env["ENCRYPTION_SECRET"]), tt.env["SPOTIFY_CLIENT_SECRET"], testClientSecret)
			for _, secret := range secrets {
				if secret != "" && strings.Contains(err.Error(), secret) {
					t.Errorf("loadConfig error %q shows the secret %q", err, secret)
				}
			}
		})
	}
}

// TestRunRefusesBadConfig checks that run stops before listening, with the
// error main turns into exit status 2.
func TestRunRefusesBadConfig(t *testing.T) {
	t.Parallel()
	env := testEnv("https://accounts.spotify.com", map[string]string{"SPOTIFY_CLIENT_SECRET": "", "PORT": "1"})
	err := run(t.Context(), nil, env, io.Discard, io.Discard)
	if !errors.As(err, new(setupError)) || !strings.Contains(err.Error(), "SPOTIFY_CLIENT_SECRET is not set") {
		t.Errorf("run = %v, want a setupError naming SPOTIFY_CLIENT_SECRET", err)
	}
}

// TestReadEnv checks that .env is read, that the environment wins over it,
// and that a .env that does not parse is reported without being quoted.
func TestReadEnv(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env, found, err := readEnv(filepath.Join(dir, "missing.env"), []string{"PORT=9000"})
	if err != nil || found || env["PORT"] != "9000" {
		t.Errorf("readEnv(missing file) = %v, found %v, %v; want the environment, not found, no error", env, found, err)
	}

	good := filepath.Join(dir, "good.env")
	if err := os.WriteFile(good, []byte("SPOTIFY_CLIENT_ID=from-file\nPORT=8081\n# a comment\nSPOTIFY_TIMEOUT=\"3s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env, found, err = readEnv(good, []string{"PORT=9000", "EMPTY=", "A=b=c"})
	want := map[string]string{"SPOTIFY_CLIENT_ID": "from-file", "PORT": "9000", "SPOTIFY_TIMEOUT": "3s", "EMPTY": "", "A": "b=c"}
	if err != nil || !found || !maps.Equal(env, want) {
		t.Errorf("readEnv(.env, environment) = %v, found %v, %v; want %v, the environment winning", env, found, err, want)
	}

	// godotenv's own error would quote this line, secret and all.
	bad := filepath.Join(dir, "bad.env")
	if err := os.WriteFile(bad, []byte("SPOTIFY_CLIENT_SECRET=\"s3cr3t-value\nPORT=8080\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = readEnv(bad, nil)
	if !errors.As(err, new(setupError)) || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("readEnv(unterminated quote) = %v, want a setupError that does not quote the file", err)
	}
}

func TestFlags(t *testing.T) {
	t.Parallel()
	var stdout, stderr strings.Builder
	if err := run(t.Context(), []string{"-version"}, testEnv("", nil), &stdout, &stderr); err != nil {
		t.Errorf("run -version = %v", err)
	}
	if got, want := stdout.String(), buildVersion()+"\n"; got != want || want == "\n" {
		t.Errorf("run -version printed %q, want %q", got, want)
	}

	stderr.Reset()
	err := run(t.Context(), []string{"-verbose"}, testEnv("", nil), io.Discard, &stderr)
	if !errors.As(err, new(setupError)) || !strings.Contains(stderr.String(), "-healthcheck") {
		t.Errorf("run -verbose = %v with output %q, want a setupError and the usage", err, stderr.String())
	}
	err = run(t.Context(), []string{"serve"}, testEnv("", nil), io.Discard, io.Discard)
	if !errors.As(err, new(setupError)) {
		t.Errorf("run serve = %v, want a setupError", err)
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	t.Run("accepted", func(t *testing.T) {
		t.Parallel()
		spotify := newFakeSpotify(t, likeSpotify)
		var stdout strings.Builder
		if err := run(t.Context(), []string{"-check"}, testEnv(spotify.url, nil), &stdout, io.Discard); err != nil {
			t.Errorf("run -check = %v, want nil", err)
		}
		if got, want := stdout.String(), "ok: credentials accepted by "+spotify.url+"\n"; got != want {
			t.Errorf("run -check printed %q, want %q", got, want)
		}
		if forms := spotify.received(); len(forms) != 1 || forms[0] != "grant_type=client_credentials" {
			t.Errorf("Spotify received %q, want [grant_type=client_credentials]", forms)
		}
	})
	t.Run("rejected", func(t *testing.T) {
		t.Parallel()
		spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
			spotifyError(w, 400, "invalid_client", "Invalid client secret")
		})
		err := run(t.Context(), []string{"-check"}, testEnv(spotify.url, nil), io.Discard, io.Discard)
		if err == nil || errors.As(err, new(setupError)) || !strings.Contains(err.Error(), "invalid_client: Invalid client secret") {
			t.Errorf("run -check = %v, want an error with Spotify's description", err)
		}
		if err != nil && strings.Contains(err.Error(), testClientSecret) {
			t.Errorf("run -check error %q shows the secret", err)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		down := httptest.NewServer(http.NotFoundHandler())
		down.Close()
		err := run(t.Context(), []string{"-check"}, testEnv(down.URL, nil), io.Discard, io.Discard)
		if !errors.Is(err, errSpotifyUnreachable) {
			t.Errorf("run -check = %v, want errSpotifyUnreachable", err)
		}
	})
	t.Run("bad configuration", func(t *testing.T) {
		t.Parallel()
		err := run(t.Context(), []string{"-check"}, testEnv("", map[string]string{"SPOTIFY_CLIENT_ID": placeholderClientID}), io.Discard, io.Discard)
		if !errors.As(err, new(setupError)) {
			t.Errorf("run -check = %v, want a setupError", err)
		}
	})
}

func TestHealthcheck(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, "http://127.0.0.1:9", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: newServer(slog.New(slog.DiscardHandler), cfg, testSpotifyClient(cfg))}
	go srv.Serve(ln)
	port := ln.Addr().(*net.TCPAddr).Port
	env := testEnv("", map[string]string{"PORT": strconv.Itoa(port)})
	if err := run(t.Context(), []string{"-healthcheck"}, env, io.Discard, io.Discard); err != nil {
		t.Errorf("run -healthcheck against a running service = %v, want nil", err)
	}
	srv.Close()
	if err := run(t.Context(), []string{"-healthcheck"}, env, io.Discard, io.Discard); err == nil {
		t.Errorf("run -healthcheck against a stopped service = nil, want an error")
	}
}

// TestRunServesUntilCancelled runs the whole program: it listens on a free
// port, serves a swap, and returns nil once its context is done.
func TestRunServesUntilCancelled(t *testing.T) {
	t.Parallel()
	spotify := newFakeSpotify(t, likeSpotify)
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	logs, logWriter := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, nil, testEnv(spotify.url, map[string]string{"PORT": "0"}), io.Discard, logWriter)
		logWriter.Close()
	}()
	lines := bufio.NewScanner(logs)
	if !lines.Scan() {
		t.Fatalf("run logged nothing; it returned %v", <-done)
	}
	var started struct{ Msg, Addr string }
	if err := json.Unmarshal(lines.Bytes(), &started); err != nil || started.Msg != "listening" {
		t.Fatalf("first log line %q, want the listening address", lines.Text())
	}
	go io.Copy(io.Discard, logs) // keep the logger from blocking
	_, port, _ := net.SplitHostPort(started.Addr)
	got := send(t, "POST", "http://127.0.0.1:"+port+tokenPath, noneType, "code=AQDrun")
	if want := tokenJSON("at-AQDrun", "rt-AQDrun"); got.status != 200 || got.body != want {
		t.Errorf("POST /api/token = %d %s, want 200 %s", got.status, got.body, want)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("run after cancel = %v, want nil", err)
	}
}

// TestShutdownLetsRequestsFinish stops the server while a swap waits for
// Spotify, and checks that the swap still gets its answer.
func TestShutdownLetsRequestsFinish(t *testing.T) {
	t.Parallel()
	arrived, release := make(chan struct{}), make(chan struct{})
	spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		close(arrived)
		<-release
		likeSpotify(w, r, form)
	})
	cfg := testConfig(t, spotify.url, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var log syncBuffer
	logger := slog.New(slog.NewJSONHandler(&log, nil))
	svc := newServer(logger, cfg, testSpotifyClient(cfg))
	srv := newHTTPServer(cfg, svc, logger)
	shuttingDown := make(chan struct{})
	srv.RegisterOnShutdown(func() { close(shuttingDown) })
	ctx, stop := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, srv, ln, svc, cfg, logger) }()

	answered := make(chan reply, 1)
	go func() {
		answered <- send(t, "POST", "http://"+ln.Addr().String()+tokenPath, noneType, "code=AQDinflight")
	}()
	<-arrived
	stop() // as SIGTERM does
	<-shuttingDown
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Errorf("the server still accepts connections while shutting down")
	}
	close(release)
	if got, want := <-answered, tokenJSON("at-AQDinflight", "rt-AQDinflight"); got.status != 200 || got.body != want {
		t.Errorf("in-flight POST /api/token = %d %s, want 200 %s", got.status, got.body, want)
	}
	if err := <-served; err != nil {
		t.Errorf("serve = %v, want nil after a graceful shutdown", err)
	}
	for _, want := range []string{`"msg":"stopping","in_flight":1,`, `"msg":"stopped"`} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("the log does not hold %s:\n%s", want, log.String())
		}
	}
}

// TestSlowClientsAreCutOff checks that clients which send their headers byte
// by byte, or never finish them, are disconnected by the server's timeouts
// while other clients are served.
func TestSlowClientsAreCutOff(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, "http://127.0.0.1:9", nil)
	cfg.readHeaderTimeout, cfg.readTimeout = 300*time.Millisecond, 600*time.Millisecond
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = newHTTPServer(cfg, newServer(slog.New(slog.DiscardHandler), cfg, testSpotifyClient(cfg)), slog.New(slog.DiscardHandler))
	srv.Start()
	defer srv.Close()
	addr := srv.Listener.Addr().String()

	dial := func(first string) net.Conn {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(10 * time.Second)) // the test's own bound
		if _, err := io.WriteString(conn, first); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	// closedAfter waits until the server closes conn and says how long it took.
	closedAfter := func(conn net.Conn, start time.Time) (time.Duration, string) {
		b, err := io.ReadAll(conn)
		if err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
			t.Errorf("reading from the slow connection: %v, want the server to close it", err)
		}
		return time.Since(start), string(b)
	}

	start := time.Now()
	dribbling := dial("POST /api/token HTTP/1.1\r\nHost: x\r\n")
	go func() { // one byte of a never-ending header every 20 ms
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for range tick.C {
			if _, err := dribbling.Write([]byte("X")); err != nil {
				return
			}
		}
	}()
	stalled := dial("POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Ty")
	slowBody := dial("POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ncode=")

	if got := send(t, "GET", srv.URL+"/healthz", noneType, ""); got.status != 200 {
		t.Errorf("GET /healthz while slow clients hang on = %d, want 200", got.status)
	}
	for name, conn := range map[string]net.Conn{"headers byte by byte": dribbling, "headers never finished": stalled} {
		// Go's server, not the handler, may say 400 before it hangs up.
		if took, got := closedAfter(conn, start); took > 5*time.Second || got != "" && !strings.HasPrefix(got, "HTTP/1.1 400 ") {
			t.Errorf("%s: closed after %v with %q, want closed within the header timeout", name, took, got)
		}
	}
	took, got := closedAfter(slowBody, start)
	if took > 5*time.Second || !strings.HasPrefix(got, "HTTP/1.1 400") || !strings.Contains(got, `"error":"invalid_request"`) {
		t.Errorf("body never finished: closed after %v with %q, want a 400 JSON answer within the read timeout", took, got)
	}
}

// TestEnvExample checks .env.example against loadConfig: it lists every
// setting, its required values are refused until filled in, and so is its
// ENCRYPTION_SECRET once uncommented.
func TestEnvExample(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(".env.example")
	if err != nil {
		t.Fatal(err)
	}
	asIs, err := godotenv.Unmarshal(string(b))
	if err != nil {
		t.Fatalf(".env.example does not parse: %v", err)
	}
	_, err = loadConfig(asIs)
	for _, name := range []string{"SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "SPOTIFY_CLIENT_CALLBACK_URL"} {
		if err == nil || !strings.Contains(err.Error(), name+" is still the placeholder") {
			t.Errorf("loadConfig(.env.example as is) = %v, want %s refused as a placeholder", err, name)
		}
	}
	for _, name := range strings.Fields(settings) {
		if !regexp.MustCompile(`(?m)^(# )?` + name + `=`).Match(b) {
			t.Errorf(".env.example does not list %s", name)
		}
	}
	// Every name the code reads is in settings, which -h and the look-alike
	// warnings go by.
	code, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?:get\(|env\[)"([A-Z_]+)"`).FindAllSubmatch(code, -1) {
		if !slices.Contains(strings.Fields(settings), string(m[1])) {
			t.Errorf("main.go reads %s, which settings does not list", m[1])
		}
	}

	uncommented, err := godotenv.Unmarshal(regexp.MustCompile(`(?m)^# ([A-Z_]+=)`).ReplaceAllString(string(b), "$1"))
	if err != nil {
		t.Fatal(err)
	}
	uncommented["SPOTIFY_CLIENT_ID"], uncommented["SPOTIFY_CLIENT_SECRET"], uncommented["SPOTIFY_CLIENT_CALLBACK_URL"] = "id", "secret", "myapp://cb"
	_, err = loadConfig(uncommented)
	if err == nil || err.Error() != "ENCRYPTION_SECRET is still the placeholder from .env.example" {
		t.Errorf("loadConfig(.env.example filled in, all uncommented) = %v, want only ENCRYPTION_SECRET refused", err)
	}
}

// TestDockerignore checks that secrets and history stay out of the image's
// build context.
func TestDockerignore(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(".dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(b))
	for _, want := range []string{".env", ".git"} {
		if !slices.Contains(lines, want) {
			t.Errorf(".dockerignore does not list %s", want)
		}
	}
}

// TestLogBuffer checks that log lines wait in the buffer, that a full
// buffer and flushEvery write them out without being asked, and that a failed
// write does not stop logging.
func TestLogBuffer(t *testing.T) {
	t.Parallel()
	var out syncBuffer
	logs := &logBuffer{out: &out}
	io.WriteString(logs, "line 1\n")
	if got := out.String(); got != "" {
		t.Errorf("before a flush the log holds %q, want nothing yet", got)
	}
	logs.flush()
	if got := out.String(); got != "line 1\n" {
		t.Errorf("after a flush the log holds %q, want line 1", got)
	}
	long := strings.Repeat("x", logBufferSize/2) + "\n"
	for range 3 {
		io.WriteString(logs, long)
	}
	if got := len(out.String()); got != len("line 1\n")+2*len(long) {
		t.Errorf("after three half-buffer lines the output has %d bytes, want line 1 and two of them", got)
	}

	failing := &failingWriter{fails: 1}
	logs = &logBuffer{out: failing}
	io.WriteString(logs, "lost\n")
	logs.flush() // fails
	io.WriteString(logs, "line 2\n")
	logs.flush()
	if got := failing.String(); got != "line 2\n" {
		t.Errorf("after a failed write the log holds %q, want line 2: a failed write must not stop logging", got)
	}

	pipeOut, pipeIn := io.Pipe()
	logs = &logBuffer{out: pipeIn}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go logs.flushEvery(ctx, time.Millisecond)
	io.WriteString(logs, "line 3\n")
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(pipeOut).ReadString('\n')
		line <- s
	}()
	select {
	case got := <-line:
		if got != "line 3\n" {
			t.Errorf("flushEvery wrote %q, want line 3", got)
		}
	case <-time.After(10 * time.Second): // a bound, should it never flush
		t.Errorf("flushEvery wrote nothing in 10 s")
	}
}

// failingWriter fails its first writes, as a full disk or a closed pipe
// does, then takes them.
type failingWriter struct {
	fails int
	syncBuffer
}

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.fails > 0 {
		w.fails--
		return 0, errors.New("no space left on device")
	}
	return w.syncBuffer.Write(p)
}
