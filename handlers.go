package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

// maxBodyBytes caps a client's request body; a token request is a few hundred bytes.
const maxBodyBytes = 64 << 10

// newServer returns the service's whole HTTP surface.
func newServer(logger *slog.Logger, cfg config, spotify *spotifyClient) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("POST /api/token", handleToken(spotify, cfg.sealer, cfg.callbackURLs))
	mux.Handle("POST /api/refresh_token", handleRefresh(spotify, cfg.sealer))
	mux.Handle("GET /healthz", handleHealth())
	mux.Handle("GET /{$}", handleIndex())
	// Other methods on those paths, and other paths, get JSON errors too.
	mux.Handle("/api/token", handleMethodNotAllowed("POST"))
	mux.Handle("/api/refresh_token", handleMethodNotAllowed("POST"))
	mux.Handle("/healthz", handleMethodNotAllowed("GET, HEAD"))
	mux.Handle("/{$}", handleMethodNotAllowed("GET, HEAD"))
	mux.Handle("/", handleNotFound())
	return logRequests(logger, allowOrigins(cfg.corsOrigins, cleanPathsOnly(mux)))
}

// handleToken swaps an authorization code for tokens. OAuth client libraries
// that use one token endpoint for both grants send refresh requests here too.
func handleToken(spotify *spotifyClient, sealer *sealer, callbackURLs []string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, apiErr := readParams(w, r)
		if apiErr != nil {
			writeError(w, apiErr)
			return
		}
		switch p.grantType {
		case "", "authorization_code":
		case "refresh_token":
			refresh(w, r, spotify, sealer, p)
			return
		default:
			writeError(w, errUnsupportedGrant)
			return
		}
		if p.code == "" {
			writeError(w, invalidRequest("code is required"))
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
		ans, err := spotify.exchangeCode(r.Context(), p.code, redirectURI, p.codeVerifier)
		relay(w, ans, err, sealer)
	})
}

// handleRefresh trades a refresh token for a new access token.
func handleRefresh(spotify *spotifyClient, sealer *sealer) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, apiErr := readParams(w, r)
		if apiErr != nil {
			writeError(w, apiErr)
			return
		}
		if p.grantType != "" && p.grantType != "refresh_token" {
			writeError(w, errUnsupportedGrant)
			return
		}
		refresh(w, r, spotify, sealer, p)
	})
}

// refresh forwards a refresh request, opening a sealed refresh token first.
func refresh(w http.ResponseWriter, r *http.Request, spotify *spotifyClient, sealer *sealer, p params) {
	token := p.refreshToken
	if token == "" {
		writeError(w, invalidRequest("refresh_token is required"))
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
	ans, err := spotify.refresh(r.Context(), token)
	relay(w, ans, err, sealer)
}

// relay answers with Spotify's status and body, or with the error that says
// why Spotify gave no usable answer.
func relay(w http.ResponseWriter, ans answer, err error, sealer *sealer) {
	if lw, ok := w.(*logWriter); ok {
		lw.spotifyStatus, lw.err = ans.status, err
	}
	if ans.retryAfter != "" {
		w.Header().Set("Retry-After", ans.retryAfter)
	}
	switch {
	case errors.Is(err, errSpotifyTimeout):
		writeError(w, &apiError{http.StatusGatewayTimeout, "server_error", "Spotify did not answer in time"})
	case errors.Is(err, errSpotifyBadAnswer) && ans.status == http.StatusTooManyRequests:
		writeError(w, &apiError{http.StatusTooManyRequests, "temporarily_unavailable", "Spotify is rate limiting this app; retry later"})
	case errors.Is(err, errSpotifyBadAnswer):
		writeError(w, &apiError{http.StatusBadGateway, "server_error", "Spotify's answer was not usable"})
	case err != nil:
		writeError(w, &apiError{http.StatusBadGateway, "server_error", "Spotify could not be reached"})
	case sealer != nil && ans.status == http.StatusOK:
		writeJSON(w, http.StatusOK, sealer.sealAnswer(ans.body))
	default:
		writeJSON(w, ans.status, ans.body)
	}
}

func handleHealth() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
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

// cleanPathsOnly answers a path such as //api/token or /a/../api/token with
// 404 itself: ServeMux would redirect it with a reply that is not JSON.
func cleanPathsOnly(next http.Handler) http.Handler {
	notFound := handleNotFound()
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.EscapedPath()
		if clean := path.Clean(p); clean != p && clean+"/" != p {
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
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		if errors.As(err, new(*http.MaxBytesError)) {
			return p, errTooLarge
		}
		return p, invalidRequest("the request body could not be read")
	}
	if media == "application/json" {
		err = p.parseJSON(body)
	} else {
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
// service from a browser, and answers their CORS preflight requests.
func allowOrigins(origins []string, next http.Handler) http.Handler {
	if len(origins) == 0 {
		return next
	}
	anyOrigin := origins[0] == "*"
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		if !anyOrigin {
			h.Add("Vary", "Origin") // the answer depends on it, even where it is not allowed
		}
		origin := r.Header.Get("Origin")
		if origin == "" || !anyOrigin && !slices.Contains(origins, origin) {
			next.ServeHTTP(w, r)
			return
		}
		if anyOrigin {
			origin = "*"
		}
		h.Set("Access-Control-Allow-Origin", origin)
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
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

// logWriter keeps what the request's log line reports.
type logWriter struct {
	http.ResponseWriter
	status        int
	spotifyStatus int   // 0 where Spotify was not called or did not answer
	err           error // why Spotify gave no usable answer
}

func (lw *logWriter) WriteHeader(status int) {
	lw.status = status
	lw.ResponseWriter.WriteHeader(status)
}

func (lw *logWriter) Unwrap() http.ResponseWriter { return lw.ResponseWriter }

// logRequests writes one line per request. It logs no body, no query and no
// header but X-Request-Id, so no code, token or secret can reach the log.
func logRequests(logger *slog.Logger, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		lw := &logWriter{ResponseWriter: w, status: http.StatusOK}
		next.ServeHTTP(lw, r)
		attrs := make([]slog.Attr, 0, 7)
		attrs = append(attrs,
			slog.String("method", r.Method),
			slog.String("path", r.URL.Path),
			slog.Int("status", lw.status),
			slog.Int64("duration_us", time.Since(start).Microseconds())) // slog encodes floats slowly
		if lw.spotifyStatus != 0 {
			attrs = append(attrs, slog.Int("spotify_status", lw.spotifyStatus))
		}
		if id := r.Header.Get("X-Request-Id"); id != "" {
			attrs = append(attrs, slog.String("request_id", id))
		}
		if lw.err != nil {
			attrs = append(attrs, slog.String("error", lw.err.Error()))
		}
		level := slog.LevelInfo
		if lw.status >= 500 {
			level = slog.LevelWarn
		}
		logger.LogAttrs(r.Context(), level, "request", attrs...)
	})
}
