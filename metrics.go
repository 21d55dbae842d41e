// The metrics: counters kept as requests are answered, and their exposition
// in the Prometheus text format on METRICS_ADDR.

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

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
	inFlight        atomic.Int64
	requests        [numRoutes][1000]atomic.Uint64 // by route and HTTP status
	requestDuration [numRoutes]histogram
	// spotifyCalls counts calls by Spotify's status; spotifyFailed those
	// that got none, by spotifyFailures.
	spotifyCalls    [1000]atomic.Uint64
	spotifyFailed   [3]atomic.Uint64
	spotifyDuration histogram
	errors          [numOAuthErrors]atomic.Uint64 // by oauthErrors
	// The guard's: requests over RATE_LIMIT, client addresses that fell
	// back to the TCP peer, connections over CONNECTION_LIMIT.
	rateLimited, clientFallbacks, connectionsRefused atomic.Uint64
}

const (
	// spotifyFailures label the calls to Spotify that gave no status.
	spotifyFailures = "timeout unreachable canceled"
	// oauthErrors label the answers that carry an OAuth error: RFC 6749's,
	// and this service's not_found; any other counts as "other".
	oauthErrors    = "invalid_request invalid_client invalid_grant unauthorized_client unsupported_grant_type invalid_scope server_error temporarily_unavailable not_found other"
	numOAuthErrors = 10
)

// request counts an answered request.
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

// spotifyCall counts a call to Spotify: by its status, or why it gave none.
func (m *metrics) spotifyCall(status int, err error, clientGone bool, took time.Duration) {
	switch {
	case status != 0: // an answer cut short still has Spotify's status
		m.spotifyCalls[min(uint(status), 999)].Add(1)
	case clientGone:
		m.spotifyFailed[2].Add(1)
	case errors.Is(err, errSpotifyTimeout):
		m.spotifyFailed[0].Add(1)
	default:
		m.spotifyFailed[1].Add(1)
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

// handler serves GET /metrics in the Prometheus text format 0.0.4, for the
// listener on METRICS_ADDR.
func (m *metrics) handler(version string) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
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
		// single prints a series without labels.
		single := func(name, kind, help string, value any) {
			family(name, kind, help)
			fmt.Fprintf(&b, "%s %v\n", name, value)
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
		single("tokenswap_requests_in_flight", "gauge", "Requests being answered.", m.inFlight.Load())
		family("tokenswap_spotify_requests_total", "counter", "Calls to Spotify's token endpoint, by its status, or why it gave none.")
		counters("tokenswap_spotify_requests_total", m.spotifyCalls[:], func(code int) string { return fmt.Sprintf(`code="%d"`, code) })
		failures := strings.Fields(spotifyFailures)
		counters("tokenswap_spotify_requests_total", m.spotifyFailed[:], func(i int) string { return fmt.Sprintf("code=%q", failures[i]) })
		family("tokenswap_spotify_request_duration_seconds", "histogram", "Time a call to Spotify took.")
		m.spotifyDuration.write(&b, "tokenswap_spotify_request_duration_seconds", "")
		family("tokenswap_errors_total", "counter", "Answers that carry an OAuth error, the service's own or Spotify's, by error.")
		errs := strings.Fields(oauthErrors)
		counters("tokenswap_errors_total", m.errors[:], func(i int) string { return fmt.Sprintf("error=%q", errs[i]) })
		single("tokenswap_rate_limited_total", "counter", "Requests refused for going over RATE_LIMIT.", m.rateLimited.Load())
		single("tokenswap_client_address_fallback_total", "counter", "Requests whose client address fell back to the TCP peer: the entry TRUST_PROXY selects was missing or not an address.", m.clientFallbacks.Load())
		single("tokenswap_connections_refused_total", "counter", "Connections closed unanswered for going over CONNECTION_LIMIT.", m.connectionsRefused.Load())
		family("tokenswap_build_info", "gauge", "The version running, as a label; always 1.")
		fmt.Fprintf(&b, "tokenswap_build_info{version=%q} 1\n", version)
		single("go_goroutines", "gauge", "Number of goroutines that currently exist.", runtime.NumGoroutine())
		single("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", strconv.FormatFloat(float64(m.start.UnixMilli())/1e3, 'f', 3, 64))
		if rss, ok := residentMemory("/proc/self/statm"); ok {
			single("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss)
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		w.Write(b.Bytes())
	})
	return mux
}

// residentMemory returns the process's resident set size, from Linux's
// /proc/self/statm; ok is false on a system without it.
func residentMemory(statmPath string) (bytes int64, ok bool) {
	statm, err := os.ReadFile(statmPath)
	if fields := strings.Fields(string(statm)); err == nil && len(fields) > 1 {
		pages, err := strconv.ParseInt(fields[1], 10, 64)
		return pages * int64(os.Getpagesize()), err == nil
	}
	return 0, false
}
