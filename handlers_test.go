package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"
)

const (
	testClientID     = "test-client-id"
	testClientSecret = "test-client-secret"
	// testAuthorization is what Spotify must receive: "Basic " and the
	// base64 of "test-client-id:test-client-secret", spelled out.
	testAuthorization = "Basic dGVzdC1jbGllbnQtaWQ6dGVzdC1jbGllbnQtc2VjcmV0"
	testCallback      = "testapp://callback"
	testWebCallback   = "https://app.example.com/callback"
	testSecret        = "test-encryption-secret-0123456789abcdef"
)

// fakeSpotify plays Spotify's token endpoint.
type fakeSpotify struct {
	url   string
	conns atomic.Int64 // TCP connections accepted
	mu    sync.Mutex
	forms []string // the form bodies received, in order
}

// spotifyFunc answers a token request whose form is form.
type spotifyFunc func(w http.ResponseWriter, r *http.Request, form url.Values)

// newFakeSpotify starts a fake token endpoint. It fails the test on any
// request that is not what the service must send, records the form body, and
// lets answer reply.
func newFakeSpotify(t testing.TB, answer spotifyFunc) *fakeSpotify {
	t.Helper()
	f := &fakeSpotify{}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/api/token" || r.URL.RawQuery != "" {
			t.Errorf("Spotify got %s %s, want POST /api/token", r.Method, r.URL)
		}
		if got := r.Header.Get("Authorization"); got != testAuthorization {
			t.Errorf("Spotify got Authorization %q, want %q", got, testAuthorization)
		}
		if got, want := r.Header.Get("Content-Type"), "application/x-www-form-urlencoded"; got != want {
			t.Errorf("Spotify got Content-Type %q, want %q", got, want)
		}
		if got := r.Header.Get("Accept-Encoding"); got != "" { // an answer of a few hundred bytes: not worth gzip
			t.Errorf("Spotify got Accept-Encoding %q, want none", got)
		}
		body, err := io.ReadAll(r.Body)
		if err != nil {
			t.Errorf("Spotify reading the body: %v", err)
		}
		form, err := url.ParseQuery(string(body))
		if err != nil {
			t.Errorf("Spotify got a body that is no form: %q: %v", body, err)
		}
		f.mu.Lock()
		f.forms = append(f.forms, string(body))
		f.mu.Unlock()
		answer(w, r, form)
	}))
	srv.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateNew {
			f.conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	f.url = srv.URL
	return f
}

// received returns the form bodies Spotify got so far.
func (f *fakeSpotify) received() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.forms...)
}

// tokenJSON is a token answer in Spotify's members, spaced unlike Go's
// encoder would, so that a service that re-encodes it fails the tests.
func tokenJSON(access, refresh string) string {
	s := `{"access_token": "` + access + `", "token_type": "Bearer", "expires_in": 3600`
	if refresh != "" {
		s += `, "refresh_token": "` + refresh + `"`
	}
	return s + `, "scope": "user-read-email playlist-read-private"}`
}

// spotifyError writes an error as Spotify's accounts service does.
func spotifyError(w http.ResponseWriter, status int, code, description string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":%q,"error_description":%q}`, code, description)
}

// likeSpotify answers as Spotify does, with tokens named after the code or
// refresh token they were granted for, so that a test can tell whose answer
// it got. A code that starts with "used" and the refresh token "revoked" are refused; a
// refresh token that starts with "rotate" is replaced by a new one.
func likeSpotify(w http.ResponseWriter, r *http.Request, form url.Values) {
	switch form.Get("grant_type") {
	case "authorization_code":
		code := form.Get("code")
		if strings.HasPrefix(code, "used") {
			spotifyError(w, http.StatusBadRequest, "invalid_grant", "Invalid authorization code")
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, tokenJSON("at-"+code, "rt-"+code))
	case "refresh_token":
		rt := form.Get("refresh_token")
		if rt == "revoked" {
			spotifyError(w, http.StatusBadRequest, "invalid_grant", "Refresh token revoked")
			return
		}
		rotated := ""
		if strings.HasPrefix(rt, "rotate") {
			rotated = "rotated-" + rt
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, tokenJSON("at-from-"+rt, rotated))
	case "client_credentials":
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"access_token":"app-token","token_type":"Bearer","expires_in":3600}`)
	default:
		spotifyError(w, http.StatusBadRequest, "unsupported_grant_type", "grant_type parameter is missing")
	}
}

// testEnv is the environment of a service under test; set overrides it.
func testEnv(accountsURL string, set map[string]string) map[string]string {
	env := map[string]string{
		"SPOTIFY_CLIENT_ID":           testClientID,
		"SPOTIFY_CLIENT_SECRET":       testClientSecret,
		"SPOTIFY_CLIENT_CALLBACK_URL": testCallback + "," + testWebCallback,
		"SPOTIFY_ACCOUNTS_URL":        accountsURL,
	}
	for k, v := range set {
		env[k] = v
	}
	return env
}

// testConfig loads the test environment, overridden by env, or fails the test.
func testConfig(t testing.TB, accountsURL string, env map[string]string) config {
	t.Helper()
	cfg, err := loadConfig(testEnv(accountsURL, env), nil)
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	return cfg
}

// testSpotifyClient is the Spotify client run would make for cfg.
func testSpotifyClient(cfg config) *spotifyClient {
	return newSpotifyClient(cfg.accountsURL, cfg.clientID, cfg.clientSecret, cfg.spotifyTimeout)
}

// syncBuffer is a bytes.Buffer that the server's goroutines can log to.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// testService is the service under test, in front of a fake Spotify.
type testService struct {
	url     string
	server  *server
	spotify *fakeSpotify
	log     *syncBuffer
	close   func() // stops the service, waiting for requests in flight
}

// startService starts the service with the test environment and env, in
// front of a fake Spotify that answers with answer. Before it serves, it
// runs each of setup, which may swap its clocks.
func startService(t testing.TB, answer spotifyFunc, env map[string]string, setup ...func(*server, *spotifyClient)) *testService {
	t.Helper()
	spotify := newFakeSpotify(t, answer)
	cfg := testConfig(t, spotify.url, env)
	log := &syncBuffer{}
	client := testSpotifyClient(cfg)
	svc := wire(cfg, slog.New(slog.NewJSONHandler(log, nil)), client)
	for _, f := range setup {
		f(svc, client)
	}
	srv := httptest.NewServer(svc)
	t.Cleanup(srv.Close)
	return &testService{url: srv.URL, server: svc, spotify: spotify, log: log, close: srv.Close}
}

// fakeClock is a clock that tests move by hand, instead of sleeping.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 11, 29, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// logLine is one line of the service's log, as an operator's tools read it.
type logLine struct {
	Level         string `json:"level"`
	Msg           string `json:"msg"`
	Method        string `json:"method"`
	Path          string `json:"path"`
	Status        int    `json:"status"`
	SpotifyStatus int    `json:"spotify_status"`
	Client        string `json:"client"`
	RequestID     string `json:"request_id"`
	Error         string `json:"error"`
	Reason        string `json:"reason"`
	DurationUS    int64  `json:"duration_us"`
}

// logLines parses a log, one JSON object a line, and fails the test unless
// every request's line has the fields every one must have, and
// spotify_status only where Spotify answered.
func logLines(t testing.TB, log string) []logLine {
	t.Helper()
	var lines []logLine
	for _, text := range strings.Split(strings.TrimSpace(log), "\n") {
		var line logLine
		var fields map[string]any
		if err := json.Unmarshal([]byte(text), &line); err != nil || json.Unmarshal([]byte(text), &fields) != nil {
			t.Fatalf("log line %q is not JSON: %v", text, err)
		}
		if line.Msg == "request" {
			for _, name := range []string{"time", "level", "method", "path", "status", "duration_us", "client"} {
				if _, ok := fields[name]; !ok {
					t.Errorf("log line %s has no %s", text, name)
				}
			}
			if status, ok := fields["spotify_status"]; ok && status == 0.0 {
				t.Errorf("log line %s has spotify_status 0: it must be left out where Spotify did not answer", text)
			}
			_, hasError := fields["error"]
			if _, hasReason := fields["reason"]; line.Status/100 == 2 && (hasError || hasReason) {
				t.Errorf("log line %s of a success has an error or a reason", text)
			}
		}
		lines = append(lines, line)
	}
	return lines
}

// reply is what the service answered.
type reply struct {
	status int
	header http.Header
	body   string
	close  bool // the answer closes its connection (Connection: close)
}

// send makes a request to the service; a contentType of "" sends none. A
// request that fails is reported, with status 0, so that goroutines may send.
func send(t testing.TB, method, url, contentType, body string, header ...string) reply {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Errorf("%s %s: %v", method, url, err)
		return reply{}
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1]) // a name twice: two lines
	}
	// The bound turns a service that hangs into a failure, not a stuck test.
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, url, err)
		return reply{}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Errorf("%s %s: reading the body: %v", method, url, err)
	}
	return reply{resp.StatusCode, resp.Header, string(b), resp.Close}
}

// checkJSON fails the test unless an answer has the headers every answer must
// have and a JSON object for a body; it returns the object's string members.
func checkJSON(t testing.TB, what string, r reply) map[string]any {
	t.Helper()
	for name, want := range map[string]string{
		"Content-Type":  "application/json",
		"Cache-Control": "no-store",
		"Pragma":        "no-cache",
	} {
		if got := r.header.Get(name); got != want {
			t.Errorf("%s: %s = %q, want %q", what, name, got, want)
		}
	}
	var obj map[string]any
	if err := json.Unmarshal([]byte(r.body), &obj); err != nil {
		t.Errorf("%s: body %q is not a JSON object: %v", what, r.body, err)
	}
	return obj
}

// checkError fails the test unless an answer is the given OAuth error.
func checkError(t testing.TB, what string, r reply, wantStatus int, wantError string) {
	t.Helper()
	obj := checkJSON(t, what, r)
	if r.status != wantStatus || obj["error"] != wantError {
		t.Errorf("%s = %d %s, want %d with error %q", what, r.status, r.body, wantStatus, wantError)
	}
	if d, _ := obj["error_description"].(string); d == "" || len(obj) != 2 {
		t.Errorf("%s: body %s, want an error and an error_description only", what, r.body)
	}
}

const (
	formType    = "application/x-www-form-urlencoded"
	jsonType    = "application/json"
	noneType    = ""
	tokenPath   = "/api/token"
	refreshPath = "/api/refresh_token"
)

// TestSwapsAndRefreshes replays what real clients send and checks the exact
// form Spotify receives and that Spotify's answer comes back unchanged.
func TestSwapsAndRefreshes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		path        string
		contentType string
		body        string
		wantForm    string // exactly what Spotify must receive
		wantStatus  int
		wantBody    string
	}{
		{
			name: "iOS SDK swap: bare code, no Content-Type",
			path: tokenPath, contentType: noneType,
			body:       "code=AQDios-code_123",
			wantForm:   "grant_type=authorization_code&code=AQDios-code_123&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDios-code_123", "rt-AQDios-code_123"),
		},
		{
			name: "iOS SDK refresh",
			path: refreshPath, contentType: formType,
			body:       "client_id=" + testClientID + "&grant_type=refresh_token&refresh_token=AQBios-refresh",
			wantForm:   "grant_type=refresh_token&refresh_token=AQBios-refresh",
			wantStatus: 200, wantBody: tokenJSON("at-from-AQBios-refresh", ""),
		},
		{
			name: "AppAuth swap with PKCE",
			path: tokenPath, contentType: "application/x-www-form-urlencoded; charset=UTF-8",
			body:       "grant_type=authorization_code&code=AQDapp&redirect_uri=testapp%3A%2F%2Fcallback&code_verifier=Vx9-._~verifier&client_id=" + testClientID,
			wantForm:   "grant_type=authorization_code&code=AQDapp&redirect_uri=testapp%3A%2F%2Fcallback&code_verifier=Vx9-._~verifier",
			wantStatus: 200, wantBody: tokenJSON("at-AQDapp", "rt-AQDapp"),
		},
		{
			name: "AppAuth refresh at the token endpoint",
			path: tokenPath, contentType: formType,
			body:       "grant_type=refresh_token&refresh_token=AQBapp&client_id=" + testClientID,
			wantForm:   "grant_type=refresh_token&refresh_token=AQBapp",
			wantStatus: 200, wantBody: tokenJSON("at-from-AQBapp", ""),
		},
		{
			name: "refresh with every field a client library may add, code_verifier and redirect_uri too",
			path: refreshPath, contentType: formType,
			body:       "refresh_token=AQBall&code_verifier=Vx9&redirect_uri=evil%3A%2F%2Fx&scope=a&client_id=" + testClientID,
			wantForm:   "grant_type=refresh_token&refresh_token=AQBall",
			wantStatus: 200, wantBody: tokenJSON("at-from-AQBall", ""),
		},
		{
			name: "browser fetch swap, JSON, second callback URL",
			path: tokenPath, contentType: jsonType,
			body:       `{"code":"AQDweb","redirect_uri":"https://app.example.com/callback","state":"x1"}`,
			wantForm:   "grant_type=authorization_code&code=AQDweb&redirect_uri=https%3A%2F%2Fapp.example.com%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDweb", "rt-AQDweb"),
		},
		{
			name: "browser fetch refresh, JSON with charset",
			path: refreshPath, contentType: "application/json; charset=utf-8",
			body:       "{\n  \"refresh_token\": \"AQBweb\"\n}\n",
			wantForm:   "grant_type=refresh_token&refresh_token=AQBweb",
			wantStatus: 200, wantBody: tokenJSON("at-from-AQBweb", ""),
		},
		{
			name: "media types are case-insensitive, spaces around them too: JSON",
			path: tokenPath, contentType: " Application/JSON ; Charset=UTF-8",
			body:       `{"code":"AQDcase"}`,
			wantForm:   "grant_type=authorization_code&code=AQDcase&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDcase", "rt-AQDcase"),
		},
		{
			name: "media types are case-insensitive: form",
			path: refreshPath, contentType: "APPLICATION/X-WWW-FORM-URLENCODED",
			body:       "refresh_token=AQBcase",
			wantForm:   "grant_type=refresh_token&refresh_token=AQBcase",
			wantStatus: 200, wantBody: tokenJSON("at-from-AQBcase", ""),
		},
		{
			name: "JSON members the service does not read may be anything",
			path: tokenPath, contentType: jsonType,
			body:       `{"code":"AQDx","client_id":null,"extra":{"a":[1,2.5,true]}}`,
			wantForm:   "grant_type=authorization_code&code=AQDx&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDx", "rt-AQDx"),
		},
		{
			name: "JSON null for optional fields: absent",
			path: tokenPath, contentType: jsonType,
			body:       `{"code":"AQDnull","redirect_uri":null,"code_verifier":null,"grant_type":null}`,
			wantForm:   "grant_type=authorization_code&code=AQDnull&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDnull", "rt-AQDnull"),
		},
		{
			name: "escapes are decoded, in names too, and encoded again",
			path: tokenPath, contentType: formType,
			body:       "%63ode=a%2Bb%2Fc%3D+d&state=%F0%9F%8E%B5",
			wantForm:   "grant_type=authorization_code&code=a%2Bb%2Fc%3D+d&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-a+b/c= d", "rt-a+b/c= d"),
		},
		{
			name: "a form whose state holds JSON is a form: only a body that starts with { is JSON",
			path: tokenPath, contentType: noneType,
			body:       `code=AQDstate&state={"from":"/home"}`,
			wantForm:   "grant_type=authorization_code&code=AQDstate&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDstate", "rt-AQDstate"),
		},
		{
			name: "empty pairs in a form are skipped",
			path: tokenPath, contentType: formType,
			body:       "&code=AQDamp&&redirect_uri=https%3A%2F%2Fapp.example.com%2Fcallback&",
			wantForm:   "grant_type=authorization_code&code=AQDamp&redirect_uri=https%3A%2F%2Fapp.example.com%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDamp", "rt-AQDamp"),
		},
		{
			name: "empty optional fields count as absent",
			path: tokenPath, contentType: formType,
			body:       "grant_type=&code=AQDe&redirect_uri=&code_verifier=(null)",
			wantForm:   "grant_type=authorization_code&code=AQDe&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-AQDe", "rt-AQDe"),
		},
		{
			name: "Spotify's invalid_grant comes back as is",
			path: tokenPath, contentType: formType,
			body:       "code=used",
			wantForm:   "grant_type=authorization_code&code=used&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 400, wantBody: `{"error":"invalid_grant","error_description":"Invalid authorization code"}`,
		},
		{
			name: "a rotated refresh token comes back",
			path: refreshPath, contentType: formType,
			body:       "refresh_token=rotate-1",
			wantForm:   "grant_type=refresh_token&refresh_token=rotate-1",
			wantStatus: 200, wantBody: tokenJSON("at-from-rotate-1", "rotated-rotate-1"),
		},
		{
			name: "a body of exactly 64 KiB is read",
			path: tokenPath, contentType: formType,
			body:       "code=" + strings.Repeat("c", 64<<10-len("code=")),
			wantForm:   "grant_type=authorization_code&code=" + strings.Repeat("c", 64<<10-len("code=")) + "&redirect_uri=testapp%3A%2F%2Fcallback",
			wantStatus: 200, wantBody: tokenJSON("at-"+strings.Repeat("c", 64<<10-len("code=")), "rt-"+strings.Repeat("c", 64<<10-len("code="))),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			svc := startService(t, likeSpotify, nil)
			got := send(t, "POST", svc.url+tt.path, tt.contentType, tt.body)
			checkJSON(t, "POST "+tt.path, got)
			if got.status != tt.wantStatus || got.body != tt.wantBody {
				t.Errorf("POST %s = %d %s, want %d %s", tt.path, got.status, got.body, tt.wantStatus, tt.wantBody)
			}
			if forms := svc.spotify.received(); len(forms) != 1 || forms[0] != tt.wantForm {
				t.Errorf("Spotify received %q, want exactly [%q]", forms, tt.wantForm)
			}
			if ra, ok := got.header["Retry-After"]; ok {
				t.Errorf("POST %s: Retry-After %q, want none where Spotify sent none", tt.path, ra)
			}
		})
	}
}

// TestRefusesBadRequests checks the errors the service answers itself, and
// that no bad request reaches Spotify.
func TestRefusesBadRequests(t *testing.T) {
	t.Parallel()
	tooLarge := "code=" + strings.Repeat("c", maxBodyBytes)
	tests := []struct {
		name        string
		method      string
		path        string
		contentType string
		body        string
		wantStatus  int
		wantError   string
	}{
		{"no code", "POST", tokenPath, formType, "", 400, "invalid_request"},
		{"empty code", "POST", tokenPath, formType, "code=", 400, "invalid_request"},
		{"code (null), as the iOS SDK sends nil", "POST", tokenPath, noneType, "code=(null)", 400, "invalid_request"},
		{"code (null), escaped", "POST", tokenPath, formType, "code=%28null%29", 400, "invalid_request"},
		{"JSON code null", "POST", tokenPath, jsonType, `{"code":null}`, 400, "invalid_request"},
		{"JSON code null and a code", "POST", tokenPath, jsonType, `{"code":null,"code":"a"}`, 400, "invalid_request"},
		{"no refresh_token", "POST", refreshPath, formType, "grant_type=refresh_token", 400, "invalid_request"},
		{"refresh_token (null)", "POST", refreshPath, formType, "refresh_token=(null)", 400, "invalid_request"},
		{"no refresh_token at the token endpoint", "POST", tokenPath, formType, "grant_type=refresh_token&code=x", 400, "invalid_request"},
		{"grant_type password", "POST", tokenPath, formType, "grant_type=password&code=x", 400, "unsupported_grant_type"},
		{"grant_type client_credentials: no app tokens for anyone", "POST", tokenPath, formType, "grant_type=client_credentials", 400, "unsupported_grant_type"},
		{"code grant at the refresh endpoint", "POST", refreshPath, formType, "grant_type=authorization_code&refresh_token=x", 400, "unsupported_grant_type"},
		{"redirect_uri not configured", "POST", tokenPath, formType, "code=x&redirect_uri=evil%3A%2F%2Fcallback", 400, "invalid_request"},
		{"redirect_uri that only starts like one", "POST", tokenPath, formType, "code=x&redirect_uri=testapp%3A%2F%2Fcallback%2Fx", 400, "invalid_request"},
		{"redirect_uri with a slash added", "POST", tokenPath, formType, "code=x&redirect_uri=testapp%3A%2F%2Fcallback%2F", 400, "invalid_request"},
		{"redirect_uri a prefix of one", "POST", tokenPath, formType, "code=x&redirect_uri=testapp%3A%2F%2Fcall", 400, "invalid_request"},
		{"redirect_uri the list itself", "POST", tokenPath, formType, "code=x&redirect_uri=testapp%3A%2F%2Fcallback%2Chttps%3A%2F%2Fapp.example.com%2Fcallback", 400, "invalid_request"},
		{"redirect_uri with spaces around", "POST", tokenPath, formType, "code=x&redirect_uri=+testapp%3A%2F%2Fcallback+", 400, "invalid_request"},
		{"bad form escape", "POST", tokenPath, formType, "code=%zz", 400, "invalid_request"},
		{"bad escape in a field not read", "POST", tokenPath, formType, "code=x&state=%", 400, "invalid_request"},
		{"code twice", "POST", tokenPath, formType, "code=a&code=b", 400, "invalid_request"},
		{"code twice, once empty", "POST", tokenPath, formType, "code=&code=b", 400, "invalid_request"},
		{"code twice, once (null)", "POST", tokenPath, formType, "code=(null)&code=b", 400, "invalid_request"},
		{"code twice, once with its name escaped", "POST", tokenPath, formType, "code=a&%63ode=b", 400, "invalid_request"},
		{"redirect_uri twice, the second empty", "POST", tokenPath, formType, "code=x&redirect_uri=testapp%3A%2F%2Fcallback&redirect_uri=", 400, "invalid_request"},
		{"grant_type in capitals: names are exact", "POST", tokenPath, formType, "grant_type=Refresh_Token&refresh_token=x", 400, "unsupported_grant_type"},
		{"grant_type in capitals at the refresh endpoint", "POST", refreshPath, formType, "grant_type=REFRESH_TOKEN&refresh_token=x", 400, "unsupported_grant_type"},
		{"redirect_uri in another case: it must be exact", "POST", tokenPath, formType, "code=x&redirect_uri=TESTAPP%3A%2F%2FCALLBACK", 400, "invalid_request"},
		{"refresh_token twice", "POST", refreshPath, formType, "refresh_token=a&refresh_token=a", 400, "invalid_request"},
		{"grant_type twice", "POST", tokenPath, formType, "grant_type=authorization_code&code=a&grant_type=authorization_code", 400, "invalid_request"},
		{"JSON code twice", "POST", tokenPath, jsonType, `{"code":"a","code":"b"}`, 400, "invalid_request"},
		{"JSON truncated", "POST", tokenPath, jsonType, `{"code":"a"`, 400, "invalid_request"},
		{"JSON empty body", "POST", tokenPath, jsonType, ``, 400, "invalid_request"},
		{"JSON array", "POST", tokenPath, jsonType, `["code","a"]`, 400, "invalid_request"},
		{"JSON string", "POST", tokenPath, jsonType, `"code=a"`, 400, "invalid_request"},
		{"JSON code a number", "POST", tokenPath, jsonType, `{"code":12345}`, 400, "invalid_request"},
		{"JSON code an object", "POST", tokenPath, jsonType, `{"code":{"value":"a"}}`, 400, "invalid_request"},
		{"JSON with data after the object", "POST", tokenPath, jsonType, `{"code":"a"} {"code":"b"}`, 400, "invalid_request"},
		{"form sent as JSON", "POST", tokenPath, jsonType, `code=a`, 400, "invalid_request"},
		{"text/plain", "POST", tokenPath, "text/plain;charset=UTF-8", "code=a", 415, "invalid_request"},
		{"multipart", "POST", refreshPath, "multipart/form-data; boundary=x", "--x--", 415, "invalid_request"},
		{"a JSON-based type is not JSON", "POST", tokenPath, "application/vnd.api+json", `{"code":"a"}`, 415, "invalid_request"},
		{"text/json", "POST", tokenPath, "text/json", `{"code":"a"}`, 415, "invalid_request"},
		{"body over 64 KiB", "POST", tokenPath, formType, tooLarge, 413, "invalid_request"},
		{"JSON body over 64 KiB", "POST", refreshPath, jsonType, `{"refresh_token":"` + tooLarge + `"}`, 413, "invalid_request"},
		{"GET the token endpoint", "GET", tokenPath, noneType, "", 405, "invalid_request"},
		{"PUT the refresh endpoint", "PUT", refreshPath, formType, "refresh_token=a", 405, "invalid_request"},
		{"OPTIONS without CORS", "OPTIONS", tokenPath, noneType, "", 405, "invalid_request"},
		{"POST /healthz", "POST", "/healthz", formType, "", 405, "invalid_request"},
		{"DELETE /", "DELETE", "/", noneType, "", 405, "invalid_request"},
		{"unknown path", "POST", "/swap", formType, "code=a", 404, "not_found"},
		{"trailing slash", "POST", tokenPath + "/", formType, "code=a", 404, "not_found"},
		{"unclean path, which ServeMux would redirect", "POST", "/x/.." + tokenPath, formType, "code=a", 404, "not_found"},
		{"double slash", "GET", "//healthz", noneType, "", 404, "not_found"},
		{"the root twice, which ServeMux would redirect", "GET", "//", noneType, "", 404, "not_found"},
		{"a dot segment", "POST", "/./api/token", formType, "code=a", 404, "not_found"},
		{"query instead of body", "POST", tokenPath + "?code=a", formType, "", 400, "invalid_request"},
	}
	svc := startService(t, likeSpotify, nil)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := send(t, tt.method, svc.url+tt.path, tt.contentType, tt.body)
			checkError(t, tt.method+" "+tt.path, got, tt.wantStatus, tt.wantError)
		})
	}
	if forms := svc.spotify.received(); len(forms) != 0 {
		t.Errorf("Spotify received %d requests, want none", len(forms))
	}
	// With one callback URL, redirect_uri is checked all the same.
	one := startService(t, likeSpotify, map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": testCallback})
	checkError(t, "redirect_uri not the one configured", send(t, "POST", one.url+tokenPath, formType, "code=x&redirect_uri=evil%3A%2F%2Fsteal"), 400, "invalid_request")
	if forms := one.spotify.received(); len(forms) != 0 {
		t.Errorf("with one callback URL, Spotify received %d requests, want none", len(forms))
	}
}

func TestMethodNotAllowedNamesTheMethods(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, nil)
	for path, want := range map[string]string{tokenPath: "POST", refreshPath: "POST", "/healthz": "GET, HEAD", "/": "GET, HEAD"} {
		got := send(t, "PATCH", svc.url+path, noneType, "")
		if got.status != 405 || got.header.Get("Allow") != want {
			t.Errorf("PATCH %s = %d with Allow %q, want 405 with Allow %q", path, got.status, got.header.Get("Allow"), want)
		}
	}
}

// TestChunkedBodyOverLimit sends a body with no Content-Length, so that the
// limit must hold while reading.
func TestChunkedBodyOverLimit(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, nil)
	body := io.MultiReader(strings.NewReader("code="), strings.NewReader(strings.Repeat("c", 2*maxBodyBytes)))
	req, err := http.NewRequest("POST", svc.url+tokenPath, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", formType)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	checkError(t, "chunked POST", reply{resp.StatusCode, resp.Header, string(b), resp.Close}, 413, "invalid_request")
}

// TestDeclaredBodyOverLimit checks that a Content-Length over the limit is
// refused at once, before the body is sent or read.
func TestDeclaredBodyOverLimit(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, nil)
	checkError(t, "POST with Content-Length 100000000", postDeclaring100MB(t, svc.url), 413, "invalid_request")
}

// postDeclaring100MB sends a POST to /api/token that declares a body of
// 100 MB, sends 5 bytes of it, and returns the answer.
func postDeclaring100MB(t *testing.T, serviceURL string) reply {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(serviceURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(conn, "POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Type: "+formType+"\r\nContent-Length: 100000000\r\n\r\ncode=")
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading the answer: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, resp.Header, string(b), resp.Close}
}

func TestHealthAndIndex(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": "https://secret-origin.example"})
	got := send(t, "GET", svc.url+"/healthz", noneType, "")
	checkJSON(t, "GET /healthz", got)
	if got.status != 200 || got.body != `{"status":"ok"}` {
		t.Errorf("GET /healthz = %d %s, want 200 {\"status\":\"ok\"}", got.status, got.body)
	}
	got = send(t, "GET", svc.url+"/", noneType, "")
	obj := checkJSON(t, "GET /", got)
	if got.status != 200 || obj["service"] != "spotify-token-swap" {
		t.Errorf("GET / = %d %s, want 200 naming the service", got.status, got.body)
	}
	for _, endpoint := range []string{"POST /api/token", "POST /api/refresh_token", "GET /healthz"} {
		if !strings.Contains(got.body, endpoint) {
			t.Errorf("GET / = %s, does not name %s", got.body, endpoint)
		}
	}
	for _, setting := range []string{testClientID, testClientSecret, testCallback, testWebCallback, "secret-origin", svc.spotify.url} {
		if strings.Contains(got.body, setting) {
			t.Errorf("GET / shows the setting %q: %s", setting, got.body)
		}
	}
	if n := len(svc.spotify.received()); n != 0 {
		t.Errorf("Spotify received %d requests, want none", n)
	}
}

// TestSpotifyFaults checks what the client sees when Spotify fails.
func TestSpotifyFaults(t *testing.T) {
	t.Parallel()
	huge := `{"access_token":"` + strings.Repeat("a", 2<<20) + `"}`
	oneMiB := `{"access_token":"` + strings.Repeat("a", 1<<20-len(`{"access_token":""}`)) + `"}`
	tests := []struct {
		name           string
		answer         spotifyFunc
		wantStatus     int
		wantBody       string // exact, where Spotify's answer is relayed
		wantError      string // where the service answers itself
		wantRetryAfter string
		wantLog        string // why, in the log line
	}{
		{
			name: "connection reset",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				conn, _, err := http.NewResponseController(w).Hijack()
				if err != nil {
					panic(err)
				}
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
			},
			wantStatus: 502, wantError: "server_error", wantLog: "connection reset",
		},
		{
			name: "HTML 500",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Content-Type", "text/html")
				w.WriteHeader(500)
				io.WriteString(w, "<html><body><h1>500 Internal Server Error</h1></body></html>")
			},
			wantStatus: 502, wantError: "server_error", wantLog: `status 500, not a JSON object (Content-Type \"text/html\")`,
		},
		{
			name: "2 MiB answer",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, huge)
			},
			wantStatus: 502, wantError: "server_error", wantLog: "over 1048576 bytes",
		},
		{
			name: "2 MiB answer with its Content-Length",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Content-Length", strconv.Itoa(len(huge)))
				io.WriteString(w, huge)
			},
			wantStatus: 502, wantError: "server_error", wantLog: "over 1048576 bytes",
		},
		{
			name: "an endless answer: cut at 1 MiB, not read until SPOTIFY_TIMEOUT",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, `{"access_token":"`)
				for chunk := strings.Repeat("a", 64<<10); r.Context().Err() == nil; {
					if _, err := io.WriteString(w, chunk); err != nil {
						return
					}
				}
			},
			wantStatus: 502, wantError: "server_error", wantLog: "over 1048576 bytes",
		},
		{
			name: "a Content-Length of 1 TiB, and a few bytes",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Content-Length", strconv.Itoa(1<<40))
				io.WriteString(w, `{"access_token":"at"}`)
			},
			wantStatus: 502, wantError: "server_error", wantLog: "unexpected EOF",
		},
		{
			name: "empty 200",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.WriteHeader(200)
			},
			wantStatus: 502, wantError: "server_error",
		},
		{
			name: "JSON that is not an object",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, `["access_token"]`)
			},
			wantStatus: 502, wantError: "server_error",
		},
		{
			name: "truncated JSON",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, `{"access_token":"at"`)
			},
			wantStatus: 502, wantError: "server_error",
		},
		{
			name: "a JSON object after white space",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, "\n\t "+tokenJSON("at", "rt"))
			},
			wantStatus: 200, wantBody: "\n\t " + tokenJSON("at", "rt"),
		},
		{
			name: "an answer of exactly 1 MiB",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, oneMiB)
			},
			wantStatus: 200, wantBody: oneMiB,
		},
		{
			name: "an answer of exactly 1 MiB, with its Content-Length",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Content-Length", strconv.Itoa(len(oneMiB)))
				io.WriteString(w, oneMiB)
			},
			wantStatus: 200, wantBody: oneMiB,
		},
		{
			name: "429 with a JSON body",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Retry-After", "120") // relayed as is, over the back-off's 60 s cap
				spotifyError(w, 429, "rate_limited", "API rate limit exceeded")
			},
			wantStatus: 429, wantBody: `{"error":"rate_limited","error_description":"API rate limit exceeded"}`, wantRetryAfter: "120",
		},
		{
			name: "429 without a body",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Retry-After", "30")
				w.WriteHeader(429)
			},
			wantStatus: 429, wantError: "temporarily_unavailable", wantRetryAfter: "30",
		},
		{
			name: "429 with a text body",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Retry-After", "5")
				http.Error(w, "Too Many Requests", 429)
			},
			wantStatus: 429, wantError: "temporarily_unavailable", wantRetryAfter: "5",
		},
		{
			name: "503 with a JSON body and Retry-After",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				w.Header().Set("Retry-After", "120")
				spotifyError(w, 503, "temporarily_unavailable", "Service unavailable")
			},
			wantStatus: 503, wantBody: `{"error":"temporarily_unavailable","error_description":"Service unavailable"}`, wantRetryAfter: "120",
		},
		{
			name: "invalid_client",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				spotifyError(w, 400, "invalid_client", "Invalid client secret")
			},
			wantStatus: 400, wantBody: `{"error":"invalid_client","error_description":"Invalid client secret"}`,
		},
		{
			name: "headers slower than SPOTIFY_TIMEOUT",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				<-r.Context().Done() // until the service gives up
			},
			wantStatus: 504, wantError: "server_error", wantLog: "spotify did not answer in time",
		},
		{
			name: "body slower than SPOTIFY_TIMEOUT",
			answer: func(w http.ResponseWriter, r *http.Request, form url.Values) {
				io.WriteString(w, `{"access_token":`)
				http.NewResponseController(w).Flush()
				<-r.Context().Done()
			},
			wantStatus: 504, wantError: "server_error", wantLog: "spotify did not answer in time",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			for _, path := range []string{tokenPath, refreshPath} {
				// A service for each: a 429 holds the next call back.
				svc := startService(t, tt.answer, map[string]string{"SPOTIFY_TIMEOUT": "200ms"})
				got := send(t, "POST", svc.url+path, formType, "code=AQDfault&refresh_token=AQBfault")
				if tt.wantError != "" {
					checkError(t, "POST "+path, got, tt.wantStatus, tt.wantError)
				} else if checkJSON(t, "POST "+path, got); got.status != tt.wantStatus || got.body != tt.wantBody {
					t.Errorf("POST %s = %d %s, want %d %s", path, got.status, got.body, tt.wantStatus, tt.wantBody)
				}
				if ra := got.header.Get("Retry-After"); ra != tt.wantRetryAfter {
					t.Errorf("POST %s: Retry-After = %q, want %q", path, ra, tt.wantRetryAfter)
				}
				if !strings.Contains(svc.log.String(), tt.wantLog) {
					t.Errorf("the log does not hold %q:\n%s", tt.wantLog, svc.log)
				}
				// A code is single-use: a failed exchange is never retried.
				if n := len(svc.spotify.received()); n != 1 {
					t.Errorf("POST %s: Spotify received %d requests, want 1 (no retry)", path, n)
				}
			}
		})
	}
}

// refusedAddr returns a loopback address where nothing listens, below the
// ephemeral ports (32768 and up on Linux), so that no other test's listener
// on port 0 can take it meanwhile, as it could take a port just closed.
func refusedAddr(t testing.TB) string {
	for port := 20000; port < 32768; port++ {
		addr := "127.0.0.1:" + strconv.Itoa(port)
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			return addr
		}
		conn.Close()
	}
	t.Fatal("no loopback port below 32768 refuses connections")
	return ""
}

func TestSpotifyDown(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://" + refusedAddr(t)})
	for _, path := range []string{tokenPath, refreshPath} {
		got := send(t, "POST", svc.url+path, formType, "code=AQDdown&refresh_token=AQBdown")
		checkError(t, "POST "+path, got, 502, "server_error")
	}
	if !strings.Contains(svc.log.String(), "connection refused") {
		t.Errorf("the log does not say why Spotify could not be reached:\n%s", svc.log)
	}
}

// TestConcurrentClients checks that each of 200 clients at once gets the
// answer to its own code.
func TestConcurrentClients(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, nil)
	const clients = 200
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code := fmt.Sprintf("AQDclient%03d", i)
			got := send(t, "POST", svc.url+tokenPath, noneType, "code="+code)
			if want := tokenJSON("at-"+code, "rt-"+code); got.status != 200 || got.body != want {
				t.Errorf("client %d: POST /api/token = %d %s, want 200 %s", i, got.status, got.body, want)
			}
		}()
	}
	wg.Wait()
	forms := svc.spotify.received()
	seen := make(map[string]bool)
	for _, f := range forms {
		seen[f] = true
	}
	for i := range clients {
		want := fmt.Sprintf("grant_type=authorization_code&code=AQDclient%03d&redirect_uri=testapp%%3A%%2F%%2Fcallback", i)
		if !seen[want] {
			t.Errorf("Spotify never received %q", want)
		}
	}
	if len(forms) != clients {
		t.Errorf("Spotify received %d requests, want %d", len(forms), clients)
	}
}

// TestLogsHoldNoSecrets runs exchanges, refreshes and failures, with sealing
// on, and checks the log: one line per request, X-Request-Id kept, and no
// code, token or secret anywhere.
func TestLogsHoldNoSecrets(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"ENCRYPTION_SECRET": testSecret})
	swap := send(t, "POST", svc.url+tokenPath, noneType, "code=AQDsecretcode", "X-Request-Id", "req-swap-1")
	var tokens struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	if err := json.Unmarshal([]byte(swap.body), &tokens); err != nil || swap.status != 200 {
		t.Fatalf("POST /api/token = %d %s", swap.status, swap.body)
	}
	if got := send(t, "POST", svc.url+refreshPath, formType, "refresh_token="+tokens.RefreshToken, "X-Request-Id", "req-refresh-2"); got.status != 200 {
		t.Fatalf("POST /api/refresh_token = %d %s, want 200", got.status, got.body)
	}
	send(t, "POST", svc.url+tokenPath, jsonType, `{"code":"AQDjsoncode"}`)
	send(t, "POST", svc.url+refreshPath, formType, "refresh_token=AQBrawtoken")
	send(t, "POST", svc.url+tokenPath, formType, "code=AQDtwice&code=AQDtwice")
	send(t, "GET", svc.url+tokenPath+"?code=AQDinquery", noneType, "")
	// Clients that send credentials of their own: none may be logged.
	send(t, "POST", svc.url+tokenPath, formType, "code=AQDbasic", "Authorization", "Basic Y2xpZW50OmNsaWVudC1zZWNyZXQtMTIz")
	send(t, "POST", svc.url+refreshPath+"?access_token=BQDinquery", formType, "refresh_token=x", "Authorization", "Bearer BQDbearer-token")
	// A code, and a sealed token, in the path.
	inPath := "AQDinpath" + strings.Repeat("x", 200)
	send(t, "POST", svc.url+tokenPath+"/"+inPath, formType, "")
	send(t, "GET", svc.url+"/refresh/"+tokens.RefreshToken+"/x", noneType, "")
	// Rare error paths, which must not quote what was sent: Spotify refusing
	// a code, a bad %-escape in a token, a token that is not a JSON string.
	for _, r := range []reply{
		send(t, "POST", svc.url+tokenPath, formType, "code=usedAQDrefused&code_verifier=PKCEverifier"),
		send(t, "POST", svc.url+refreshPath, formType, "refresh_token=AQBescape%zz"),
		send(t, "POST", svc.url+refreshPath, jsonType, `{"refresh_token":["AQBarray"]}`),
		send(t, "POST", svc.url+tokenPath, jsonType, `{"code":{"c":"AQDobject"}}`),
	} {
		for _, secret := range []string{"AQDrefused", "PKCEverifier", "AQBescape", "AQBarray", "AQDobject"} {
			if r.status/100 != 4 || strings.Contains(r.body, secret) {
				t.Errorf("answer %d %s: want a 4xx that does not quote %q", r.status, r.body, secret)
			}
		}
	}
	svc.close()

	log := svc.log.String()
	secrets := []string{
		"AQDsecretcode", "rt-AQDsecretcode", "at-AQDsecretcode", tokens.RefreshToken, "at-from-rt-AQDsecretcode",
		"AQBrawtoken", "AQDtwice", "AQDinquery", "AQDjsoncode", "AQDbasic", "Y2xpZW50OmNsaWVudC1zZWNyZXQtMTIz",
		"BQDbearer-token", "BQDinquery", "AQDinpath", "AQDrefused", "PKCEverifier", "AQBescape", "AQBarray", "AQDobject",
		testClientSecret, testAuthorization, strings.TrimPrefix(testAuthorization, "Basic "), testSecret,
	}
	for _, s := range secrets {
		if strings.Contains(log, s) {
			t.Errorf("the log holds %q:\n%s", s, log)
		}
	}
	lines := strings.Split(strings.TrimSpace(log), "\n")
	if len(lines) != 14 {
		t.Errorf("the log has %d lines, want one per request (14):\n%s", len(lines), log)
	}
	if got, want := logLines(t, log)[9].Path, fmt.Sprintf("/refresh/(%d characters)/x", len(tokens.RefreshToken)); got != want {
		t.Errorf("a path with a token in it is logged as %q, want %q", got, want)
	}
	var first struct {
		Method        string `json:"method"`
		Path          string `json:"path"`
		Status        int    `json:"status"`
		SpotifyStatus int    `json:"spotify_status"`
		RequestID     string `json:"request_id"`
	}
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatalf("log line %q: %v", lines[0], err)
	}
	if first.Method != "POST" || first.Path != tokenPath || first.Status != 200 || first.SpotifyStatus != 200 || first.RequestID != "req-swap-1" {
		t.Errorf("first log line = %+v, want POST /api/token 200, Spotify 200, request ID req-swap-1", first)
	}
}

// TestFailuresLogNoSecrets checks that when the call to Spotify fails, the
// log says why without the code, the refresh token or the credentials.
func TestFailuresLogNoSecrets(t *testing.T) {
	t.Parallel()
	faults := map[string]spotifyFunc{
		"reset": func(w http.ResponseWriter, r *http.Request, form url.Values) {
			conn, _, _ := http.NewResponseController(w).Hijack()
			conn.(*net.TCPConn).SetLinger(0)
			conn.Close()
		},
		"timeout": func(w http.ResponseWriter, r *http.Request, form url.Values) { <-r.Context().Done() },
		"HTML": func(w http.ResponseWriter, r *http.Request, form url.Values) {
			w.WriteHeader(500)
			io.WriteString(w, "<html>"+form.Encode()+"</html>") // Spotify echoing what it got
		},
		"truncated": func(w http.ResponseWriter, r *http.Request, form url.Values) {
			w.Header().Set("Content-Length", "100")
			io.WriteString(w, `{"access_token":"`)
		},
		"unreachable": likeSpotify,
	}
	for name, fault := range faults {
		env := map[string]string{"SPOTIFY_TIMEOUT": "100ms", "ENCRYPTION_SECRET": testSecret}
		if name == "unreachable" {
			env["SPOTIFY_ACCOUNTS_URL"] = "http://" + refusedAddr(t)
		}
		svc := startService(t, fault, env)
		sealed := newTestSealer(t, testSecret).seal("AQBraw-" + name)
		send(t, "POST", svc.url+tokenPath, formType, "code=AQDcode-"+name+"&code_verifier=verifier-"+name)
		got := send(t, "POST", svc.url+refreshPath, formType, "refresh_token="+sealed)
		if got.status < 500 {
			t.Errorf("%s: refresh = %d, want a 5xx", name, got.status)
		}
		svc.close()
		log := svc.log.String()
		for _, secret := range []string{"AQDcode-" + name, "verifier-" + name, "AQBraw-" + name, sealed, testClientSecret, strings.TrimPrefix(testAuthorization, "Basic "), testSecret} {
			if strings.Contains(log, secret) {
				t.Errorf("%s: the log holds %q:\n%s", name, secret, log)
			}
		}
		for _, l := range logLines(t, log) {
			if l.Reason == "" || l.Level != "WARN" {
				t.Errorf("%s: log line %+v, want a WARN that says why", name, l)
			}
			if name == "timeout" && l.DurationUS < 100_000 {
				t.Errorf("timeout after SPOTIFY_TIMEOUT=100ms logged duration_us %d, want at least 100000 (microseconds)", l.DurationUS)
			}
		}
	}
}

func TestCORS(t *testing.T) {
	t.Parallel()
	const page = "https://app.example.com"
	corsHeaders := func(h http.Header) []string {
		var names []string
		for name := range h {
			if strings.HasPrefix(name, "Access-Control-") {
				names = append(names, name)
			}
		}
		slices.Sort(names)
		return names
	}
	t.Run("unset: no CORS headers", func(t *testing.T) {
		t.Parallel()
		svc := startService(t, likeSpotify, nil)
		got := send(t, "POST", svc.url+tokenPath, formType, "code=a", "Origin", page)
		if names := corsHeaders(got.header); len(names) != 0 || got.header.Get("Vary") != "" {
			t.Errorf("POST with Origin: CORS headers %v, Vary %q, want none", names, got.header.Get("Vary"))
		}
		got = send(t, "OPTIONS", svc.url+tokenPath, noneType, "", "Origin", page, "Access-Control-Request-Method", "POST")
		checkError(t, "preflight", got, 403, "invalid_request")
		if names := corsHeaders(got.header); len(names) != 0 || !strings.Contains(got.body, "CORS_ALLOWED_ORIGINS is not set") {
			t.Errorf("preflight: CORS headers %v, body %s; want none, and a body saying CORS is off", names, got.body)
		}
		// An OPTIONS that is no preflight is a method not allowed.
		checkError(t, "OPTIONS", send(t, "OPTIONS", svc.url+tokenPath, noneType, ""), 405, "invalid_request")
	})
	t.Run("listed origins", func(t *testing.T) {
		t.Parallel()
		svc := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": "http://127.0.0.1:5173, " + page})
		for _, path := range []string{tokenPath, refreshPath} {
			got := send(t, "OPTIONS", svc.url+path, noneType, "",
				"Origin", page, "Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "content-type")
			want := map[string]string{
				"Access-Control-Allow-Origin":  page,
				"Access-Control-Allow-Methods": "POST, OPTIONS",
				"Access-Control-Allow-Headers": "Content-Type, X-Request-Id",
				"Access-Control-Max-Age":       "7200",
				"Vary":                         "Origin",
			}
			for name, value := range want {
				if got.header.Get(name) != value {
					t.Errorf("preflight %s: %s = %q, want %q", path, name, got.header.Get(name), value)
				}
			}
			if got.status != 204 || got.body != "" {
				t.Errorf("preflight %s = %d %q, want 204 and no body", path, got.status, got.body)
			}
		}
		// The page must be able to read a 404 for an unclean path too, and
		// its preflight is answered like any other.
		got := send(t, "POST", svc.url+"/"+tokenPath, jsonType, `{}`, "Origin", page)
		checkError(t, "POST //api/token from the page", got, 404, "not_found")
		if got.header.Get("Access-Control-Allow-Origin") != page {
			t.Errorf("POST //api/token from %s: Access-Control-Allow-Origin = %q, want %s", page, got.header.Get("Access-Control-Allow-Origin"), page)
		}
		if got := send(t, "OPTIONS", svc.url+"/"+tokenPath, noneType, "", "Origin", page, "Access-Control-Request-Method", "POST"); got.status != 204 {
			t.Errorf("preflight for //api/token from %s = %d, want 204", page, got.status)
		}
		if got := send(t, "GET", svc.url+"/healthz", noneType, ""); got.header.Get("Vary") != "Origin" {
			t.Errorf("GET /healthz without Origin: Vary = %q, want Origin: a cache must not reuse it for a page", got.header.Get("Vary"))
		}
		got = send(t, "POST", svc.url+tokenPath, jsonType, `{"code":"AQDweb"}`, "Origin", page)
		if got.status != 200 || got.header.Get("Access-Control-Allow-Origin") != page || got.header.Get("Vary") != "Origin" {
			t.Errorf("POST from %s = %d, Allow-Origin %q, Vary %q; want 200, %s, Origin", page, got.status,
				got.header.Get("Access-Control-Allow-Origin"), got.header.Get("Vary"), page)
		}
		if got.header.Get("Access-Control-Expose-Headers") != "Retry-After, X-Request-Id" {
			t.Errorf("POST from %s: Access-Control-Expose-Headers = %q, want Retry-After, X-Request-Id", page, got.header.Get("Access-Control-Expose-Headers"))
		}
		// The page must be able to read the error, too.
		got = send(t, "POST", svc.url+tokenPath, jsonType, `{}`, "Origin", "http://127.0.0.1:5173")
		checkError(t, "POST without code", got, 400, "invalid_request")
		if got.header.Get("Access-Control-Allow-Origin") != "http://127.0.0.1:5173" {
			t.Errorf("error answer: Access-Control-Allow-Origin = %q, want http://127.0.0.1:5173", got.header.Get("Access-Control-Allow-Origin"))
		}
		// Exactly these headers: no credentials, nothing else.
		pre := send(t, "OPTIONS", svc.url+tokenPath, noneType, "", "Origin", page, "Access-Control-Request-Method", "POST")
		post := send(t, "POST", svc.url+tokenPath, formType, "code=a", "Origin", page)
		if got, want := strings.Join(corsHeaders(pre.header), " "), "Access-Control-Allow-Headers Access-Control-Allow-Methods Access-Control-Allow-Origin Access-Control-Max-Age"; got != want {
			t.Errorf("preflight from %s: CORS headers %s, want exactly %s", page, got, want)
		}
		if got, want := strings.Join(corsHeaders(post.header), " "), "Access-Control-Allow-Origin Access-Control-Expose-Headers"; got != want {
			t.Errorf("POST from %s: CORS headers %s, want exactly %s", page, got, want)
		}
		// An OPTIONS that is no preflight, from an allowed origin, is a
		// method not allowed.
		got = send(t, "OPTIONS", svc.url+tokenPath, noneType, "", "Origin", page)
		checkError(t, "OPTIONS without Access-Control-Request-Method from "+page, got, 405, "invalid_request")
		if got.header.Get("Allow") != "POST" {
			t.Errorf("OPTIONS that is no preflight: Allow %q, want POST", got.header.Get("Allow"))
		}
		// Only an origin exactly as listed: no prefix, suffix or substring.
		for _, other := range []string{"https://evil.example", "https://app.example.com.evil.example", "null", "HTTPS://APP.EXAMPLE.COM",
			"https://app.example.co", "https://app.example.com:443", "http://127.0.0.1:51", "http://127.0.0.1:51730", "https://app", "http://app.example.com",
			"https://app.example.com/", "https://app.example.com.", "https://app.example.com/x"} {
			got = send(t, "POST", svc.url+tokenPath, formType, "code=a", "Origin", other)
			if names := corsHeaders(got.header); len(names) != 0 {
				t.Errorf("POST from %s: CORS headers %v, want none", other, names)
			}
			got = send(t, "OPTIONS", svc.url+tokenPath, noneType, "", "Origin", other, "Access-Control-Request-Method", "POST")
			checkError(t, "preflight from "+other, got, 403, "invalid_request")
			if names := corsHeaders(got.header); len(names) != 0 || !strings.Contains(got.body, other) {
				t.Errorf("preflight from %s: CORS headers %v, body %s; want none, and a body naming the origin", other, names, got.body)
			}
		}
	})
	t.Run("one origin", func(t *testing.T) {
		t.Parallel()
		svc := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": page})
		for _, origin := range []string{page, "https://evil.example", ""} {
			got := send(t, "POST", svc.url+tokenPath, formType, "code=a", "Origin", origin)
			if got.header.Get("Vary") != "Origin" || (got.header.Get("Access-Control-Allow-Origin") == page) != (origin == page) {
				t.Errorf("POST from %q: Vary %q, Allow-Origin %q; want Vary: Origin, and the page allowed alone", origin, got.header.Get("Vary"), got.header.Get("Access-Control-Allow-Origin"))
			}
		}
	})
	t.Run("any origin", func(t *testing.T) {
		t.Parallel()
		svc := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": "*"})
		got := send(t, "POST", svc.url+refreshPath, formType, "refresh_token=AQB", "Origin", "https://anything.example")
		if got.header.Get("Access-Control-Allow-Origin") != "*" || got.header.Get("Vary") != "" || got.header.Get("Access-Control-Expose-Headers") != "Retry-After, X-Request-Id" {
			t.Errorf("POST: Allow-Origin %q, Vary %q, Expose-Headers %q; want *, no Vary, and Retry-After, X-Request-Id exposed",
				got.header.Get("Access-Control-Allow-Origin"), got.header.Get("Vary"), got.header.Get("Access-Control-Expose-Headers"))
		}
		got = send(t, "OPTIONS", svc.url+refreshPath, noneType, "", "Origin", "https://anything.example", "Access-Control-Request-Method", "POST")
		if got.status != 204 || got.header.Get("Access-Control-Allow-Origin") != "*" {
			t.Errorf("preflight = %d with Allow-Origin %q, want 204 with *", got.status, got.header.Get("Access-Control-Allow-Origin"))
		}
		// A request without Origin is no browser's: no CORS headers.
		if names := corsHeaders(send(t, "POST", svc.url+tokenPath, formType, "code=a").header); len(names) != 0 {
			t.Errorf("POST without Origin: CORS headers %v, want none", names)
		}
		got = send(t, "OPTIONS", svc.url+tokenPath, noneType, "", "Access-Control-Request-Method", "POST")
		checkError(t, "preflight without Origin", got, 403, "invalid_request")
	})
}

// TestSealing checks that with ENCRYPTION_SECRET set, clients hold sealed
// refresh tokens only, and Spotify gets raw ones only.
func TestSealing(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"ENCRYPTION_SECRET": testSecret})
	s := newTestSealer(t, testSecret)
	sealedIn := func(r reply) string {
		t.Helper()
		var answer struct {
			RefreshToken string `json:"refresh_token"`
		}
		if err := json.Unmarshal([]byte(r.body), &answer); err != nil || r.status != 200 {
			t.Fatalf("answer %d %s, want 200 with a JSON body", r.status, r.body)
		}
		return answer.RefreshToken
	}

	first := send(t, "POST", svc.url+tokenPath, noneType, "code=AQDseal")
	sealed := sealedIn(first)
	if raw, err := s.open(sealed); err != nil || raw != "rt-AQDseal" {
		t.Fatalf("refresh token %q opens to %q, %v; want the sealed rt-AQDseal", sealed, raw, err)
	}
	if want := tokenJSON("at-AQDseal", sealed); first.body != want {
		t.Errorf("POST /api/token = %s, want Spotify's answer with only the refresh token sealed: %s", first.body, want)
	}
	if again := sealedIn(send(t, "POST", svc.url+tokenPath, noneType, "code=AQDseal")); again == sealed {
		t.Errorf("two swaps of one code gave the same sealed token %q, want a fresh nonce each", sealed)
	}

	for _, path := range []string{refreshPath, tokenPath} {
		got := send(t, "POST", svc.url+path, formType, "grant_type=refresh_token&refresh_token="+sealed)
		if want := tokenJSON("at-from-rt-AQDseal", ""); got.status != 200 || got.body != want {
			t.Errorf("refresh at %s = %d %s, want 200 %s (no refresh token added)", path, got.status, got.body, want)
		}
	}
	rotated := send(t, "POST", svc.url+refreshPath, formType, "refresh_token="+s.seal("rotate-1"))
	if raw, err := s.open(sealedIn(rotated)); err != nil || raw != "rotated-rotate-1" {
		t.Errorf("rotated refresh token in %s opens to %q, %v; want the sealed rotated-rotate-1", rotated.body, raw, err)
	}
	if got := send(t, "POST", svc.url+tokenPath, formType, "code=used"); got.status != 400 ||
		got.body != `{"error":"invalid_grant","error_description":"Invalid authorization code"}` {
		t.Errorf("POST /api/token code=used = %d %s, want Spotify's error untouched", got.status, got.body)
	}
	want := []string{
		"grant_type=authorization_code&code=AQDseal&redirect_uri=testapp%3A%2F%2Fcallback",
		"grant_type=authorization_code&code=AQDseal&redirect_uri=testapp%3A%2F%2Fcallback",
		"grant_type=refresh_token&refresh_token=rt-AQDseal",
		"grant_type=refresh_token&refresh_token=rt-AQDseal",
		"grant_type=refresh_token&refresh_token=rotate-1",
		"grant_type=authorization_code&code=used&redirect_uri=testapp%3A%2F%2Fcallback",
	}
	if got := svc.spotify.received(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("Spotify received\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestSealedTokensThatDoNotOpen checks that every refresh token that does not
// open gets the same answer, and never reaches Spotify.
func TestSealedTokensThatDoNotOpen(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"ENCRYPTION_SECRET": testSecret})
	sealed := newTestSealer(t, testSecret).seal("AQBgood")
	tampered := []byte(sealed)
	tampered[len(tampered)/2] ^= 'A' ^ 'B'
	bad := map[string]string{
		"raw Spotify token":        "AQBgood",
		"tampered":                 string(tampered),
		"truncated":                sealed[:len(sealed)-2],
		"sealed under another key": newTestSealer(t, "some-other-secret-of-32-characters!!").seal("AQBgood"),
		"garbage":                  "v1.%%%%",
		"prefix only":              sealPrefix,
	}
	var first reply
	for name, token := range bad {
		for _, path := range []string{refreshPath, tokenPath} {
			got := send(t, "POST", svc.url+path, formType, "grant_type=refresh_token&refresh_token="+url.QueryEscape(token))
			checkError(t, name+" at "+path, got, 400, "invalid_grant")
			if first.body == "" {
				first = got
			}
			if got.status != first.status || got.body != first.body {
				t.Errorf("%s at %s = %d %s, want the same answer as every other: %d %s", name, path, got.status, got.body, first.status, first.body)
			}
		}
	}
	if n := len(svc.spotify.received()); n != 0 {
		t.Errorf("Spotify received %d requests, want none", n)
	}
}

// TestSecretRotationAcrossDeploys checks that a token sealed before a secret
// is rotated still refreshes after, and that the new secret seals.
func TestSecretRotationAcrossDeploys(t *testing.T) {
	t.Parallel()
	const newSecret = "the-new-encryption-secret-0123456789"
	before := startService(t, likeSpotify, map[string]string{"ENCRYPTION_SECRET": testSecret})
	// Spaces around the items, as an operator writes a list: each secret is trimmed.
	after := startService(t, likeSpotify, map[string]string{"ENCRYPTION_SECRET": " " + newSecret + " , " + testSecret + " "})

	var answer struct {
		RefreshToken string `json:"refresh_token"`
	}
	json.Unmarshal([]byte(send(t, "POST", before.url+tokenPath, noneType, "code=AQDbefore").body), &answer)
	got := send(t, "POST", after.url+refreshPath, formType, "refresh_token="+answer.RefreshToken)
	if want := tokenJSON("at-from-rt-AQDbefore", ""); got.status != 200 || got.body != want {
		t.Errorf("refresh after rotation = %d %s, want 200 %s", got.status, got.body, want)
	}
	json.Unmarshal([]byte(send(t, "POST", after.url+tokenPath, noneType, "code=AQDnew").body), &answer)
	if raw, err := newTestSealer(t, newSecret).open(answer.RefreshToken); err != nil || raw != "rt-AQDnew" {
		t.Errorf("token sealed after rotation opens under the new secret to %q, %v; want rt-AQDnew", raw, err)
	}
}

// parse runs readParams on a request with the given Content-Type and body.
func parse(contentType, body string) (params, *apiError) {
	r := httptest.NewRequest("POST", tokenPath, strings.NewReader(body))
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
	}
	return readParams(httptest.NewRecorder(), r)
}

// FuzzRequestBody checks that reading a request body never panics and
// follows every rule the parser has: 415 for a media type that is neither
// form nor JSON, 413 over the size limit, the JSON hint for a form body
// that is JSON, and otherwise agreement with the standard library's
// parsers, a field sent twice refused, each field returned exactly as sent.
func FuzzRequestBody(f *testing.F) {
	f.Add("", "code=AQDios-code_123")
	f.Add(formType, "client_id=abc&grant_type=refresh_token&refresh_token=AQBios")
	f.Add(formType+"; charset=UTF-8", "grant_type=authorization_code&code=AQD&redirect_uri=testapp%3A%2F%2Fcallback&code_verifier=Vx9-._~&client_id=abc")
	f.Add(jsonType, `{"code":"AQDweb","redirect_uri":"https://app.example.com/callback"}`)
	f.Add(jsonType+"; charset=utf-8", `{"refresh_token":"AQB\u00e9\ud83c\udfb5","extra":[1,{"a":null}]}`)
	f.Add(formType, "code=a&code=b")
	f.Add(jsonType, `{"code":"a","code":"b"}`)
	f.Add(jsonType, `{"code":null,"\u0063ode":"b"}`)
	f.Add(formType, "code=%zz&state=%")
	f.Add(formType, "code=(null)&a;b=c&&=x&refresh_token")
	f.Add("text/plain", "code=a")
	f.Add("", " \n{")
	f.Add("APPLICATION/JSON", `{"code":1}`)
	fields := []string{"grant_type", "code", "redirect_uri", "code_verifier", "refresh_token"}
	f.Fuzz(func(t *testing.T, contentType, body string) {
		p, apiErr := parse(contentType, body)
		got := func(name string) string { v, _ := p.field(name); return *v }
		absent := func(v string) string {
			if v == "(null)" {
				return ""
			}
			return v
		}
		refused := func(status int, why string) {
			if apiErr == nil || apiErr.status != status {
				t.Errorf("parse(%q, %q) = %v, want %d: %s", contentType, body, apiErr, status, why)
			}
		}
		media := mediaType(contentType)
		switch {
		case media != "" && media != formType && media != jsonType:
			refused(415, "the media type is neither form nor JSON")
		case len(body) > 64<<10:
			refused(413, "the body is over the limit")
		case media != jsonType && strings.HasPrefix(strings.TrimLeft(body, " \t\r\n"), "{"):
			refused(400, "a form body that is JSON")
			if apiErr != nil && !strings.Contains(apiErr.description, "Content-Type: application/json") {
				t.Errorf("parse(%q, %q) = %v, want the hint to send it as JSON", contentType, body, apiErr)
			}
		case media == jsonType:
			var obj map[string]any
			if err := json.Unmarshal([]byte(body), &obj); err != nil || obj == nil {
				if apiErr == nil {
					t.Errorf("parse(%q) succeeded; encoding/json says: %v", body, err)
				}
				return
			}
			// encoding/json keeps the last of a key sent twice: count them.
			seen := map[string]int{}
			dec := json.NewDecoder(strings.NewReader(body))
			for dec.Token(); dec.More(); {
				key, _ := dec.Token()
				var value json.RawMessage
				dec.Decode(&value)
				seen[key.(string)]++
			}
			bad := false
			for _, name := range fields {
				want, isString := obj[name].(string)
				bad = bad || seen[name] > 1 || obj[name] != nil && !isString
				if apiErr == nil && got(name) != absent(want) {
					t.Errorf("parse(%q): %s = %q, want %q", body, name, got(name), absent(want))
				}
			}
			if (apiErr != nil) != bad {
				t.Errorf("parse(%q) = %v; want refused: %v (a field it reads sent twice, or not a string)", body, apiErr, bad)
			}
		case !strings.Contains(body, ";"): // url.ParseQuery refuses semicolons
			form, err := url.ParseQuery(body)
			if err != nil {
				if apiErr == nil {
					t.Errorf("parse(%q) succeeded; url.ParseQuery says: %v", body, err)
				}
				return
			}
			twice := false
			for _, name := range fields {
				twice = twice || len(form[name]) > 1
				if apiErr == nil && got(name) != absent(form.Get(name)) {
					t.Errorf("parse(%q): %s = %q, want %q", body, name, got(name), absent(form.Get(name)))
				}
			}
			if (apiErr != nil) != twice {
				t.Errorf("parse(%q) = %v; a field sent twice: %v", body, apiErr, twice)
			}
		}

		// Any value, encoded by a client, must come back exactly.
		if len(body) > maxBodyBytes/8 || body == "(null)" {
			return
		}
		p, apiErr = parse(formType, "grant_type=refresh_token&refresh_token="+url.QueryEscape(body)+"&client_id=x")
		if apiErr != nil || p.refreshToken != body || p.grantType != "refresh_token" {
			t.Errorf("form with refresh_token %q: got %q, %v", body, p.refreshToken, apiErr)
		}
		if utf8.ValidString(body) {
			encoded, _ := json.Marshal(map[string]string{"code": body, "state": body})
			if p, apiErr = parse(jsonType, string(encoded)); apiErr != nil || p.code != body {
				t.Errorf("JSON with code %q: got %q, %v", body, p.code, apiErr)
			}
		}
	})
}

// browserPage calls the service from another origin with fetch, as a static
// web app does, and posts what it saw back to /result.
const browserPage = `<!doctype html>
<title>token swap from a browser</title>
<script>
async function call(base, path, body) {
  const r = await fetch(base + path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  return {status: r.status, body: await r.json(), retryAfter: r.headers.get("Retry-After")};
}
(async () => {
  const out = {};
  try {
    out.swap = await call("SERVICE", "/api/token", {code: "AQDbrowser"});
    out.refresh = await call("SERVICE", "/api/refresh_token", {refresh_token: out.swap.body.refresh_token});
    out.missing = await call("SERVICE", "/api/token", {});
    out.limited = await call("LIMITED", "/api/token", {code: "AQDlimited"});
    try {
      await call("BLOCKED", "/api/token", {code: "AQDblocked"});
      out.blocked = "not blocked";
    } catch (e) {
      out.blocked = "blocked: " + e.name;
    }
  } catch (e) {
    out.failure = String(e);
  }
  await fetch("/result", {method: "POST", body: JSON.stringify(out)});
})();
</script>`

// TestBrowser runs browserPage in headless Chromium: the code exchange, the
// refresh with a sealed token, an error and a 429 read by the page, and an
// origin that is not allowed, blocked by the browser. Without Chromium it is
// skipped, unless TOKENSWAP_BROWSER=required (as .ci/run sets).
func TestBrowser(t *testing.T) {
	t.Parallel()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		if os.Getenv("TOKENSWAP_BROWSER") == "required" {
			t.Fatalf("TOKENSWAP_BROWSER=required, but: %v", err)
		}
		t.Skip("no chromium on PATH (apt-get install chromium): the browser check is skipped")
	}
	var html atomic.Value // the page names the services, which must know its origin first
	results := make(chan string, 1)
	page := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/":
			w.Header().Set("Content-Type", "text/html")
			io.WriteString(w, html.Load().(string))
		case "/result":
			b, _ := io.ReadAll(r.Body)
			results <- string(b)
		default:
			http.NotFound(w, r)
		}
	}))
	defer page.Close()
	svc := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": page.URL, "ENCRYPTION_SECRET": testSecret})
	limited := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		w.Header().Set("Retry-After", "7")
		w.WriteHeader(429)
	}, map[string]string{"CORS_ALLOWED_ORIGINS": page.URL})
	blocked := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com"})
	html.Store(strings.NewReplacer("SERVICE", svc.url, "LIMITED", limited.url, "BLOCKED", blocked.url).Replace(browserPage))

	var output syncBuffer
	browser := exec.Command(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-sync",
		"--disable-background-networking", "--disable-component-update", "--no-first-run",
		"--user-data-dir="+t.TempDir(), page.URL)
	browser.Stdout, browser.Stderr = &output, &output
	if err := browser.Start(); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	defer browser.Wait()
	defer browser.Process.Kill()

	var got struct {
		Swap, Refresh, Missing, Limited struct {
			Status     int
			Body       map[string]any
			RetryAfter string
		}
		Blocked, Failure string
	}
	select {
	case r := <-results:
		if err := json.Unmarshal([]byte(r), &got); err != nil {
			t.Fatalf("the page posted %q: %v", r, err)
		}
	case <-time.After(60 * time.Second): // a bound, should Chromium hang
		t.Fatalf("no result from the page within 60 s; chromium said:\n%s", output.String())
	}
	if got.Failure != "" {
		t.Fatalf("the page failed: %s", got.Failure)
	}
	sealed, _ := got.Swap.Body["refresh_token"].(string)
	if got.Swap.Status != 200 || got.Swap.Body["access_token"] != "at-AQDbrowser" || !strings.HasPrefix(sealed, sealPrefix) {
		t.Errorf("swap from the page = %d %v, want 200 with at-AQDbrowser and a sealed refresh token", got.Swap.Status, got.Swap.Body)
	}
	if got.Refresh.Status != 200 || got.Refresh.Body["access_token"] != "at-from-rt-AQDbrowser" {
		t.Errorf("refresh from the page = %d %v, want 200 with at-from-rt-AQDbrowser", got.Refresh.Status, got.Refresh.Body)
	}
	if got.Missing.Status != 400 || got.Missing.Body["error"] != "invalid_request" {
		t.Errorf("swap without a code from the page = %d %v, want 400 invalid_request readable by the page", got.Missing.Status, got.Missing.Body)
	}
	if got.Limited.Status != 429 || got.Limited.Body["error"] != "temporarily_unavailable" || got.Limited.RetryAfter != "7" {
		t.Errorf("rate-limited swap from the page = %d %v, Retry-After %q; want 429 temporarily_unavailable, 7", got.Limited.Status, got.Limited.Body, got.Limited.RetryAfter)
	}
	if got.Blocked != "blocked: TypeError" {
		t.Errorf("call to a service that does not allow the page's origin: %q, want blocked: TypeError", got.Blocked)
	}
	if n := len(blocked.spotify.received()); n != 0 {
		t.Errorf("the service that does not allow the page's origin called Spotify %d times, want 0 (the preflight fails)", n)
	}
}

// benchmarkSwap measures one request through the whole handler stack, logging
// included, against a Spotify on loopback that answers at once with tokens
// of Spotify's sizes.
func benchmarkSwap(b *testing.B, path, body string, env map[string]string) {
	answer := []byte(`{"access_token":"BQ` + strings.Repeat("a", 240) + `","token_type":"Bearer","expires_in":3600,"refresh_token":"AQ` +
		strings.Repeat("r", 129) + `","scope":"user-read-email user-read-private"}`)
	spotify := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Write(answer)
	}))
	defer spotify.Close()
	cfg := testConfig(b, spotify.URL, env)
	handler := wire(cfg, slog.New(slog.NewJSONHandler(io.Discard, nil)), testSpotifyClient(cfg))
	b.ReportAllocs()
	for b.Loop() {
		r := httptest.NewRequest("POST", path, strings.NewReader(body))
		r.Header.Set("Content-Type", formType)
		w := httptest.NewRecorder()
		handler.ServeHTTP(w, r)
		if w.Code != 200 {
			b.Fatalf("POST %s = %d %s", path, w.Code, w.Body)
		}
	}
}

func BenchmarkTokenExchange(b *testing.B) {
	const body = "code=AQDy8Ae3-d9xwL0hzq5sWh5r0QzR6cP1fYgKxMhKNA&redirect_uri=testapp%3A%2F%2Fcallback"
	b.Run("plain", func(b *testing.B) { benchmarkSwap(b, tokenPath, body, nil) })
	b.Run("sealed", func(b *testing.B) {
		benchmarkSwap(b, tokenPath, body, map[string]string{"ENCRYPTION_SECRET": testSecret})
	})
}

func BenchmarkRefresh(b *testing.B) {
	raw := "AQ" + strings.Repeat("r", 129)
	b.Run("plain", func(b *testing.B) {
		benchmarkSwap(b, refreshPath, "grant_type=refresh_token&refresh_token="+raw, nil)
	})
	b.Run("sealed", func(b *testing.B) {
		sealed := newTestSealer(b, testSecret).seal(raw)
		benchmarkSwap(b, refreshPath, "grant_type=refresh_token&refresh_token="+sealed, map[string]string{"ENCRYPTION_SECRET": testSecret})
	})
}

// TestBackoff checks that after Spotify's 429 with Retry-After, both
// endpoints answer 429 with the seconds left and do not call Spotify, until
// the time is up.
func TestBackoff(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	var limited atomic.Bool
	limited.Store(true)
	svc := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		if limited.Swap(false) {
			w.Header().Set("Retry-After", "7")
			spotifyError(w, 429, "rate_limited", "API rate limit exceeded")
			return
		}
		likeSpotify(w, r, form)
	}, nil, func(_ *server, c *spotifyClient) { c.now = clock.now })

	got := send(t, "POST", svc.url+tokenPath, formType, "code=AQDone")
	if got.status != 429 || got.body != `{"error":"rate_limited","error_description":"API rate limit exceeded"}` || got.header.Get("Retry-After") != "7" {
		t.Errorf("Spotify's 429 = %d %s Retry-After %q, want it relayed as is", got.status, got.body, got.header.Get("Retry-After"))
	}
	// 4.3 s left: rounded up, not to the nearest; then 4 s left: exactly 4.
	for _, at := range []struct {
		advance time.Duration
		want    string
	}{{2700 * time.Millisecond, "5"}, {300 * time.Millisecond, "4"}} {
		clock.advance(at.advance)
		for _, path := range []string{tokenPath, refreshPath} {
			got := send(t, "POST", svc.url+path, formType, "code=AQDtwo&refresh_token=AQBtwo")
			checkError(t, "POST "+path+" during the back-off", got, 429, "temporarily_unavailable")
			if ra := got.header.Get("Retry-After"); ra != at.want {
				t.Errorf("POST %s during a 7 s back-off, %v later: Retry-After = %q, want %s", path, at.advance, ra, at.want)
			}
		}
	}
	if n := len(svc.spotify.received()); n != 1 {
		t.Errorf("Spotify received %d requests, want 1: none during the back-off", n)
	}
	m := svc.server.metrics
	timed := uint64(0)
	for i := range m.spotifyDuration.counts {
		timed += m.spotifyDuration.counts[i].Load()
	}
	if calls := m.spotifyCalls[429].Load(); calls != 1 || m.spotifyCalls[0].Load() != 0 || timed != 1 {
		t.Errorf("metrics during the back-off: %d calls with 429, %d with no status, %d timed; want 1, 0, 1: calls not made are not counted",
			calls, m.spotifyCalls[0].Load(), timed)
	}
	clock.advance(4500 * time.Millisecond)
	if got := send(t, "POST", svc.url+tokenPath, formType, "code=AQDthree"); got.status != 200 {
		t.Errorf("POST after the back-off = %d %s, want 200", got.status, got.body)
	}
	svc.close()
	lines := logLines(t, svc.log.String())
	if l := lines[1]; l.Status != 429 || l.Error != "temporarily_unavailable" || !strings.Contains(l.Reason, "back off") || l.SpotifyStatus != 0 {
		t.Errorf("log line during the back-off = %+v, want 429 temporarily_unavailable, why, and no Spotify status", l)
	}
}

// TestLogSaysWhy checks that the log line of every answer that is not a
// success names the OAuth error the client got and why, in words an
// operator can act on: a client-secret reset and a user's stale code must
// not look alike.
func TestLogSaysWhy(t *testing.T) {
	t.Parallel()
	spotifyAnswers := func(w http.ResponseWriter, r *http.Request, form url.Values) {
		switch form.Get("code") {
		case "AQDreset":
			spotifyError(w, 400, "invalid_client", "Invalid client secret")
		case "AQDhtml":
			w.WriteHeader(500)
			io.WriteString(w, "<html>oops</html>")
		case "AQDdown":
			spotifyError(w, 503, "temporarily_unavailable", "Service unavailable")
		case "AQD500":
			spotifyError(w, 500, "server_error", "Internal error")
		case "AQDscope":
			w.WriteHeader(400)
			io.WriteString(w, `{"error":"invalid_scope"}`)
		case "AQDother":
			spotifyError(w, 400, "invalid_grant", "Invalid redirect URI")
		case "AQDbare":
			w.WriteHeader(418)
			io.WriteString(w, `{}`)
		case "AQD429":
			w.Header().Set("Retry-After", "5")
			spotifyError(w, 429, "temporarily_unavailable", "Too many requests")
		default:
			likeSpotify(w, r, form)
		}
	}
	tests := []struct {
		name        string
		method      string
		path        string
		contentType string
		body        string
		header      []string
		wantStatus  int
		wantError   string
		wantReason  string
		wantLevel   string
	}{
		{"client secret reset", "POST", tokenPath, formType, "code=AQDreset", nil, 400, "invalid_client", "Spotify: Invalid client secret", "INFO"},
		{"a user's stale code", "POST", tokenPath, formType, "code=used", nil, 400, "invalid_grant", "Spotify: Invalid authorization code (redirect_uri sent: testapp://callback)", "INFO"},
		{"a code for another redirect URI", "POST", tokenPath, formType, "code=AQDother&redirect_uri=https%3A%2F%2Fapp.example.com%2Fcallback", nil, 400, "invalid_grant", "Spotify: Invalid redirect URI (redirect_uri sent: https://app.example.com/callback)", "INFO"},
		{"Spotify answers HTML", "POST", tokenPath, formType, "code=AQDhtml", nil, 502, "server_error", "not a JSON object", "WARN"},
		{"Spotify's error without a description", "POST", tokenPath, formType, "code=AQDscope", nil, 400, "invalid_scope", "Spotify: invalid_scope", "INFO"},
		{"Spotify's answer with no error at all", "POST", tokenPath, formType, "code=AQDbare", nil, 418, "", "Spotify: status 418", "INFO"},
		{"Spotify's own 500, relayed", "POST", tokenPath, formType, "code=AQD500", nil, 500, "server_error", "Spotify: Internal error", "WARN"},
		{"Spotify's own 503, relayed", "POST", tokenPath, formType, "code=AQDdown", nil, 503, "temporarily_unavailable", "Spotify: Service unavailable", "WARN"},
		{"no code", "POST", tokenPath, formType, "state=x", nil, 400, "invalid_request", "code is required", "INFO"},
		{"redirect_uri refused", "POST", tokenPath, formType, "code=x&redirect_uri=evil%3A%2F%2Fcb", nil, 400, "invalid_request", "redirect_uri is not one of the callback URLs", "INFO"},
		{"field twice", "POST", refreshPath, formType, "refresh_token=a&refresh_token=b", nil, 400, "invalid_request", "refresh_token is sent more than once", "INFO"},
		{"sealed token that does not open", "POST", refreshPath, formType, "refresh_token=v1.AAAA", nil, 400, "invalid_grant", "not sealed by this service", "INFO"},
		{"grant type", "POST", tokenPath, formType, "grant_type=password", nil, 400, "unsupported_grant_type", "grant_type must be", "INFO"},
		{"media type", "POST", tokenPath, "text/plain", "code=x", nil, 415, "invalid_request", "Content-Type must be", "INFO"},
		{"wrong method", "GET", tokenPath, noneType, "", nil, 405, "invalid_request", "method GET is not allowed", "INFO"},
		{"unknown path", "GET", "/admin", noneType, "", nil, 404, "not_found", "no such endpoint", "INFO"},
		{"unknown path, logged as sent", "POST", "/api%2Ftoken", formType, "code=x", nil, 404, "not_found", "no such endpoint", "INFO"},
		{"code grant at the refresh endpoint", "POST", refreshPath, formType, "grant_type=authorization_code&code=x", nil, 400, "unsupported_grant_type", "grant_type must be refresh_token here", "INFO"},
		{"preflight from an origin not allowed", "OPTIONS", tokenPath, noneType, "", []string{"Origin", "https://evil.example", "Access-Control-Request-Method", "POST"}, 403, "invalid_request", "not in CORS_ALLOWED_ORIGINS", "INFO"},
		// Last, as it holds the calls after it back: a 429 is no failure of the service.
		{"Spotify's 429, relayed", "POST", tokenPath, formType, "code=AQD429", nil, 429, "temporarily_unavailable", "Spotify: Too many requests", "INFO"},
	}
	svc := startService(t, spotifyAnswers, map[string]string{"ENCRYPTION_SECRET": testSecret, "CORS_ALLOWED_ORIGINS": "https://app.example.com"})
	for _, tt := range tests {
		got := send(t, tt.method, svc.url+tt.path, tt.contentType, tt.body, tt.header...)
		if got.status != tt.wantStatus {
			t.Errorf("%s: %s %s = %d %s, want %d", tt.name, tt.method, tt.path, got.status, got.body, tt.wantStatus)
		}
	}
	svc.close()
	lines := logLines(t, svc.log.String())
	if len(lines) != len(tests) {
		t.Fatalf("the log has %d lines, want %d:\n%s", len(lines), len(tests), svc.log)
	}
	// Spotify's status, where it answered, usable or not.
	spotifyStatus := map[string]int{"client secret reset": 400, "a user's stale code": 400, "a code for another redirect URI": 400,
		"Spotify answers HTML": 500, "Spotify's error without a description": 400, "Spotify's answer with no error at all": 418,
		"Spotify's own 500, relayed": 500, "Spotify's own 503, relayed": 503, "Spotify's 429, relayed": 429}
	for i, tt := range tests {
		l := lines[i]
		if l.Status != tt.wantStatus || l.Error != tt.wantError || !strings.Contains(l.Reason, tt.wantReason) || l.Level != tt.wantLevel ||
			l.Client != "127.0.0.1" || l.Path != tt.path || l.SpotifyStatus != spotifyStatus[tt.name] ||
			strings.Contains(l.Reason, "redirect_uri sent") != (tt.wantError == "invalid_grant" && tt.path == tokenPath) {
			t.Errorf("%s: log line %+v, want status %d, error %q, a reason with %q (and the redirect_uri sent for a code's invalid_grant only), level %s, client 127.0.0.1, spotify_status %d",
				tt.name, l, tt.wantStatus, tt.wantError, tt.wantReason, tt.wantLevel, spotifyStatus[tt.name])
		}
	}
}

// TestClientHangsUp checks that a client that leaves before its answer
// cancels the call to Spotify, and is logged as 499 at INFO with no word of
// Spotify failing.
func TestClientHangsUp(t *testing.T) {
	t.Parallel()
	request := "POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Type: " + formType + "\r\nContent-Length: 15\r\n\r\ncode=AQDleaving"
	for _, how := range []string{"closes", "half-closes"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			arrived, cancelled := make(chan struct{}), make(chan struct{})
			svc := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
				close(arrived)
				<-r.Context().Done() // the service cancels its call
				close(cancelled)
			}, nil)
			conn, err := net.Dial("tcp", strings.TrimPrefix(svc.url, "http://"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second)) // a bound, should the service hang
			io.WriteString(conn, request)
			<-arrived
			if how == "closes" {
				conn.Close()
			} else {
				conn.(*net.TCPConn).CloseWrite() // as nc -N does
				if got, err := io.ReadAll(conn); len(got) != 0 || err != nil {
					t.Errorf("after a half-close the service wrote %q (%v), want nothing and the connection closed", got, err)
				}
			}
			select {
			case <-cancelled:
			case <-time.After(10 * time.Second): // a bound, should the call never be cancelled
				t.Fatalf("the call to Spotify was not cancelled when the client left")
			}
			svc.close() // waits for the handler, and so for the log line
			lines := logLines(t, svc.log.String())
			if l := lines[0]; len(lines) != 1 || l.Status != 499 || l.Level != "INFO" || !strings.Contains(l.Reason, "client hung up") ||
				strings.Contains(svc.log.String(), "could not be reached") || l.Error != "" {
				t.Errorf("log = %s, want one INFO line with status 499, why, and no word of Spotify failing", svc.log)
			}
			exposition := scrape(svc.server)
			for _, want := range []string{`tokenswap_spotify_requests_total{code="canceled"} 1`, `tokenswap_requests_total{handler="token",code="499"} 1`, "tokenswap_requests_in_flight 0"} {
				if !strings.Contains(exposition, "\n"+want+"\n") {
					t.Errorf("/metrics after the client left does not hold %s:\n%s", want, exposition)
				}
			}
		})
	}
}

// TestRequestIDInTheLog checks that X-Request-Id reaches the log, and
// comes back in the answer, cut to 128 bytes, printable ones only.
func TestRequestIDInTheLog(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, nil)
	long := strings.Repeat("0123456789abcdef", 400) // 6.4 KB
	tests := []struct{ sent, want string }{
		{long, long[:128]},
		{"req-1\t\xc3\xa9-end", "req-1-end"},
		{"trace 7 ~!", "trace 7 ~!"},
		{long[:128], long[:128]},                     // exactly the cap
		{strings.Repeat("\xc3\xa9", 64) + "abc", ""}, // the cut comes first
	}
	for _, tt := range tests {
		got := send(t, "GET", svc.url+"/healthz", noneType, "", "X-Request-Id", tt.sent)
		if id := got.header.Get("X-Request-Id"); id != tt.want {
			t.Errorf("X-Request-Id %q: the answer carries %q, want %q", tt.sent, id, tt.want)
		}
	}
	svc.close()
	for i, line := range logLines(t, svc.log.String()) {
		if line.RequestID != tests[i].want {
			t.Errorf("X-Request-Id %q is logged as %q, want %q", tests[i].sent, line.RequestID, tests[i].want)
		}
	}
}

// TestClientValuesAreCut sends requests whose every value a client chooses
// is as long as the header limit allows, and made of what escapes worst:
// no log line and no answer may pass 2 KiB, and a description quotes at
// most 128 bytes of what the client sent.
func TestClientValuesAreCut(t *testing.T) {
	t.Parallel()
	const size = 12 << 10
	svc := startService(t, likeSpotify, map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com", "RATE_LIMIT": "1000/s", "TRUST_PROXY": "1"})
	backslashes, quotes := strings.Repeat(`\`, size), strings.Repeat(`"`, size)
	segments := strings.Repeat("/%01", size/4)
	tests := []struct {
		method, path string
		header       []string
		wantStatus   int
	}{
		{"OPTIONS", tokenPath, []string{"Origin", backslashes, "Access-Control-Request-Method", "POST"}, 403},
		{"OPTIONS", tokenPath, []string{"Origin", "https://app.example.com" + strings.Repeat("\xff", size), "Access-Control-Request-Method", "POST"}, 403},
		{strings.Repeat("M", size), tokenPath, []string{"X-Request-Id", quotes}, 405},
		{"GET", segments, []string{"X-Request-Id", backslashes}, 404},
		{"GET", strings.Repeat("/a", size/2), nil, 404},
		{"POST", tokenPath, []string{"X-Forwarded-For", "[fe80::1%" + strings.Repeat("z", size) + "]:80"}, 400},
		{"POST", tokenPath, []string{"X-Forwarded-For", strings.Repeat("\\", size)}, 400},
	}
	for _, tt := range tests {
		got := send(t, tt.method, svc.url+tt.path, formType, "", tt.header...)
		if got.status != tt.wantStatus || len(got.body) > 2048 {
			t.Errorf("%.20s %.20s...: %d with a body of %d bytes, want %d and at most 2 KiB", tt.method, tt.path, got.status, len(got.body), tt.wantStatus)
		}
		if d := checkJSON(t, tt.method+" "+tt.path[:10], got)["error_description"]; strings.Contains(fmt.Sprint(d), strings.Repeat(`\`, 129)) || strings.Contains(fmt.Sprint(d), strings.Repeat("M", 129)) {
			t.Errorf("%.20s %.20s...: the description quotes more than 128 bytes of the request: %.300s", tt.method, tt.path, d)
		}
	}
	svc.close()
	for _, line := range strings.Split(strings.TrimSpace(svc.log.String()), "\n") {
		if len(line) > 2048 {
			t.Errorf("a log line of %d bytes, want at most 2 KiB: %.300s...", len(line), line)
		}
	}
	if n := strings.Count(svc.log.String(), "\n"); n != len(tests)+1 { // the fallback's warning
		t.Errorf("%d log lines, want %d:\n%s", n, len(tests)+1, svc.log)
	}
}

// TestHints checks that the usual mistakes get an answer that says what to
// do, and that none reaches Spotify.
func TestHints(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, nil)
	// The values the hints are about: never quoted back, nor logged.
	const code, token = "AQDhint-code", "AQBhint-token"
	tests := []struct {
		name, path, contentType, body, want string
	}{
		{"curl -d with JSON", tokenPath, formType, `{"code":"` + code + `"}`, "send it with Content-Type: application/json"},
		{"JSON without a Content-Type", refreshPath, noneType, "  \n{\"refresh_token\":\"" + token + "\"}", "send it with Content-Type: application/json"},
		{"code in the query", tokenPath + "?code=" + code, formType, "", "parameters in the URL query are not read"},
		{"refresh_token in the query", refreshPath + "?refresh_token=" + token, formType, "", "parameters in the URL query are not read"},
		{"refresh_token at the token endpoint", tokenPath, formType, "refresh_token=" + token, "send grant_type=refresh_token"},
		{"refresh_token at the token endpoint, with a query", tokenPath + "?state=x", formType, "refresh_token=" + token, "send grant_type=refresh_token"},
		{"a code at the refresh endpoint", refreshPath, formType, "code=" + code, "codes are swapped at /api/token"},
	}
	for _, tt := range tests {
		got := send(t, "POST", svc.url+tt.path, tt.contentType, tt.body)
		checkError(t, tt.name, got, 400, "invalid_request")
		if !strings.Contains(got.body, tt.want) || strings.Contains(got.body, code) || strings.Contains(got.body, token) {
			t.Errorf("%s: %s, want a description that says %q and quotes neither code nor token", tt.name, got.body, tt.want)
		}
	}
	if n := len(svc.spotify.received()); n != 0 {
		t.Errorf("Spotify received %d requests, want none", n)
	}
	if log := svc.log.String(); strings.Contains(log, code) || strings.Contains(log, token) {
		t.Errorf("the log quotes a code or a token:\n%s", log)
	}
}

// scrape returns what GET /metrics shows of s's metrics.
func scrape(s *server) string {
	rec := httptest.NewRecorder()
	s.metrics.handler("test").ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	return rec.Body.String()
}

// TestMetrics checks that the counters move as requests are answered, and
// that the exposition names no path a client chose.
func TestMetrics(t *testing.T) {
	t.Parallel()
	slowArrived := make(chan struct{})
	svc := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		switch form.Get("code") {
		case "AQDslow":
			close(slowArrived)
			<-r.Context().Done()
		case "AQDdrop":
			conn, _, _ := http.NewResponseController(w).Hijack()
			conn.Close()
		case "AQDcut": // a status, then less than the body it announced
			w.Header().Set("Content-Length", "100")
			io.WriteString(w, `{"access_token":`)
		case "AQDreset":
			spotifyError(w, 400, "invalid_client", "Invalid client secret")
		case "AQDodd":
			spotifyError(w, 400, "some_new_error", "Something new")
		case "AQDhtml":
			w.WriteHeader(500)
			io.WriteString(w, "<html>oops</html>")
		default:
			likeSpotify(w, r, form)
		}
	}, map[string]string{"RATE_LIMIT": "9/min", "SPOTIFY_TIMEOUT": "300ms", "TRUST_PROXY": "1"})
	// While a call waits for Spotify, it is in flight.
	slow := make(chan reply)
	go func() { slow <- send(t, "POST", svc.url+tokenPath, formType, "code=AQDslow") }()
	<-slowArrived
	if body := scrape(svc.server); !strings.Contains(body, "\ntokenswap_requests_in_flight 1\n") {
		t.Errorf("/metrics with a request waiting for Spotify does not hold tokenswap_requests_in_flight 1:\n%s", body)
	}
	<-slow
	for _, code := range []string{"AQDa", "used", "AQDdrop", "AQDcut", "AQDreset", "AQDodd", "AQDhtml"} {
		send(t, "POST", svc.url+tokenPath, formType, "code="+code)
	}
	send(t, "POST", svc.url+refreshPath, formType, "refresh_token=AQB")
	send(t, "GET", svc.url+refreshPath, noneType, "") // 405: counts no Spotify call, and no rate
	// The 10th POST: over the limit, and its client address falls back to the peer.
	send(t, "POST", svc.url+tokenPath, formType, "code=AQDlimited", "X-Forwarded-For", "not-an-address")
	// Distinct counts, so that two labels swapped show.
	send(t, "GET", svc.url+"/healthz", noneType, "")
	send(t, "GET", svc.url+"/healthz", noneType, "")
	send(t, "GET", svc.url+"/", noneType, "")
	for _, unknown := range []string{"/secret-admin-path", "/.env?x=1", tokenPath + "/", "//healthz", "/api%2Ftoken"} {
		send(t, "GET", svc.url+unknown, noneType, "")
	}
	svc.server.metrics.connectionsRefused.Add(3) // as the capped listener counts them

	// go_goroutines counts these too, and the resident memory this
	// ballast: 32 MiB of pages of the process's own, which a count of
	// shared pages would miss.
	parked := make(chan struct{})
	for range 100 {
		go func() { <-parked }()
	}
	ballast := make([]byte, 32<<20)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = 1
	}
	exposition := svc.server.metrics.handler("v9.9.9-test")
	get := httptest.NewRecorder()
	exposition.ServeHTTP(get, httptest.NewRequest("GET", "/metrics", nil))
	close(parked)
	body := get.Body.String()
	// sample is the value of the sample without labels called name.
	sample := func(name string) (v float64) {
		fmt.Sscanf(body[strings.Index(body, "\n"+name+" ")+1:], name+" %g", &v)
		return v
	}
	if n := sample("go_goroutines"); n < 100 {
		t.Errorf("go_goroutines = %g with 100 goroutines parked, want at least 100", n)
	}
	if ct := get.Header().Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type = %q, want the Prometheus text format 0.0.4", ct)
	}
	for _, want := range []string{
		`tokenswap_requests_total{handler="token",code="200"} 1` + "\n",
		`tokenswap_requests_total{handler="token",code="400"} 3` + "\n",
		`tokenswap_requests_total{handler="token",code="502"} 3` + "\n",
		`tokenswap_requests_total{handler="token",code="504"} 1` + "\n",
		`tokenswap_requests_total{handler="token",code="429"} 1` + "\n",
		`tokenswap_requests_total{handler="refresh_token",code="200"} 1` + "\n",
		`tokenswap_requests_total{handler="refresh_token",code="405"} 1` + "\n",
		`tokenswap_requests_total{handler="healthz",code="200"} 2` + "\n",
		`tokenswap_requests_total{handler="index",code="200"} 1` + "\n",
		"tokenswap_requests_in_flight 0\n",
		`tokenswap_requests_total{handler="other",code="404"} 5` + "\n", // unclean and escaped paths too
		`tokenswap_request_duration_seconds_count{handler="token"} 9` + "\n",
		`tokenswap_request_duration_seconds_bucket{handler="token",le="+Inf"} 9` + "\n",
		`tokenswap_spotify_requests_total{code="200"} 3` + "\n", // one cut short: still Spotify's status
		`tokenswap_spotify_requests_total{code="400"} 3` + "\n",
		`tokenswap_spotify_requests_total{code="500"} 1` + "\n", // an answer that is not JSON still has Spotify's status
		`tokenswap_spotify_requests_total{code="timeout"} 1` + "\n",
		`tokenswap_spotify_requests_total{code="unreachable"} 1` + "\n",
		`tokenswap_spotify_request_duration_seconds_count 9` + "\n",
		`tokenswap_spotify_request_duration_seconds_bucket{le="0.25"} 8` + "\n",
		`tokenswap_rate_limited_total 1` + "\n",
		`tokenswap_errors_total{error="invalid_grant"} 1` + "\n",
		`tokenswap_errors_total{error="invalid_client"} 1` + "\n",
		`tokenswap_errors_total{error="other"} 1` + "\n",
		`tokenswap_errors_total{error="server_error"} 4` + "\n",
		`tokenswap_errors_total{error="invalid_request"} 1` + "\n",
		`tokenswap_errors_total{error="temporarily_unavailable"} 1` + "\n",
		`tokenswap_errors_total{error="not_found"} 5` + "\n",
		`tokenswap_build_info{version="v9.9.9-test"} 1` + "\n",
		"tokenswap_client_address_fallback_total 1\n",
		"tokenswap_connections_refused_total 3\n",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics does not hold %q:\n%s", want, body)
		}
	}
	// Each family once, with its type, HELP before TYPE before its samples.
	for name, kind := range map[string]string{
		"tokenswap_requests_total": "counter", "tokenswap_request_duration_seconds": "histogram", "tokenswap_requests_in_flight": "gauge",
		"tokenswap_spotify_requests_total": "counter", "tokenswap_spotify_request_duration_seconds": "histogram", "tokenswap_errors_total": "counter",
		"tokenswap_rate_limited_total": "counter", "tokenswap_client_address_fallback_total": "counter", "tokenswap_connections_refused_total": "counter",
		"tokenswap_build_info": "gauge", "go_goroutines": "gauge", "process_start_time_seconds": "gauge", "process_resident_memory_bytes": "gauge",
	} {
		help, typ, sample := strings.Index(body, "# HELP "+name+" "), strings.Index(body, "# TYPE "+name+" "+kind+"\n"), strings.Index(body, "\n"+name)
		if strings.Count(body, "# TYPE "+name+" ") != 1 || help < 0 || typ < help || sample < typ {
			t.Errorf("/metrics: want one # HELP %s, then # TYPE %s %s, then its samples", name, name, kind)
		}
	}
	// Each histogram's bounds strictly increasing, so that no series is
	// listed twice.
	last := map[string]float64{}
	for _, m := range regexp.MustCompile(`(?m)^(\S+)_bucket\{(.*)le="([^"]+)"\} `).FindAllStringSubmatch(body, -1) {
		le, _ := strconv.ParseFloat(m[3], 64) // +Inf parses too
		if prev, ok := last[m[1]+m[2]]; ok && le <= prev {
			t.Errorf("%s_bucket{%sle=%q} after le=%g: want strictly increasing bounds", m[1], m[2], m[3], prev)
		}
		last[m[1]+m[2]] = le
	}
	if len(last) != numRoutes+1 {
		t.Errorf("/metrics has %d histograms, want %d", len(last), numRoutes+1)
	}
	// The resident memory is this process's RSS, as Linux reports it.
	if status, err := os.ReadFile("/proc/self/status"); err == nil {
		rss, vmRSS := sample("process_resident_memory_bytes"), 0.0
		fmt.Sscanf(string(regexp.MustCompile(`VmRSS:.*`).Find(status)), "VmRSS: %g kB", &vmRSS)
		if rss < vmRSS*1024/2 || rss > vmRSS*1024*2 || rss < 32<<20 {
			t.Errorf("process_resident_memory_bytes = %g, want about VmRSS, %g kB, and over the 32 MiB ballast", rss, vmRSS)
		}
	}
	runtime.KeepAlive(ballast) // until VmRSS is read
	for _, other := range []struct {
		method, path string
		want         int
	}{{"POST", "/metrics", 405}, {"GET", "/", 404}, {"GET", "/debug", 404}, {"GET", "/metrics/", 404}} {
		got := httptest.NewRecorder()
		exposition.ServeHTTP(got, httptest.NewRequest(other.method, other.path, nil))
		if got.Code != other.want || strings.Contains(got.Body.String(), "tokenswap_") {
			t.Errorf("%s %s on the metrics listener = %d, want %d and no metrics", other.method, other.path, got.Code, other.want)
		}
	}
	for _, line := range strings.Split(body, "\n") {
		counter := strings.HasPrefix(line, "tokenswap_requests_total{") || strings.HasPrefix(line, "tokenswap_spotify_requests_total{") || strings.HasPrefix(line, "tokenswap_errors_total{")
		if counter && strings.HasSuffix(line, " 0") {
			t.Errorf("/metrics lists a counter that is 0: %s", line)
		}
	}
	started := sample("process_start_time_seconds")
	if d := started - float64(svc.server.metrics.start.UnixMilli())/1e3; d < -0.001 || d > 0.001 || time.Since(svc.server.metrics.start) > time.Minute {
		t.Errorf("process_start_time_seconds = %f, want the time the service started, %v, this minute", started, svc.server.metrics.start)
	}
	if n := len(strings.Fields(oauthErrors)); n != numOAuthErrors {
		t.Errorf("oauthErrors names %d errors, numOAuthErrors says %d", n, numOAuthErrors)
	}
	for _, chosen := range []string{"secret-admin-path", ".env", "AQD", "some_new_error"} {
		if strings.Contains(body, chosen) {
			t.Errorf("/metrics holds %q, which a client chose", chosen)
		}
	}
	if got := send(t, "GET", svc.url+"/metrics", noneType, ""); got.status != 404 {
		t.Errorf("GET /metrics on the service's port = %d, want 404: metrics are for the operator's port only", got.status)
	}
}

// TestErrorsCountedByName checks that each OAuth error of RFC 6749 §5.2,
// and the service's not_found, counts under its own name, and any other
// under "other".
func TestErrorsCountedByName(t *testing.T) {
	t.Parallel()
	var m metrics
	names := []string{"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client", "unsupported_grant_type", "invalid_scope",
		"server_error", "temporarily_unavailable", "not_found", "some_new_error"}
	for i, name := range names {
		for range i + 1 { // distinct counts, so that two labels swapped show
			m.request(0, 400, name, time.Millisecond)
		}
	}
	body := scrape(&server{metrics: &m})
	for i, name := range names {
		if name == "some_new_error" {
			name = "other"
		}
		if want := fmt.Sprintf("tokenswap_errors_total{error=%q} %d\n", name, i+1); !strings.Contains(body, want) {
			t.Errorf("/metrics does not hold %q", want)
		}
	}
}

// TestSpotifyCallsCountedByOutcome checks the code label of a call to
// Spotify: its status where it gave one, even when the answer was cut short
// or the client hung up meanwhile; else why it gave none.
func TestSpotifyCallsCountedByOutcome(t *testing.T) {
	t.Parallel()
	var m metrics
	calls := []struct {
		status     int
		err        error
		clientGone bool
		times      int
		want       string
	}{
		{0, fmt.Errorf("%w: POST x: %w", errSpotifyTimeout, context.DeadlineExceeded), false, 1, "timeout"},
		{0, fmt.Errorf("%w: POST x: connection refused", errSpotifyUnreachable), false, 2, "unreachable"},
		{0, context.Canceled, true, 3, "canceled"},
		{200, context.Canceled, true, 4, "200"},                                    // the client gone while the body came
		{502, fmt.Errorf("%w: cut short", errSpotifyUnreachable), false, 5, "502"}, // its status, though the body was cut
	}
	for _, c := range calls {
		for range c.times {
			m.spotifyCall(c.status, c.err, c.clientGone, time.Millisecond)
		}
	}
	body := scrape(&server{metrics: &m})
	for _, c := range calls {
		if want := fmt.Sprintf("tokenswap_spotify_requests_total{code=%q} %d\n", c.want, c.times); !strings.Contains(body, want) {
			t.Errorf("/metrics does not hold %q:\n%s", want, body)
		}
	}
}

// TestResidentMemory checks that the resident memory is left out, not
// reported as 0, where /proc does not say it.
func TestResidentMemory(t *testing.T) {
	t.Parallel()
	if rss, ok := residentMemory("/proc/self/statm"); !ok || rss <= 0 {
		t.Errorf("residentMemory(/proc/self/statm) = %d, %v; want this process's", rss, ok)
	}
	dir := t.TempDir()
	garbled, short := filepath.Join(dir, "garbled"), filepath.Join(dir, "short")
	os.WriteFile(garbled, []byte("12 pages\n"), 0o600)
	os.WriteFile(short, []byte("12\n"), 0o600) // the size, without the resident pages
	for _, path := range []string{filepath.Join(dir, "none"), garbled, short} {
		if rss, ok := residentMemory(path); ok {
			t.Errorf("residentMemory(%s) = %d, true; want none", path, rss)
		}
	}
}

// TestHistogram checks the exposition of a histogram: cumulative buckets,
// +Inf and _count with what is over every bound, _sum in seconds.
func TestHistogram(t *testing.T) {
	t.Parallel()
	var h histogram
	for _, d := range []time.Duration{3 * time.Millisecond, 5 * time.Millisecond, 1500 * time.Millisecond, 11 * time.Second} {
		h.observe(d)
	}
	var b strings.Builder
	h.write(&b, "x_seconds", `handler="token"`)
	for _, want := range []string{
		`x_seconds_bucket{handler="token",le="0.005"} 2` + "\n", // a bound holds what equals it
		`x_seconds_bucket{handler="token",le="0.01"} 2` + "\n",
		`x_seconds_bucket{handler="token",le="2.5"} 3` + "\n",
		`x_seconds_bucket{handler="token",le="10"} 3` + "\n",
		`x_seconds_bucket{handler="token",le="+Inf"} 4` + "\n",
		`x_seconds_sum{handler="token"} 12.508` + "\n",
		`x_seconds_count{handler="token"} 4` + "\n",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("histogram exposition lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	h.write(&b, "y_seconds", "")
	if !strings.Contains(b.String(), `y_seconds_bucket{le="+Inf"} 4`+"\n") || !strings.Contains(b.String(), "y_seconds_count 4\n") {
		t.Errorf("histogram without labels:\n%s", b.String())
	}
	// The bounds, from 5 ms for the service's own answers to 10 s for Spotify's.
	var bounds []string
	for _, m := range regexp.MustCompile(`le="([^"]+)"`).FindAllStringSubmatch(b.String(), -1) {
		bounds = append(bounds, m[1])
	}
	if got, want := strings.Join(bounds, " "), "0.005 0.01 0.025 0.05 0.1 0.25 0.5 1 2.5 5 10 +Inf"; got != want {
		t.Errorf("histogram bounds %s, want %s", got, want)
	}
}

// TestLogPath checks which path segments the log masks: those longer than
// any of the service's own, as a code or a token is.
func TestLogPath(t *testing.T) {
	t.Parallel()
	long, longer := strings.Repeat("a", maxPathSegment), strings.Repeat("b", maxPathSegment+1)
	for path, want := range map[string]string{
		"/api/token":                  "/api/token",
		"/" + long:                    "/" + long,
		"/x/" + long + "/y":           "/x/" + long + "/y",
		"/" + longer:                  "/(33 characters)",
		"/api/" + longer + "/" + long: "/api/(33 characters)/" + long,
	} {
		if got := logPath(path); got != want {
			t.Errorf("logPath(%q) = %q, want %q", path, got, want)
		}
	}
}
