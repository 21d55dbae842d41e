package main

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

const (
	// maxAnswerBytes caps what is read of Spotify's answer; a token answer
	// is well under a kilobyte.
	maxAnswerBytes = 1 << 20
	// maxBackoff caps how long a Retry-After from Spotify holds calls back.
	maxBackoff = 60 * time.Second
)

// The ways a call to Spotify can fail to give a usable answer.
var (
	errSpotifyTimeout     = errors.New("spotify did not answer in time")
	errSpotifyUnreachable = errors.New("spotify could not be reached")
	errSpotifyBadAnswer   = errors.New("spotify's answer is unusable")
	// errBackingOff: Spotify answered 429 with a Retry-After that has not
	// run out, so it was not called; the answer's retryAfter says how long.
	errBackingOff = errors.New("spotify asked us to back off (Retry-After): not called")
)

// spotifyClient calls the token endpoint of Spotify's accounts service.
type spotifyClient struct {
	// transport is used as httputil.ReverseProxy uses it, without an
	// http.Client: the token endpoint does not redirect (following a
	// redirect would send the credentials elsewhere), and nothing is retried.
	transport http.RoundTripper
	timeout   time.Duration // for a whole call, the answer's body included
	tokenURL  string
	// header is every call's: the form's Content-Type and the Basic
	// credentials, built once. Calls share it: a RoundTripper does not
	// modify the request.
	header http.Header

	// now is time.Now; tests move a fake clock instead.
	now func() time.Time
	// backoffUntil is when Spotify's last Retry-After runs out, or nil.
	// Spotify's limit counts per app: calls before then would only prolong
	// it. (A time.Time, not Unix nanoseconds: its monotonic reading keeps
	// a jump of the wall clock from stretching the back-off.)
	backoffUntil atomic.Pointer[time.Time]
}

// answer is what Spotify said: its status, its Retry-After header and its body.
type answer struct {
	status     int
	retryAfter string
	body       []byte
}

// newSpotifyClient returns a client for the token endpoint under accountsURL
// (no trailing slash) that gives up on a call after timeout.
func newSpotifyClient(accountsURL, clientID, clientSecret string, timeout time.Duration) *spotifyClient {
	transport := http.DefaultTransport.(*http.Transport).Clone()
	// Keep every connection alive: with the default of 2 idle connections
	// per host, most calls would reconnect. There is no ceiling on
	// connections: one would queue calls behind a slow Spotify. Instead each
	// costs less: a token request and its answer fit in 2 KiB buffers,
	// where the default is 4 KiB each way.
	transport.MaxIdleConns = 0 // no limit
	transport.MaxIdleConnsPerHost = 1 << 16
	transport.ReadBufferSize, transport.WriteBufferSize = 2<<10, 2<<10
	// A token answer is a few hundred bytes: not worth gzip's work.
	transport.DisableCompression = true
	return &spotifyClient{
		transport: transport,
		timeout:   timeout,
		tokenURL:  accountsURL + "/api/token",
		header: http.Header{
			"Content-Type":  {"application/x-www-form-urlencoded"},
			"Authorization": {"Basic " + base64.StdEncoding.EncodeToString([]byte(clientID+":"+clientSecret))},
		},
		now: time.Now,
	}
}

// exchangeCode swaps an authorization code for tokens. The codeVerifier of
// PKCE is sent only when there is one. A code is single-use: the call is
// never retried.
func (c *spotifyClient) exchangeCode(ctx context.Context, code, redirectURI, codeVerifier string) (answer, error) {
	return c.post(ctx, form("grant_type", "authorization_code", "code", code, "redirect_uri", redirectURI, "code_verifier", codeVerifier))
}

// refresh trades a refresh token for a new access token.
func (c *spotifyClient) refresh(ctx context.Context, refreshToken string) (answer, error) {
	return c.post(ctx, form("grant_type", "refresh_token", "refresh_token", refreshToken))
}

// clientCredentials asks for an app token, which Spotify grants for a valid
// client ID and secret alone.
func (c *spotifyClient) clientCredentials(ctx context.Context) (answer, error) {
	return c.post(ctx, form("grant_type", "client_credentials"))
}

// post sends a form to the token endpoint and reads the answer, which must be
// one JSON object of at most maxAnswerBytes. The answer comes back with the
// error where there is one, so that the caller can see Spotify's status.
func (c *spotifyClient) post(ctx context.Context, body string) (answer, error) {
	if until := c.backoffUntil.Load(); until != nil {
		if left := until.Sub(c.now()); left > 0 {
			return answer{retryAfter: strconv.Itoa(wholeSeconds(left))}, errBackingOff
		}
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.tokenURL, strings.NewReader(body))
	if err != nil {
		return answer{}, fmt.Errorf("spotify: %w", err)
	}
	req.Header = c.header
	resp, err := c.transport.RoundTrip(req)
	if err != nil {
		return answer{}, c.callError(err)
	}
	defer resp.Body.Close()

	ans := answer{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After")}
	if ans.status == http.StatusTooManyRequests {
		c.backOff(ans.retryAfter)
	}
	ans.body, err = readBody(resp.Body, resp.ContentLength, maxAnswerBytes)
	switch {
	case err != nil:
		return ans, c.callError(err)
	case len(ans.body) > maxAnswerBytes:
		return ans, fmt.Errorf("%w: status %d, over %d bytes", errSpotifyBadAnswer, ans.status, maxAnswerBytes)
	case !isJSONObject(ans.body):
		return ans, fmt.Errorf("%w: status %d, not a JSON object (Content-Type %q)", errSpotifyBadAnswer, ans.status, resp.Header.Get("Content-Type"))
	}
	return ans, nil
}

// backOff holds calls back for the seconds of a Retry-After header, at most
// maxBackoff. A header that is not a positive number of seconds starts none.
func (c *spotifyClient) backOff(retryAfter string) {
	s, err := strconv.Atoi(retryAfter)
	if err != nil || s <= 0 {
		return
	}
	until := c.now().Add(min(time.Duration(s)*time.Second, maxBackoff))
	c.backoffUntil.Store(&until)
}

// readBody reads body to its end, or to one byte over limit, so that the
// caller can tell a body over the limit. A body of known length n is read
// into a buffer of just that size, where io.ReadAll would start at 512
// bytes and grow: less for the garbage collector to do.
func readBody(body io.Reader, n, limit int64) ([]byte, error) {
	if n < 0 || n > limit {
		return io.ReadAll(io.LimitReader(body, limit+1))
	}
	b := make([]byte, n)
	_, err := io.ReadFull(body, b)
	return b, err
}

// wholeSeconds rounds d up to whole seconds, at least 1, as Retry-After wants.
func wholeSeconds(d time.Duration) int {
	return max(1, int((d+time.Second-1)/time.Second))
}

// callError tells a timeout from other failures to talk to Spotify.
func (c *spotifyClient) callError(err error) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w: POST %s: %w", errSpotifyTimeout, c.tokenURL, err)
	}
	return fmt.Errorf("%w: POST %s: %w", errSpotifyUnreachable, c.tokenURL, err)
}

// form encodes name, value pairs in the order given, leaving out empty values.
func form(pairs ...string) string {
	var b strings.Builder
	b.Grow(256) // most forms, escaping included, in one allocation
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte('&')
		}
		b.WriteString(pairs[i])
		b.WriteByte('=')
		b.WriteString(url.QueryEscape(pairs[i+1]))
	}
	return b.String()
}

// isJSONObject reports whether b is one JSON object, as every answer of the
// token endpoint is.
func isJSONObject(b []byte) bool {
	trimmed := bytes.TrimLeft(b, " \t\r\n")
	return len(trimmed) > 0 && trimmed[0] == '{' && json.Valid(b)
}

// oauthError returns the error and error_description members of an OAuth
// error answer (RFC 6749 §5.2), empty where there are none.
func oauthError(body []byte) (code, description string) {
	var e struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	json.Unmarshal(body, &e)
	return e.Error, e.Description
}

// sealPrefix starts every sealed refresh token and names its format, so that
// the format can change. It is authenticated along with the token.
const sealPrefix = "v1."

// sealEncoding is URL-safe, so that a sealed token needs no escaping in a form
// or a query, and strict, so that one sealed token has one spelling only.
var sealEncoding = base64.RawURLEncoding.Strict()

// errNotSealed is the one answer to every refresh token that does not open:
// telling apart how it failed would help an attacker.
var errNotSealed = errors.New("the refresh token was not sealed by this service")

// sealer seals refresh tokens with AES-256-GCM, so that clients hold a value
// that is useless without this service's secret.
type sealer struct {
	// aeads holds one cipher per secret: the first seals, every one opens.
	aeads []cipher.AEAD
}

func newSealer(secrets []string) (*sealer, error) {
	s := &sealer{}
	for _, secret := range secrets {
		key, err := hkdf.Key(sha256.New, []byte(secret), nil, "spotify-token-swap refresh token "+sealPrefix, 32)
		if err != nil {
			return nil, fmt.Errorf("deriving the sealing key: %w", err)
		}
		block, err := aes.NewCipher(key)
		if err != nil {
			return nil, fmt.Errorf("sealing cipher: %w", err)
		}
		aead, err := cipher.NewGCMWithRandomNonce(block)
		if err != nil {
			return nil, fmt.Errorf("sealing cipher: %w", err)
		}
		s.aeads = append(s.aeads, aead)
	}
	return s, nil
}

// seal encrypts a refresh token under a fresh random nonce.
func (s *sealer) seal(token string) string {
	return sealPrefix + sealEncoding.EncodeToString(s.aeads[0].Seal(nil, nil, []byte(token), []byte(sealPrefix)))
}

// open returns the refresh token sealed in sealed, or errNotSealed.
func (s *sealer) open(sealed string) (string, error) {
	rest, ok := strings.CutPrefix(sealed, sealPrefix)
	if !ok || strings.ContainsAny(rest, "\r\n") { // base64 decoding skips newlines
		return "", errNotSealed
	}
	ciphertext, err := sealEncoding.DecodeString(rest)
	if err != nil {
		return "", errNotSealed
	}
	for _, aead := range s.aeads {
		if token, err := aead.Open(nil, nil, ciphertext, []byte(sealPrefix)); err == nil {
			return string(token), nil
		}
	}
	return "", errNotSealed
}

// sealAnswer returns a token answer, a valid JSON object, with the value of
// each refresh_token member sealed; every other byte stays as Spotify sent
// it. An answer without a refresh token gets none.
func (s *sealer) sealAnswer(body []byte) []byte {
	var out []byte
	copied := 0
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.Token() // the {
	for dec.More() {
		key, _ := dec.Token()
		var value json.RawMessage // as sent, without the spaces around it
		var token string
		if dec.Decode(&value) != nil {
			break
		}
		if key != "refresh_token" || json.Unmarshal(value, &token) != nil || token == "" {
			continue // not it, or null: nothing to seal
		}
		end := int(dec.InputOffset())
		out = append(out, body[copied:end-len(value)]...)
		out = append(out, '"')
		out = append(out, s.seal(token)...)
		out = append(out, '"')
		copied = end
	}
	if out == nil {
		return body
	}
	return append(out, body[copied:]...)
}
