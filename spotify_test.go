package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// newTestSealer returns a sealer for the given secrets or fails the test.
func newTestSealer(t testing.TB, secrets ...string) *sealer {
	t.Helper()
	s, err := newSealer(secrets)
	if err != nil {
		t.Fatalf("newSealer: %v", err)
	}
	return s
}

func TestSealOpens(t *testing.T) {
	t.Parallel()
	s := newTestSealer(t, testSecret)
	for _, token := range []string{"AQBrefresh-token_123", "", "a token with spaces & symbols=+/", strings.Repeat("x", 4096)} {
		sealed := s.seal(token)
		if !strings.HasPrefix(sealed, sealPrefix) || url.QueryEscape(sealed) != sealed {
			t.Errorf("seal(%q) = %q, want the prefix %q and nothing a form or query must escape", token, sealed, sealPrefix)
		}
		if strings.Contains(sealed, token) && token != "" {
			t.Errorf("seal(%q) = %q shows the token", token, sealed)
		}
		if got, err := s.open(sealed); err != nil || got != token {
			t.Errorf("open(seal(%q)) = %q, %v; want the token back", token, got, err)
		}
	}
	if a, b := s.seal("AQB"), s.seal("AQB"); a == b {
		t.Errorf("two seals of one token are both %q, want a fresh nonce each", a)
	}
}

func TestOpenRefuses(t *testing.T) {
	t.Parallel()
	s := newTestSealer(t, testSecret)
	sealed := s.seal("AQBrefresh")
	flip := func(i int) string {
		b := []byte(sealed)
		b[i] = map[bool]byte{true: 'B', false: 'A'}[b[i] == 'A']
		return string(b)
	}
	bad := map[string]string{
		"a raw Spotify token":          "AQBrefresh",
		"empty":                        "",
		"the prefix alone":             sealPrefix,
		"without the prefix":           strings.TrimPrefix(sealed, sealPrefix),
		"another version":              "v2." + strings.TrimPrefix(sealed, sealPrefix),
		"first byte changed":           flip(len(sealPrefix)),
		"a middle byte changed":        flip(len(sealed) / 2),
		"last byte changed":            flip(len(sealed) - 1),
		"truncated":                    sealed[:len(sealed)-1],
		"one byte more":                sealed + "A",
		"base64 padding":               sealed + "==",
		"standard base64":              strings.NewReplacer("-", "+", "_", "/").Replace(sealed) + "+/",
		"sealed under another key":     newTestSealer(t, strings.Repeat("k", 32)).seal("AQBrefresh"),
		"trailing space":               sealed + " ",
		"a newline inside":             sealed[:10] + "\n" + sealed[10:],
		"a carriage return inside":     sealed[:10] + "\r" + sealed[10:],
		"a carriage return at the end": sealed + "\r",
		"a CRLF at the end":            sealed + "\r\n",
		"a tab inside":                 sealed[:10] + "\t" + sealed[10:],
		"not base64":                   sealPrefix + "!!!!",
		"shorter than a GCM tag":       sealPrefix + "AAAA",
	}
	for name, token := range bad {
		if got, err := s.open(token); !errors.Is(err, errNotSealed) || got != "" {
			t.Errorf("open(%s) = %q, %v; want errNotSealed", name, got, err)
		}
	}
}

// TestOpenNonCanonicalBase64 checks that a sealed token has one spelling: the
// last character of unpadded base64 carries spare bits, which must be zero.
func TestOpenNonCanonicalBase64(t *testing.T) {
	t.Parallel()
	s := newTestSealer(t, testSecret)
	for range 50 {
		sealed := s.seal("AQBrefresh")
		last := strings.IndexByte("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", sealed[len(sealed)-1])
		other := sealed[:len(sealed)-1] + string("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last^1])
		if _, err := s.open(other); err == nil {
			t.Fatalf("open(%q) of a second spelling of %q succeeded", other, sealed)
		}
	}
}

func TestSecretRotation(t *testing.T) {
	t.Parallel()
	const newSecret = "the-new-encryption-secret-0123456789"
	old := newTestSealer(t, testSecret)
	rotated := newTestSealer(t, newSecret, testSecret)
	fresh := newTestSealer(t, newSecret)

	if got, err := rotated.open(old.seal("AQBold")); err != nil || got != "AQBold" {
		t.Errorf("new,old opens a token sealed with old: %q, %v; want AQBold", got, err)
	}
	sealed := rotated.seal("AQBnew")
	if got, err := fresh.open(sealed); err != nil || got != "AQBnew" {
		t.Errorf("new opens a token sealed by new,old: %q, %v; want AQBnew (new seals)", got, err)
	}
	if _, err := old.open(sealed); err == nil {
		t.Errorf("old opens a token sealed by new,old; want new to seal")
	}
}

func TestSealAnswer(t *testing.T) {
	t.Parallel()
	s := newTestSealer(t, testSecret)
	sealedValue := regexp.MustCompile(`"v1\.[A-Za-z0-9_-]+"`)
	tests := []struct {
		name, body string
		rawJSON    string // the refresh token's value as body spells it; "" where nothing is sealed
		raw        string // and the token it stands for
	}{
		{"Spotify's compact answer", `{"access_token":"at","token_type":"Bearer","expires_in":3600,"refresh_token":"AQBraw","scope":"a b"}`, `"AQBraw"`, "AQBraw"},
		{"spaced and indented", "{\n  \"access_token\" : \"at\",\n  \"refresh_token\" :  \"AQBraw\" ,\n  \"expires_in\" : 3600\n}\n", `"AQBraw"`, "AQBraw"},
		{"refresh token first", `{"refresh_token":"AQBraw","access_token":"at"}`, `"AQBraw"`, "AQBraw"},
		{"escaped token", `{"access_token":"at","refresh_token":"AQB\u002fraw"}`, `"AQB\u002fraw"`, "AQB/raw"},
		{"escaped key", `{"access_token":"at","refresh\u005ftoken":"AQBraw"}`, `"AQBraw"`, "AQBraw"},
		{"strings and nesting that look like members", `{"scope":"a \"refresh_token\":\"x\" } ] {","n":[1,{"b":"]}"}],"x":-1.5e3,"t":true,"refresh_token":"AQBraw","z":null}`, `"AQBraw"`, "AQBraw"},
		{"no refresh token", `{"access_token":"at","token_type":"Bearer","expires_in":3600}`, "", ""},
		{"refresh token null", `{"access_token":"at","refresh_token":null}`, "", ""},
		{"refresh token empty", `{"access_token":"at","refresh_token":""}`, "", ""},
		{"nested member of that name", `{"access_token":"at","meta":{"refresh_token":"AQBraw"}}`, "", ""},
	}
	for _, tt := range tests {
		got := s.sealAnswer([]byte(tt.body))
		sealed := sealedValue.FindAllString(string(got), -1)
		if tt.rawJSON == "" {
			if string(got) != tt.body {
				t.Errorf("%s: sealAnswer = %s, want it unchanged", tt.name, got)
			}
			continue
		}
		if len(sealed) != 1 {
			t.Errorf("%s: sealAnswer = %s, want one sealed value", tt.name, got)
			continue
		}
		// Every byte but the token's value must stay as Spotify sent it.
		if back := strings.Replace(string(got), sealed[0], tt.rawJSON, 1); back != tt.body {
			t.Errorf("%s: sealAnswer = %s, want only the refresh token changed in %s", tt.name, got, tt.body)
		}
		if token, err := s.open(strings.Trim(sealed[0], `"`)); err != nil || token != tt.raw {
			t.Errorf("%s: the sealed value %s opens to %q, %v; want %q", tt.name, sealed[0], token, err, tt.raw)
		}
	}
}

// FuzzSealAnswer checks that sealAnswer never panics, and that for a valid
// JSON object it changes nothing but the top-level refresh_token, which opens.
func FuzzSealAnswer(f *testing.F) {
	f.Add(`{"access_token":"at","token_type":"Bearer","expires_in":3600,"refresh_token":"AQBraw","scope":"a b"}`)
	f.Add(`{"refresh_token":"AQBraw","refresh_token":"AQBother"}`)
	f.Add(`{ "a" : [ "}" , { "refresh_token" : "x" } ] , "refresh\u005ftoken" : "AQB\"raw" }`)
	f.Add(`{"refresh_token":null,"b":{}}`)
	s := newTestSealer(f, testSecret)
	f.Fuzz(func(t *testing.T, body string) {
		got := s.sealAnswer([]byte(body))
		var in, out map[string]any
		if !isJSONObject([]byte(body)) || json.Unmarshal([]byte(body), &in) != nil {
			return
		}
		if err := json.Unmarshal(got, &out); err != nil || len(out) != len(in) {
			t.Fatalf("sealAnswer(%s) = %s, not the same JSON object: %v", body, got, err)
		}
		// Every refresh_token member is sealed, not only the one that
		// encoding/json keeps of a key sent twice.
		dec := json.NewDecoder(bytes.NewReader(got))
		for dec.Token(); dec.More(); {
			key, _ := dec.Token()
			var value any
			dec.Decode(&value)
			if token, _ := value.(string); key == "refresh_token" && token != "" && !strings.HasPrefix(token, sealPrefix) {
				t.Errorf("sealAnswer(%s) = %s: a refresh_token left raw", body, got)
			}
		}
		for k, v := range in {
			raw, isToken := v.(string)
			if k != "refresh_token" || !isToken || raw == "" {
				if !reflect.DeepEqual(out[k], v) {
					t.Errorf("sealAnswer(%s): %s = %v, want %v unchanged", body, k, out[k], v)
				}
				continue
			}
			sealed, _ := out[k].(string)
			if opened, err := s.open(sealed); err != nil || opened != raw {
				t.Errorf("sealAnswer(%s): refresh_token %q opens to %q, %v; want %q", body, sealed, opened, err, raw)
			}
		}
	})
}

// sealedUnderTestSecret are tokens sealed once under testSecret, and what
// they hold. They must open for as long as tokens sealed in the wild must:
// a change to the format or to the key derivation breaks them.
var sealedUnderTestSecret = map[string]string{
	"v1.btknpMJpq88-1_UjgzwksmehiOrdJio4QEgZountQZNWf9dEKSA": "AQBrefresh",
	"v1.3wvtTHTef8vVsW5Et5wDuIR-McC1v_jBkm29SQ":              "",
	"v1.yj0TvPxRv-fjWCOQxQ_QCEMOaUr6BJuNd6MqPWU":             "x",
}

func TestSealedTokensKeepOpening(t *testing.T) {
	t.Parallel()
	s := newTestSealer(t, testSecret)
	for sealed, want := range sealedUnderTestSecret {
		if got, err := s.open(sealed); err != nil || got != want {
			t.Errorf("open(%q) = %q, %v; want %q", sealed, got, err, want)
		}
	}
}

// FuzzOpen checks that open never panics and opens nothing but tokens this
// sealer sealed; and that every token survives a round trip. (Fuzz workers
// are other processes, so the tokens known to be sealed are fixed ones.)
func FuzzOpen(f *testing.F) {
	for sealed := range sealedUnderTestSecret {
		f.Add(sealed)
	}
	f.Add("AQBrefresh")
	f.Add(sealPrefix)
	f.Add(sealPrefix + "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
	s := newTestSealer(f, testSecret)
	f.Fuzz(func(t *testing.T, token string) {
		got, err := s.open(token)
		want, sealed := sealedUnderTestSecret[token]
		switch {
		case err == nil && !sealed:
			t.Errorf("open(%q) = %q, but it was never sealed", token, got)
		case sealed && (err != nil || got != want):
			t.Errorf("open(%q) = %q, %v; want %q", token, got, err, want)
		case err != nil && got != "":
			t.Errorf("open(%q) = %q with error %v, want no token", token, got, err)
		}
		if back, err := s.open(s.seal(token)); err != nil || back != token {
			t.Errorf("open(seal(%q)) = %q, %v", token, back, err)
		}
	})
}

// TestCredentialsStayWithSpotify checks that an answer redirecting
// elsewhere does not take the client's credentials and code there, and that
// an https accounts service whose certificate no CA signed gets nothing.
func TestCredentialsStayWithSpotify(t *testing.T) {
	t.Parallel()
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("the redirect was followed: %s %s", r.Method, r.URL)
	}))
	defer elsewhere.Close()
	svc := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		http.Redirect(w, r, elsewhere.URL+"/api/token", http.StatusTemporaryRedirect)
	}, nil)
	got := send(t, "POST", svc.url+tokenPath, formType, "code=AQDredirect")
	checkError(t, "POST /api/token", got, 502, "server_error")

	impostor := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		t.Errorf("an accounts service with a self-signed certificate got %s, Authorization %q", r.URL, r.Header.Get("Authorization"))
	}))
	defer impostor.Close()
	c := newSpotifyClient(impostor.URL, testClientID, testClientSecret, 5*time.Second)
	if _, err := c.clientCredentials(t.Context()); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("a call to an accounts service with a self-signed certificate: %v, want a certificate error", err)
	}
}

// swapAtOnce starts n code exchanges at once, each on its own connection to
// the service, and returns a function that waits for them all.
func swapAtOnce(t *testing.T, serviceURL string, n int) (wait func()) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n}}
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := client.Post(serviceURL+tokenPath, formType, strings.NewReader("code=AQDatonce"))
			if err != nil {
				t.Errorf("POST /api/token: %v", err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}()
	}
	return func() {
		wg.Wait()
		client.CloseIdleConnections()
	}
}

// TestUpstreamConnectionsAreReused checks that a second wave of concurrent
// calls to Spotify reuses the first wave's connections, more of them than
// an http.Transport keeps idle by default (100), or a round 256.
func TestUpstreamConnectionsAreReused(t *testing.T) {
	t.Parallel()
	const wave = 300
	arrived, release := make(chan struct{}), make(chan struct{})
	svc := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		arrived <- struct{}{}
		<-release // so that all calls of a wave are in flight at once
		likeSpotify(w, r, form)
	}, nil)
	var newConns [2]int64
	for i := range newConns {
		before := svc.spotify.conns.Load()
		wait := swapAtOnce(t, svc.url, wave)
		for range wave {
			<-arrived
		}
		for range wave {
			release <- struct{}{}
		}
		wait()
		newConns[i] = svc.spotify.conns.Load() - before
	}
	// A connection may go back to the pool just after its caller is done,
	// so a few new ones in the second wave are no fault.
	if newConns[0] > wave || newConns[1] > wave/10 {
		t.Errorf("new connections to Spotify per wave of %d calls: %d, then %d; want at most %d, then at most %d",
			wave, newConns[0], newConns[1], wave, wave/10)
	}
}

// TestUpstreamTransport checks that the upstream transport keeps Go's
// defaults where it does not set its own: HTTPS_PROXY honoured, a limit on
// the TLS handshake, idle connections closed in time.
func TestUpstreamTransport(t *testing.T) {
	t.Parallel()
	tr := newSpotifyClient(defaultAccountsURL, "id", "secret", time.Second).transport.(*http.Transport)
	if tr.Proxy == nil || tr.TLSHandshakeTimeout == 0 || tr.IdleConnTimeout == 0 || tr.MaxIdleConns != 0 {
		t.Errorf("upstream transport: proxy from the environment %v, TLS handshake limit %v, idle timeout %v, idle connections in all %d; want Go's first three, and no limit on the last",
			tr.Proxy != nil, tr.TLSHandshakeTimeout, tr.IdleConnTimeout, tr.MaxIdleConns)
	}
}

// TestNoUpstreamCeiling holds more calls at Spotify at once than the old
// ceiling of 256 connections allowed, and checks that none waits for another:
// with Spotify slow, a ceiling halves the throughput.
func TestNoUpstreamCeiling(t *testing.T) {
	t.Parallel()
	const calls = 300
	arrived, release := make(chan struct{}, calls), make(chan struct{})
	svc := startService(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		arrived <- struct{}{}
		<-release
		likeSpotify(w, r, form)
	}, nil)
	wait := swapAtOnce(t, svc.url, calls)
	defer wait()
	defer close(release)
	bound := time.After(30 * time.Second) // should calls queue, they never all arrive
	for n := range calls {
		select {
		case <-arrived:
		case <-bound:
			t.Fatalf("only %d of %d calls reached Spotify at once", n, calls)
		}
	}
}

// TestBackoffWindow checks when a 429 from Spotify holds calls back: for its
// Retry-After in seconds, at most a minute, and not at all without a usable
// one.
func TestBackoffWindow(t *testing.T) {
	t.Parallel()
	tests := []struct {
		retryAfter string
		status     int           // Spotify's first answer; 429 where 0
		want       time.Duration // how long calls are held back
	}{
		{"7", 0, 7 * time.Second},
		{"120", 503, 0}, // only a 429 starts a back-off
		{"1", 0, time.Second},
		{"60", 0, time.Minute},
		{"3600", 0, time.Minute}, // capped: a minute at most
		{"0", 0, 0},
		{"-5", 0, 0},
		{"", 0, 0},
		{"soon", 0, 0},
		{"Wed, 21 Oct 2026 07:28:00 GMT", 0, 0}, // an HTTP date: no usable seconds
		{"1.5", 0, 0},
	}
	for _, tt := range tests {
		var calls atomic.Int32
		spotify := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if calls.Add(1) == 1 {
				w.Header().Set("Retry-After", tt.retryAfter)
				spotifyError(w, cmp.Or(tt.status, 429), "rate_limited", "API rate limit exceeded")
				return
			}
			io.WriteString(w, `{"access_token":"at"}`)
		}))
		clock := newFakeClock()
		c := newSpotifyClient(spotify.URL, testClientID, testClientSecret, time.Second)
		c.now = clock.now
		if ans, err := c.refresh(t.Context(), "AQB"); err != nil || ans.status != cmp.Or(tt.status, 429) {
			t.Errorf("Retry-After %q: first call = %d, %v; want Spotify's %d", tt.retryAfter, ans.status, err, cmp.Or(tt.status, 429))
		}
		if tt.want > 0 {
			clock.advance(tt.want - time.Millisecond)
			ans, err := c.refresh(t.Context(), "AQB")
			if !errors.Is(err, errBackingOff) || ans.retryAfter != "1" {
				t.Errorf("Retry-After %q: a call 1 ms before the end = %v, Retry-After %q; want errBackingOff, 1", tt.retryAfter, err, ans.retryAfter)
			}
			clock.advance(time.Millisecond)
		}
		if ans, err := c.refresh(t.Context(), "AQB"); err != nil || ans.status != 200 {
			t.Errorf("Retry-After %q: a call after %v = %d, %v; want Spotify called again", tt.retryAfter, tt.want, ans.status, err)
		}
		if n := calls.Load(); n != 2 {
			t.Errorf("Retry-After %q: Spotify got %d calls, want 2", tt.retryAfter, n)
		}
		spotify.Close()
	}
}

// TestBasicCredentials checks the Authorization header for credentials
// whose Base64 needs padding (the test suite's own need none): RFC 7617
// wants standard Base64, padding included.
func TestBasicCredentials(t *testing.T) {
	t.Parallel()
	got := make(chan string, 1)
	spotify := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Get("Authorization")
		io.WriteString(w, `{"access_token":"app"}`)
	}))
	defer spotify.Close()
	// Spelled out: base64 of "id1:secret", and of the credentials as they
	// are, not form-encoded first (RFC 6749 2.3.1 would; Spotify does not).
	for _, tt := range []struct{ id, secret, want string }{
		{"id1", "secret", "Basic aWQxOnNlY3JldA=="},
		{"id:1", "a+b/c= d%", "Basic aWQ6MTphK2IvYz0gZCU="},
	} {
		c := newSpotifyClient(spotify.URL, tt.id, tt.secret, time.Second)
		if _, err := c.clientCredentials(t.Context()); err != nil {
			t.Fatal(err)
		}
		if auth := <-got; auth != tt.want {
			t.Errorf("client %q, secret %q: Authorization = %q, want %s", tt.id, tt.secret, auth, tt.want)
		}
	}
}

// TestBackoffAgain checks that a 429 whose body is not JSON starts a
// back-off too, and that a 429 after a back-off has run out starts a new one.
func TestBackoffAgain(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	spotify := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch calls.Add(1) {
		case 1:
			w.Header().Set("Retry-After", "7")
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(429)
			io.WriteString(w, "<html>Too Many Requests</html>")
		case 2:
			w.Header().Set("Retry-After", "2")
			spotifyError(w, 429, "rate_limited", "API rate limit exceeded")
		default:
			io.WriteString(w, `{"access_token":"at"}`)
		}
	}))
	defer spotify.Close()
	clock := newFakeClock()
	c := newSpotifyClient(spotify.URL, testClientID, testClientSecret, time.Second)
	c.now = clock.now
	call := func(when string, wantErr error, wantStatus int) {
		t.Helper()
		if ans, err := c.refresh(t.Context(), "AQB"); !errors.Is(err, wantErr) || ans.status != wantStatus {
			t.Errorf("%s: %d, %v; want %d, %v", when, ans.status, err, wantStatus, wantErr)
		}
	}
	call("first call, Spotify's HTML 429", errSpotifyBadAnswer, 429)
	clock.advance(6 * time.Second)
	call("6 s later", errBackingOff, 0)
	clock.advance(time.Second)
	call("7 s later, Spotify's JSON 429", nil, 429)
	clock.advance(time.Second)
	call("1 s into the second back-off", errBackingOff, 0)
	clock.advance(time.Second)
	call("2 s later", nil, 200)
	if n := calls.Load(); n != 3 {
		t.Errorf("Spotify got %d calls, want 3: none during either back-off", n)
	}
}
