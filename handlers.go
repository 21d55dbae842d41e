package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"path"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// maxBodyBytes caps a client's request body; a token request is a few hundred bytes.
	maxBodyBytes = 64 << 10
	// maxRequestID caps the X-Request-Id kept for the log.
	maxRequestID = 128
	// maxPathSegment is the longest path segment the log shows; Spotify's
	// codes and tokens are hundreds of characters.
	maxPathSegment = 32
	// statusClientGone is nginx's 499: the client hung up before its answer.
	statusClientGone = 499
)

// server is the service's HTTP surface, and what it keeps while it runs.
type server struct {
	routes     http.Handler
	logger     *slog.Logger
	limiter    *limiter // nil when RATE_LIMIT is off
	trustProxy int      // TRUST_PROXY
	metrics    metrics
	// stopping is set by main on SIGTERM: from then on /healthz fails and
	// every answer closes its connection.
	stopping atomic.Bool
	inFlight atomic.Int64
	// warnedProxy is set once the X-Forwarded-For warning is logged.
	warnedProxy atomic.Bool
}

// newServer returns the service's whole HTTP surface.
func newServer(logger *slog.Logger, cfg config, spotify *spotifyClient) *server {
	s := &server{logger: logger, trustProxy: cfg.trustProxy, metrics: metrics{start: time.Now()}}
	if cfg.rateLimit > 0 {
		s.limiter = newLimiter(cfg.rateLimit, cfg.ratePer)
	}
	mux := http.NewServeMux()
	mux.Handle("POST /api/token", s.limit(handleToken(&s.metrics, spotify, cfg.sealer, cfg.callbackURLs)))
	mux.Handle("POST /api/refresh_token", s.limit(handleRefresh(&s.metrics, spotify, cfg.sealer)))
	mux.Handle("GET /healthz", handleHealth(&s.stopping))
	mux.Handle("GET /{$}", handleIndex())
	// Other methods on those paths, and other paths, get JSON errors too.
	mux.Handle("/api/token", handleMethodNotAllowed("POST"))
	mux.Handle("/api/refresh_token", handleMethodNotAllowed("POST"))
	mux.Handle("/healthz", handleMethodNotAllowed("GET, HEAD"))
	mux.Handle("/{$}", handleMethodNotAllowed("GET, HEAD"))
	mux.Handle("/", handleNotFound())
	s.routes = allowOrigins(cfg.corsOrigins, cleanPathsOnly(mux))
	return s
}

// ServeHTTP answers one request, then logs it and counts it.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	s.inFlight.Add(1)
	defer s.inFlight.Add(-1)
	ex := &exchange{ResponseWriter: w, status: http.StatusOK, client: s.clientAddr(r)}
	if s.stopping.Load() {
		// Keep-alive clients reconnect, and the load balancer sends them
		// elsewhere, before the drain closes their idle connections.
		w.Header().Set("Connection", "close")
	}
	s.routes.ServeHTTP(ex, r)
	took := time.Since(start)
	s.metrics.request(route(r.URL.Path), ex.status, ex.oauthError, took)
	s.log(r, ex, took)
}

// handleToken swaps an authorization code for tokens. OAuth client libraries
// that use one token endpoint for both grants send refresh requests here too.
func handleToken(m *metrics, spotify *spotifyClient, sealer *sealer, callbackURLs []string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, apiErr := readParams(w, r)
		if apiErr != nil {
			writeError(w, apiErr)
			return
		}
		switch p.grantType {
		case "", "authorization_code":
		case "refresh_token":
			refresh(w, r, m, spotify, sealer, p)
			return
		default:
			writeError(w, errUnsupportedGrant)
			return
		}
		if p.code == "" {
			writeError(w, missing(r, p, "code"))
			return
		}
		redirectURI := callbackURLs[0]
		if p.redirectURI != "" {
			if !slices.Contains(callbackURLs, p.redirectURI) {
				writeError(w, invalidRequest("redirect_uri is not one of the callback URLs this service is configured with"))
				return
			}
			redirectURI = p.redirectURI
		}
		start := time.Now()
		ans, err := spotify.exchangeCode(r.Context(), p.code, redirectURI, p.codeVerifier)
		relay(w, r, m, ans, err, time.Since(start), sealer)
	})
}

// handleRefresh trades a refresh token for a new access token.
func handleRefresh(m *metrics, spotify *spotifyClient, sealer *sealer) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, apiErr := readParams(w, r)
		if apiErr != nil {
			writeError(w, apiErr)
			return
		}
		if p.grantType != "" && p.grantType != "refresh_token" {
			writeError(w, &apiError{http.StatusBadRequest, "unsupported_grant_type", "grant_type must be refresh_token here; codes are swapped at /api/token"})
			return
		}
		refresh(w, r, m, spotify, sealer, p)
	})
}

// refresh forwards a refresh request, opening a sealed refresh token first.
func refresh(w http.ResponseWriter, r *http.Request, m *metrics, spotify *spotifyClient, sealer *sealer, p params) {
	token := p.refreshToken
	if token == "" {
		writeError(w, missing(r, p, "refresh_token"))
		return
	}
	if sealer != nil {
		var err error
		if token, err = sealer.open(token); err != nil {
			// Never pass an unsealed token on: with sealing on, clients hold sealed ones only.
			writeError(w, &apiError{http.StatusBadRequest, "invalid_grant", errNotSealed.Error()})
			return
		}
	}
	start := time.Now()
	ans, err := spotify.refresh(r.Context(), token)
	relay(w, r, m, ans, err, time.Since(start), sealer)
}

// relay answers with Spotify's status and body, or with the error that says
// why Spotify gave no usable answer, and counts the call.
func relay(w http.ResponseWriter, r *http.Request, m *metrics, ans answer, err error, took time.Duration, sealer *sealer) {
	ex := exchangeOf(w)
	ex.spotifyStatus = ans.status
	clientGone := errors.Is(err, context.Canceled) && r.Context().Err() != nil
	if !errors.Is(err, errBackingOff) {
		m.spotifyCall(ans.status, err, clientGone, took)
	}
	if ans.retryAfter != "" {
		w.Header().Set("Retry-After", ans.retryAfter)
	}
	switch {
	case clientGone:
		// Nobody is left to answer, and nothing failed but the client.
		ex.status, ex.reason = statusClientGone, "the client hung up before its answer; the call to Spotify was cancelled"
		return
	case errors.Is(err, errBackingOff) || errors.Is(err, errSpotifyBadAnswer) && ans.status == http.StatusTooManyRequests:
		writeError(w, &apiError{http.StatusTooManyRequests, "temporarily_unavailable", "Spotify is rate limiting this app; retry later"})
	case errors.Is(err, errSpotifyTimeout):
		writeError(w, &apiError{http.StatusGatewayTimeout, "server_error", "Spotify did not answer in time"})
	case errors.Is(err, errSpotifyBadAnswer):
		writeError(w, &apiError{http.StatusBadGateway, "server_error", "Spotify's answer was not usable"})
	case err != nil:
		writeError(w, &apiError{http.StatusBadGateway, "server_error", "Spotify could not be reached"})
	case sealer != nil && ans.status == http.StatusOK:
		writeJSON(w, http.StatusOK, sealer.sealAnswer(ans.body))
	default:
		if ans.status/100 != 2 {
			code, description := oauthError(ans.body)
			ex.oauthError, ex.reason = code, "Spotify: "+cmp.Or(description, code, "status "+strconv.Itoa(ans.status))
		}
		writeJSON(w, ans.status, ans.body)
	}
	if err != nil {
		ex.reason = err.Error() // the operator's why, not the client's
	}
}

// handleHealth answers load balancers' and platforms' health checks; it fails
// once the service is stopping, so that they send no new clients.
func handleHealth(stopping *atomic.Bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if stopping.Load() {
			exchangeOf(w).reason = "the service is stopping"
			writeJSON(w, http.StatusServiceUnavailable, []byte(`{"status":"stopping"}`))
			return
		}
		writeJSON(w, http.StatusOK, []byte(`{"status":"ok"}`))
	})
}

// handleIndex tells a person who opens the service's URL that it runs. It
// shows no setting.
func handleIndex() http.Handler {
	body := []byte(`{"service":"spotify-token-swap","endpoints":["POST /api/token","POST /api/refresh_token","GET /healthz"]}`)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, body)
	})
}

func handleMethodNotAllowed(allow string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allow)
		writeError(w, &apiError{http.StatusMethodNotAllowed, "invalid_request", "method " + r.Method + " is not allowed here; use " + allow})
	})
}

func handleNotFound() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeError(w, &apiError{http.StatusNotFound, "not_found", "no such endpoint; the endpoints are POST /api/token and POST /api/refresh_token"})
	})
}

// cleanPathsOnly answers a path such as //, //api/token or /a/../api/token
// with 404 itself: ServeMux would redirect it with a reply that is not JSON.
func cleanPathsOnly(next http.Handler) http.Handler {
	notFound := handleNotFound()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.EscapedPath()
		if clean := path.Clean(p); clean != p && clean+"/" != p || strings.Contains(p, "//") {
			notFound.ServeHTTP(w, r)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// params are the fields of a token request that the service reads. A field
// whose value is empty or "(null)" (the Spotify iOS SDK's nil) counts as absent.
type params struct {
	grantType, code, redirectURI, codeVerifier, refreshToken string
	// seen has one bit per field, to refuse a field sent twice.
	seen uint8
}

// field returns where the named field's value goes and its bit in seen, or
// nil for a field the service does not read.
func (p *params) field(name string) (*string, uint8) {
	switch name {
	case "grant_type":
		return &p.grantType, 1 << 0
	case "code":
		return &p.code, 1 << 1
	case "redirect_uri":
		return &p.redirectURI, 1 << 2
	case "code_verifier":
		return &p.codeVerifier, 1 << 3
	case "refresh_token":
		return &p.refreshToken, 1 << 4
	}
	return nil, 0
}

// set stores a field's value; fields the service does not read are ignored.
func (p *params) set(name, value string) error {
	dst, bit := p.field(name)
	if dst == nil {
		return nil
	}
	if p.seen&bit != 0 {
		// RFC 6749 §3.2: parameters must not be included more than once.
		return fmt.Errorf("%s is sent more than once", name)
	}
	p.seen |= bit
	if value != "(null)" {
		*dst = value
	}
	return nil
}

// readParams reads the request body, a form or a JSON object. A body without
// a Content-Type is a form: the Spotify iOS SDK sends one.
func readParams(w http.ResponseWriter, r *http.Request) (params, *apiError) {
	var p params
	media := mediaType(r.Header.Get("Content-Type"))
	if media != "" && media != "application/x-www-form-urlencoded" && media != "application/json" {
		return p, &apiError{http.StatusUnsupportedMediaType, "invalid_request", "Content-Type must be application/x-www-form-urlencoded or application/json"}
	}
	if r.ContentLength > maxBodyBytes {
		return p, errTooLarge
	}
	body, err := readBody(http.MaxBytesReader(w, r.Body, maxBodyBytes), r.ContentLength, maxBodyBytes)
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			return p, errTooLarge
		}
		return p, invalidRequest("the request body could not be read")
	}
	switch {
	case media != "application/json" && bytes.HasPrefix(bytes.TrimLeft(body, " \t\r\n"), []byte("{")):
		return p, invalidRequest("the body is JSON: send it with Content-Type: application/json")
	case media == "application/json":
		err = p.parseJSON(body)
	default:
		err = p.parseForm(string(body))
	}
	if err != nil {
		return p, invalidRequest(err.Error())
	}
	return p, nil
}

// mediaType returns a Content-Type without its parameters, in lower case.
func mediaType(contentType string) string {
	t, _, _ := strings.Cut(contentType, ";")
	return strings.ToLower(strings.TrimSpace(t))
}

// parseForm reads an application/x-www-form-urlencoded body.
func (p *params) parseForm(body string) error {
	for body != "" {
		var pair string
		pair, body, _ = strings.Cut(body, "&")
		if pair == "" {
			continue
		}
		name, value, _ := strings.Cut(pair, "=")
		name, err1 := url.QueryUnescape(name)
		value, err2 := url.QueryUnescape(value)
		if err1 != nil || err2 != nil {
			return errors.New("the form body has a malformed %-escape")
		}
		if err := p.set(name, value); err != nil {
			return err
		}
	}
	return nil
}

// parseJSON reads a JSON object. The members the service reads must be
// strings or null; the others may be anything.
func (p *params) parseJSON(body []byte) error {
	errNotObject := errors.New("the body is not one JSON object")
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return errNotObject
	}
	for dec.More() {
		tok, err := dec.Token()
		name, ok := tok.(string)
		if err != nil || !ok {
			return errNotObject
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return errNotObject
		}
		if dst, _ := p.field(name); dst == nil {
			continue
		}
		var value string // null leaves it empty: absent
		if json.Unmarshal(raw, &value) != nil {
			return fmt.Errorf("%s must be a JSON string", name)
		}
		if err := p.set(name, value); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return errNotObject
	}
	if _, err := dec.Token(); err != io.EOF {
		return errNotObject
	}
	return nil
}

// missing is the answer to a request without a required field, with a hint
// where the field may have gone astray.
func missing(r *http.Request, p params, name string) *apiError {
	switch {
	case name == "code" && p.refreshToken != "":
		return invalidRequest("code is required; to refresh, send grant_type=refresh_token with the refresh_token, or post it to /api/refresh_token")
	case r.URL.RawQuery != "":
		return invalidRequest(name + " is required in the request body (a form or JSON); parameters in the URL query are not read")
	}
	return invalidRequest(name + " is required")
}

// apiError is an answer in OAuth's error shape (RFC 6749 §5.2).
type apiError struct {
	status      int
	code        string // the "error" member
	description string
}

// Errors answered in more than one place.
var (
	errUnsupportedGrant = &apiError{http.StatusBadRequest, "unsupported_grant_type", "grant_type must be authorization_code or refresh_token"}
	errTooLarge         = &apiError{http.StatusRequestEntityTooLarge, "invalid_request", "the request body is larger than 64 KiB"}
)

func invalidRequest(description string) *apiError {
	return &apiError{http.StatusBadRequest, "invalid_request", description}
}

func writeError(w http.ResponseWriter, e *apiError) {
	ex := exchangeOf(w)
	ex.oauthError, ex.reason = e.code, e.description
	body, _ := json.Marshal(struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}{e.code, e.description})
	writeJSON(w, e.status, body)
}

// writeJSON writes every answer of the service. The headers go before
// WriteHeader: a header set after it is silently dropped.
func writeJSON(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("Cache-Control", "no-store") // RFC 6749 §5.1: tokens must not be cached
	h.Set("Pragma", "no-cache")
	w.WriteHeader(status)
	w.Write(body)
}

// allowOrigins lets web pages from the given origins ("*" for any) call the
// service from a browser, and answers CORS preflight requests: 204 for an
// origin allowed, 403 otherwise, so that whoever reads the browser's network
// tab sees why.
func allowOrigins(origins []string, next http.Handler) http.Handler {
	anyOrigin := len(origins) == 1 && origins[0] == "*"
	vary := len(origins) > 0 && !anyOrigin // the answer depends on Origin, even where it is not allowed
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		if vary {
			h.Add("Vary", "Origin")
		}
		origin := r.Header.Get("Origin")
		allowed := origin != "" && (anyOrigin || slices.Contains(origins, origin))
		preflight := r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != ""
		switch {
		case preflight && len(origins) == 0:
			writeError(w, &apiError{http.StatusForbidden, "invalid_request", "no web page may call this service from a browser: CORS_ALLOWED_ORIGINS is not set"})
			return
		case preflight && !allowed:
			writeError(w, &apiError{http.StatusForbidden, "invalid_request", "origin " + strconv.Quote(origin) + " may not call this service from a browser: it is not in CORS_ALLOWED_ORIGINS"})
			return
		case !allowed:
			next.ServeHTTP(w, r)
			return
		}
		if anyOrigin {
			origin = "*"
		}
		h.Set("Access-Control-Allow-Origin", origin)
		if preflight {
			h.Set("Access-Control-Allow-Methods", "POST, OPTIONS")
			h.Set("Access-Control-Allow-Headers", "Content-Type")
			h.Set("Access-Control-Max-Age", "7200") // the most Chromium keeps a preflight
			w.WriteHeader(http.StatusNoContent)
			return
		}
		h.Set("Access-Control-Expose-Headers", "Retry-After")
		next.ServeHTTP(w, r)
	})
}

// exchange is the ResponseWriter the handlers see: it keeps what the
// request's log line and metrics report.
type exchange struct {
	http.ResponseWriter
	status        int
	client        netip.Addr // as the rate limiter sees it
	spotifyStatus int        // 0 where Spotify was not called or did not answer
	oauthError    string     // the "error" of the answer, the service's own or Spotify's
	reason        string     // why the answer is not a success, for the operator
}

func (ex *exchange) WriteHeader(status int) {
	ex.status = status
	ex.ResponseWriter.WriteHeader(status)
}

func (ex *exchange) Unwrap() http.ResponseWriter { return ex.ResponseWriter }

// exchangeOf returns the exchange a handler answers through, for its notes
// to the log line; a handler run on its own, as in a test, gets a spare one.
func exchangeOf(w http.ResponseWriter) *exchange {
	if ex, ok := w.(*exchange); ok {
		return ex
	}
	return &exchange{}
}

// log writes the request's one line. It logs no body, no query and no
// header but X-Request-Id, so no code, token or secret can reach the log.
func (s *server) log(r *http.Request, ex *exchange, took time.Duration) {
	attrs := make([]slog.Attr, 0, 10)
	attrs = append(attrs,
		slog.String("method", r.Method),
		slog.String("path", logPath(r.URL.Path)),
		slog.Int("status", ex.status),
		slog.Int64("duration_us", took.Microseconds()), // slog encodes floats slowly
		slog.String("client", ex.client.String()))
	if ex.spotifyStatus != 0 {
		attrs = append(attrs, slog.Int("spotify_status", ex.spotifyStatus))
	}
	if id := requestID(r); id != "" {
		attrs = append(attrs, slog.String("request_id", id))
	}
	if ex.oauthError != "" {
		attrs = append(attrs, slog.String("error", ex.oauthError))
	}
	if ex.reason != "" {
		attrs = append(attrs, slog.String("reason", ex.reason))
	}
	level := slog.LevelInfo
	if ex.status >= 500 && r.URL.Path != "/healthz" { // its 503 while stopping is no failure
		level = slog.LevelWarn
	}
	s.logger.LogAttrs(r.Context(), level, "request", attrs...)
}

// logPath is a request's path as the log shows it: a segment longer than
// any of the service's, such as a code or a token a client put in the
// path, is masked.
func logPath(path string) string {
	if len(path) <= maxPathSegment {
		return path
	}
	segments := strings.Split(path, "/")
	for i, s := range segments {
		if len(s) > maxPathSegment {
			segments[i] = "(" + strconv.Itoa(len(s)) + " characters)"
		}
	}
	return strings.Join(segments, "/")
}

// requestID returns the request's X-Request-Id, cut to maxRequestID bytes
// and to printable ASCII, so that no client can flood or forge log lines.
func requestID(r *http.Request) string {
	id := r.Header.Get("X-Request-Id")
	if len(id) > maxRequestID {
		id = id[:maxRequestID]
	}
	return strings.Map(func(c rune) rune {
		if c < ' ' || c > '~' {
			return -1
		}
		return c
	}, id)
}

// clientAddr is the address a request's rate limit and log line go by: the
// TCP peer's, or with TRUST_PROXY=n the nth entry from the right of
// X-Forwarded-For, which the n proxies in front appended.
func (s *server) clientAddr(r *http.Request) netip.Addr {
	peer, _ := netip.ParseAddrPort(r.RemoteAddr)
	if s.trustProxy == 0 {
		if s.limiter != nil && r.Header["X-Forwarded-For"] != nil && s.warnedProxy.CompareAndSwap(false, true) {
			s.logger.Warn("a request came with X-Forwarded-For but TRUST_PROXY is 0: every client behind that proxy shares one rate limit; set TRUST_PROXY to the number of proxies in front")
		}
	} else if addr, ok := forwardedFor(r.Header.Values("X-Forwarded-For"), s.trustProxy); ok {
		return addr.Unmap()
	}
	return peer.Addr().Unmap()
}

// forwardedFor returns the nth entry from the right of X-Forwarded-For, the
// headers read as one list in order; with fewer entries, the leftmost. ok is
// false where there is none, or it is not an IP address.
func forwardedFor(headers []string, n int) (addr netip.Addr, ok bool) {
	entry := ""
	for i := len(headers) - 1; i >= 0 && n > 0; i-- {
		list := headers[i]
		for n > 0 {
			comma := strings.LastIndexByte(list, ',')
			entry, n = list[comma+1:], n-1
			if comma < 0 {
				break
			}
			list = list[:comma]
		}
	}
	addr, err := netip.ParseAddr(strings.TrimSpace(entry)) // none: "", which is no address
	return addr, err == nil
}

// limit answers 429 to a client over RATE_LIMIT, before its body is read.
func (s *server) limit(next http.Handler) http.Handler {
	if s.limiter == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if wait := s.limiter.wait(exchangeOf(w).client); wait > 0 {
			s.metrics.rateLimited.Add(1)
			seconds := strconv.Itoa(wholeSeconds(wait))
			w.Header().Set("Retry-After", seconds)
			writeError(w, &apiError{http.StatusTooManyRequests, "temporarily_unavailable", "too many requests from this address (RATE_LIMIT); retry in " + seconds + " s"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// maxClients bounds the limiter's table, whatever the number of distinct
// addresses, forged ones included: about 5 MiB.
const maxClients = 1 << 16

// limiter is a rate limiter per client (GCRA, the token bucket's twin): a
// client may make burst requests at once, then one every interval. The
// IPv6 addresses of one /64, one subscriber's, count as one client.
type limiter struct {
	interval time.Duration
	burst    time.Duration // how far ahead of now a client's schedule may run: (N-1) intervals
	now      func() time.Time
	epoch    time.Time // times in tat count from here: 8 bytes each, not time.Time's 24
	mu       sync.Mutex
	// tat is each client's theoretical arrival time: when it would have
	// its burst back. A client whose tat has passed is as good as new, so
	// it may be forgotten.
	tat map[netip.Addr]time.Duration
}

// newLimiter allows n requests at once per client, and n per period.
func newLimiter(n int, period time.Duration) *limiter {
	interval := period / time.Duration(n)
	return &limiter{interval: interval, burst: time.Duration(n-1) * interval, now: time.Now, epoch: time.Now(), tat: make(map[netip.Addr]time.Duration)}
}

// wait counts a request of client's and returns 0 if it may go ahead, or
// else how long until it may.
func (l *limiter) wait(client netip.Addr) time.Duration {
	if client.Is6() {
		prefix, _ := client.Prefix(64)
		client = prefix.Addr()
	}
	now := l.now().Sub(l.epoch)
	l.mu.Lock()
	defer l.mu.Unlock()
	tat, known := l.tat[client]
	if !known && len(l.tat) >= maxClients {
		l.forget(now)
	}
	if !known || tat < now {
		tat = now
	}
	if wait := tat - now - l.burst; wait > 0 {
		return wait
	}
	l.tat[client] = tat + l.interval
	return 0
}

// forget makes room in a full table: clients with their burst back go
// first, then arbitrary others (Go's map order is random) down to three
// quarters, so that a flood of new addresses sweeps once per quarter.
func (l *limiter) forget(now time.Duration) {
	for client, tat := range l.tat {
		if tat <= now {
			delete(l.tat, client)
		}
	}
	for client := range l.tat {
		if len(l.tat) < maxClients*3/4 {
			break
		}
		delete(l.tat, client)
	}
}

// The metrics count by route: a path a client chose must not become a label.
const (
	numRoutes   = 5
	routeLabels = "token refresh_token healthz index other"
)

// route returns the index in routeLabels of a request's path.
func route(path string) int {
	if i := slices.Index([]string{"/api/token", "/api/refresh_token", "/healthz", "/"}, path); i >= 0 {
		return i
	}
	return numRoutes - 1 // other
}

// metrics are the counters GET /metrics shows: fixed tables of atomic
// counters, indexed by route and status, so that counting allocates nothing
// and no client can add a series.
type metrics struct {
	start           time.Time
	requests        [numRoutes][1000]atomic.Uint64 // by route and HTTP status
	requestDuration [numRoutes]histogram
	// spotifyCalls counts calls by Spotify's status; spotifyFailed those
	// that got none, by spotifyFailures.
	spotifyCalls    [1000]atomic.Uint64
	spotifyFailed   [3]atomic.Uint64
	spotifyDuration histogram
	rateLimited     atomic.Uint64
	errors          [numOAuthErrors]atomic.Uint64 // by oauthErrors
}

const (
	// spotifyFailures label the calls to Spotify that gave no status.
	spotifyFailures = "timeout unreachable canceled"
	// oauthErrors label the answers that carry an OAuth error: RFC 6749's,
	// and this service's not_found; any other counts as "other".
	oauthErrors    = "invalid_request invalid_client invalid_grant unauthorized_client unsupported_grant_type invalid_scope server_error temporarily_unavailable not_found other"
	numOAuthErrors = 10
)

func (m *metrics) request(route, status int, oauthError string, took time.Duration) {
	m.requests[route][min(uint(status), 999)].Add(1)
	m.requestDuration[route].observe(took)
	if oauthError != "" { // not on the hot path: successes carry none
		labels := strings.Fields(oauthErrors)
		i := slices.Index(labels, oauthError)
		if i < 0 {
			i = len(labels) - 1
		}
		m.errors[i].Add(1)
	}
}

func (m *metrics) spotifyCall(status int, err error, clientGone bool, took time.Duration) {
	switch {
	case clientGone:
		m.spotifyFailed[2].Add(1)
	case errors.Is(err, errSpotifyTimeout):
		m.spotifyFailed[0].Add(1)
	case errors.Is(err, errSpotifyUnreachable):
		m.spotifyFailed[1].Add(1)
	default:
		m.spotifyCalls[min(uint(status), 999)].Add(1)
	}
	m.spotifyDuration.observe(took)
}

const numBuckets = 11

// bucketBounds are the histograms' upper bounds, for a call to Spotify that
// takes 50 ms to 10 s and an answer of the service's own that takes less.
func bucketBounds() [numBuckets]time.Duration {
	return [...]time.Duration{5e6, 10e6, 25e6, 50e6, 100e6, 250e6, 500e6, 1e9, 2.5e9, 5e9, 10e9}
}

// histogram counts durations per bucket, the last for those over every bound.
type histogram struct {
	counts [numBuckets + 1]atomic.Uint64
	sum    atomic.Int64 // nanoseconds
}

func (h *histogram) observe(d time.Duration) {
	i := 0
	for bounds := bucketBounds(); i < len(bounds) && d > bounds[i]; i++ {
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

// write prints h in the Prometheus text format; labels are the series'
// own, such as handler="token", or "".
func (h *histogram) write(w io.Writer, name, labels string) {
	braces := ""
	if labels != "" {
		braces, labels = "{"+labels+"}", labels+","
	}
	var count uint64
	for i, bound := range bucketBounds() {
		count += h.counts[i].Load()
		fmt.Fprintf(w, "%s_bucket{%sle=\"%g\"} %d\n", name, labels, bound.Seconds(), count)
	}
	count += h.counts[len(h.counts)-1].Load()
	fmt.Fprintf(w, "%s_bucket{%sle=\"+Inf\"} %d\n", name, labels, count)
	fmt.Fprintf(w, "%s_sum%s %g\n%s_count%s %d\n", name, braces, time.Duration(h.sum.Load()).Seconds(), name, braces, count)
}

// metricsHandler serves GET /metrics in the Prometheus text format 0.0.4,
// for the listener on METRICS_ADDR.
func (s *server) metricsHandler(version string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		m := &s.metrics
		var b bytes.Buffer
		family := func(name, kind, help string) { fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind) }
		// counters prints the counters of a series that are not 0.
		counters := func(name string, counts []atomic.Uint64, labels func(i int) string) {
			for i := range counts {
				if n := counts[i].Load(); n > 0 {
					fmt.Fprintf(&b, "%s{%s} %d\n", name, labels(i), n)
				}
			}
		}
		routes := strings.Fields(routeLabels)
		family("tokenswap_requests_total", "counter", "Requests answered, by handler and HTTP status (499: the client hung up).")
		for route := range m.requests {
			counters("tokenswap_requests_total", m.requests[route][:], func(code int) string { return fmt.Sprintf(`handler=%q,code="%d"`, routes[route], code) })
		}
		family("tokenswap_request_duration_seconds", "histogram", "Time to answer a request, by handler.")
		for route := range m.requestDuration {
			m.requestDuration[route].write(&b, "tokenswap_request_duration_seconds", `handler="`+routes[route]+`"`)
		}
		family("tokenswap_requests_in_flight", "gauge", "Requests being answered.")
		fmt.Fprintf(&b, "tokenswap_requests_in_flight %d\n", s.inFlight.Load())
		family("tokenswap_spotify_requests_total", "counter", "Calls to Spotify's token endpoint, by its status, or why it gave none.")
		counters("tokenswap_spotify_requests_total", m.spotifyCalls[:], func(code int) string { return fmt.Sprintf(`code="%d"`, code) })
		failures := strings.Fields(spotifyFailures)
		counters("tokenswap_spotify_requests_total", m.spotifyFailed[:], func(i int) string { return fmt.Sprintf("code=%q", failures[i]) })
		family("tokenswap_spotify_request_duration_seconds", "histogram", "Time a call to Spotify took.")
		m.spotifyDuration.write(&b, "tokenswap_spotify_request_duration_seconds", "")
		family("tokenswap_errors_total", "counter", "Answers that carry an OAuth error, the service's own or Spotify's, by error.")
		errs := strings.Fields(oauthErrors)
		counters("tokenswap_errors_total", m.errors[:], func(i int) string { return fmt.Sprintf("error=%q", errs[i]) })
		family("tokenswap_rate_limited_total", "counter", "Requests refused for going over RATE_LIMIT.")
		fmt.Fprintf(&b, "tokenswap_rate_limited_total %d\n", m.rateLimited.Load())
		family("tokenswap_build_info", "gauge", "The version running, as a label; always 1.")
		fmt.Fprintf(&b, "tokenswap_build_info{version=%q} 1\n", version)
		family("go_goroutines", "gauge", "Number of goroutines that currently exist.")
		fmt.Fprintf(&b, "go_goroutines %d\n", runtime.NumGoroutine())
		family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
		fmt.Fprintf(&b, "process_start_time_seconds %s\n", strconv.FormatFloat(float64(m.start.UnixMilli())/1e3, 'f', 3, 64))
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Write(b.Bytes())
	})
	return mux
}
