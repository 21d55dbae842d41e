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
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const (
	// maxBodyBytes caps a client's request body; a token request is a few hundred bytes.
	maxBodyBytes = 64 << 10
	// maxPathSegment is the longest path segment the log shows; Spotify's
	// codes and tokens are hundreds of characters.
	maxPathSegment = 32
	// statusClientGone is nginx's 499: the client hung up before its answer.
	statusClientGone = 499
)

// server is the service's HTTP surface, and what it keeps while it runs.
type server struct {
	routes  http.Handler
	logger  *slog.Logger
	guard   *guard
	metrics *metrics
	// stopping is set by main on SIGTERM: from then on /healthz fails and
	// every answer closes its connection.
	stopping atomic.Bool
}

// newServer returns the service's whole HTTP surface: the token endpoints
// in front of spotify, sealing refresh tokens where sealer is not nil,
// accepting the redirect URIs callbackURLs, and calls from browsers on
// corsOrigins.
func newServer(logger *slog.Logger, g *guard, m *metrics, spotify *spotifyClient, sealer *sealer, callbackURLs, corsOrigins []string) *server {
	s := &server{logger: logger, guard: g, metrics: m}
	mux := http.NewServeMux()
	mux.Handle("POST /api/token", s.limit(handleGrant(false, m, spotify, sealer, callbackURLs)))
	mux.Handle("POST /api/refresh_token", s.limit(handleGrant(true, m, spotify, sealer, callbackURLs)))
	mux.Handle("GET /healthz", handleHealth(&s.stopping))
	mux.Handle("GET /{$}", handleIndex())
	// Other methods on those paths, and other paths, get JSON errors too.
	mux.Handle("/api/token", handleMethodNotAllowed("POST"))
	mux.Handle("/api/refresh_token", handleMethodNotAllowed("POST"))
	mux.Handle("/healthz", handleMethodNotAllowed("GET, HEAD"))
	mux.Handle("/{$}", handleMethodNotAllowed("GET, HEAD"))
	mux.Handle("/", handleNotFound())
	s.routes = allowOrigins(corsOrigins, cleanPathsOnly(mux))
	return s
}

// ServeHTTP answers one request, then logs it and counts it.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	s.metrics.inFlight.Add(1)
	defer s.metrics.inFlight.Add(-1)
	ex := &exchange{ResponseWriter: w, status: http.StatusOK, client: s.guard.client(r), requestID: requestID(r)}
	if ex.requestID != "" {
		w.Header().Set("X-Request-Id", ex.requestID) // as logged, so that a user's report and the log line meet
	}
	if s.stopping.Load() {
		// Keep-alive clients reconnect, and the load balancer sends them
		// elsewhere, before the drain closes their idle connections.
		w.Header().Set("Connection", "close")
	}
	s.routes.ServeHTTP(ex, r)
	took := time.Since(start)
	s.metrics.request(route(r.URL.EscapedPath()), ex.status, ex.oauthError, took) // as routed: /api%2Ftoken is no token request
	s.log(r, ex, took)
	if ex.status == statusClientGone {
		// Nothing was written, and nothing must be: net/http would send an
		// empty 200 to a client that only half-closed. Close the connection.
		panic(http.ErrAbortHandler)
	}
}

// handleGrant answers a token endpoint: at /api/token a code exchange, or a
// refresh, as the OAuth client libraries that use one endpoint for both
// send it; at /api/refresh_token (refreshOnly) a refresh.
func handleGrant(refreshOnly bool, m *metrics, spotify *spotifyClient, sealer *sealer, callbackURLs []string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, apiErr := readParams(w, r)
		switch {
		case apiErr != nil:
			writeError(w, apiErr)
		case p.grantType == "refresh_token" || refreshOnly && p.grantType == "":
			forwardRefresh(w, r, m, spotify, sealer, p)
		case refreshOnly:
			writeError(w, &apiError{http.StatusBadRequest, "unsupported_grant_type", "grant_type must be refresh_token here; codes are swapped at /api/token"})
		case p.grantType != "" && p.grantType != "authorization_code":
			writeError(w, &apiError{http.StatusBadRequest, "unsupported_grant_type", "grant_type must be authorization_code or refresh_token"})
		default:
			forwardCode(w, r, m, spotify, sealer, callbackURLs, p)
		}
	})
}

// forwardCode swaps an authorization code for tokens.
func forwardCode(w http.ResponseWriter, r *http.Request, m *metrics, spotify *spotifyClient, sealer *sealer, callbackURLs []string, p params) {
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
	if ex := exchangeOf(w); ex.oauthError == "invalid_grant" {
		// Configuration, not a secret: what Spotify's "Invalid redirect URI" is about.
		ex.reason += " (redirect_uri sent: " + redirectURI + ")"
	}
}

// forwardRefresh forwards a refresh request, opening a sealed refresh token first.
func forwardRefresh(w http.ResponseWriter, r *http.Request, m *metrics, spotify *spotifyClient, sealer *sealer, p params) {
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
		writeError(w, &apiError{http.StatusMethodNotAllowed, "invalid_request", "method " + clip(r.Method) + " is not allowed here; use " + allow})
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
	case name == "refresh_token" && p.code != "":
		return invalidRequest("refresh_token is required; codes are swapped at /api/token")
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

// errTooLarge is answered in two places.
var errTooLarge = &apiError{http.StatusRequestEntityTooLarge, "invalid_request", "the request body is larger than 64 KiB"}

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
			writeError(w, &apiError{http.StatusForbidden, "invalid_request", "origin \"" + printable(origin) + "\" may not call this service from a browser: it is not in CORS_ALLOWED_ORIGINS"})
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
			h.Set("Access-Control-Allow-Headers", "Content-Type, X-Request-Id")
			h.Set("Access-Control-Max-Age", "7200") // the most Chromium keeps a preflight
			w.WriteHeader(http.StatusNoContent)
			return
		}
		h.Set("Access-Control-Expose-Headers", "Retry-After, X-Request-Id")
		next.ServeHTTP(w, r)
	})
}

// exchange is the ResponseWriter the handlers see: it keeps what the
// request's log line and metrics report.
type exchange struct {
	http.ResponseWriter
	status        int
	client        netip.Addr // as the guard sees it
	requestID     string     // the request's X-Request-Id, as logged
	spotifyStatus int        // 0 where Spotify was not called or did not answer
	oauthError    string     // the "error" of the answer, the service's own or Spotify's
	reason        string     // why the answer is not a success, for the operator
}

func (ex *exchange) WriteHeader(status int) {
	ex.status = status
	ex.ResponseWriter.WriteHeader(status)
}

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
		slog.String("method", clip(r.Method)), // a token: nothing to escape
		slog.String("path", logPath(r.URL.EscapedPath())),
		slog.Int("status", ex.status),
		slog.Int64("duration_us", took.Microseconds()), // slog encodes floats slowly
		slog.String("client", ex.client.String()))
	if ex.spotifyStatus != 0 {
		attrs = append(attrs, slog.Int("spotify_status", ex.spotifyStatus))
	}
	if ex.requestID != "" {
		attrs = append(attrs, slog.String("request_id", ex.requestID))
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

// logPath is a request's path, escaped, as the log shows it: cut to
// maxClientValue bytes, and with any segment longer than the service's own,
// such as a code or a token a client put in the path, masked.
func logPath(path string) string {
	if len(path) <= maxPathSegment {
		return path
	}
	segments := strings.Split(clip(path), "/")
	for i, s := range segments {
		if len(s) > maxPathSegment {
			segments[i] = "(" + strconv.Itoa(len(s)) + " characters)"
		}
	}
	return strings.Join(segments, "/")
}

// requestID returns the request's X-Request-Id as the log and the answer
// carry it.
func requestID(r *http.Request) string {
	return printable(r.Header.Get("X-Request-Id"))
}

// limit answers 429 to a client over RATE_LIMIT, before its body is read.
func (s *server) limit(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if wait, hit := s.guard.allow(exchangeOf(w).client); wait > 0 {
			seconds := strconv.Itoa(wholeSeconds(wait))
			w.Header().Set("Retry-After", seconds)
			writeError(w, &apiError{http.StatusTooManyRequests, "temporarily_unavailable", hit + " (RATE_LIMIT); retry in " + seconds + " s"})
			return
		}
		next.ServeHTTP(w, r)
	})
}
