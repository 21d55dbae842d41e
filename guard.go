// The abuse guard: who a request's client is (TRUST_PROXY), how many
// requests it may make (RATE_LIMIT) and how many connections it may hold
// open at once (CONNECTION_LIMIT).

package main

import (
	"iter"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

// trustProxy is TRUST_PROXY: where a request's client address comes from.
// At most one field is set; none set is TRUST_PROXY=0, the TCP peer.
type trustProxy struct {
	hops    int            // the hops-th entry from the right of X-Forwarded-For
	proxies []netip.Prefix // trusted proxies: X-Forwarded-For read from the right, past them
	header  string         // the header the platform's proxy writes the client's address in
}

// guard holds clients to their limits. It answers no request itself: the
// HTTP surface asks it, and decides what the client sees.
type guard struct {
	trust     trustProxy
	limiter   *limiter // nil when RATE_LIMIT is off
	connLimit int      // 0 when CONNECTION_LIMIT is off
	logger    *slog.Logger
	metrics   *metrics

	// Each warning is logged once: the first time is news, the rest noise.
	warnedHeader, warnedFallback, warnedConns, warnedFull atomic.Bool
}

func newGuard(logger *slog.Logger, m *metrics, trust trustProxy, limiter *limiter, connLimit int) *guard {
	return &guard{trust: trust, limiter: limiter, connLimit: connLimit, logger: logger, metrics: m}
}

// client returns the address of r's client, by TRUST_PROXY.
func (g *guard) client(r *http.Request) netip.Addr {
	ap, _ := netip.ParseAddrPort(r.RemoteAddr)
	peer, forwarded := ap.Addr().Unmap(), r.Header.Values("X-Forwarded-For")
	switch t := g.trust; {
	case t.header != "":
		values := r.Header.Values(t.header)
		if values == nil && forwarded == nil {
			return peer // not through the platform's proxy: its own health check
		}
		return g.pick(nthFromRight(values, 1), peer)
	case t.hops > 0:
		if forwarded == nil {
			return peer // not through the proxies: their own health check
		}
		return g.pick(nthFromRight(forwarded, t.hops), peer)
	case t.proxies != nil && !t.trusted(peer):
		return peer // not through the proxies
	case t.proxies != nil:
		client := peer
		for entry := range fromRight(forwarded) {
			addr, ok := parseEntry(entry)
			if !ok || !t.trusted(addr) {
				return g.pick(entry, peer)
			}
			client = addr // all trusted: the leftmost
		}
		return client
	}
	if forwarded != nil && g.limiter != nil && g.warnedHeader.CompareAndSwap(false, true) {
		g.logger.Warn("a request came with X-Forwarded-For but TRUST_PROXY is 0: every client behind that proxy shares one rate limit; set TRUST_PROXY as the docs say for the platform")
	}
	return peer
}

// pick returns the address in entry, the one TRUST_PROXY selects. Where
// there is none, the client address falls back to the TCP peer: counted,
// and the first time logged.
func (g *guard) pick(entry string, peer netip.Addr) netip.Addr {
	if addr, ok := parseEntry(entry); ok {
		return addr
	}
	g.metrics.clientFallbacks.Add(1)
	if g.warnedFallback.CompareAndSwap(false, true) {
		g.logger.Warn("the forwarding header entry that TRUST_PROXY selects is missing or not an address: the client address falls back to the TCP peer, whose limit every client behind it shares; check TRUST_PROXY",
			"entry", printable(entry), "peer", peer.String())
	}
	return peer
}

// maxClientValue caps each value a client chose (method, path, Origin,
// X-Request-Id, a forwarding header's entry) where a log line or an answer
// shows it, so that none is longer than about 2 KiB however the request is
// built.
const maxClientValue = 128

// printable returns a header value a client chose, cut to maxClientValue
// bytes and to printable ASCII, so that no client can flood or forge log
// lines.
func printable(s string) string {
	return strings.Map(func(c rune) rune {
		if c < ' ' || c > '~' {
			return -1
		}
		return c
	}, clip(s))
}

// clip cuts s to maxClientValue bytes, at a UTF-8 boundary.
func clip(s string) string {
	if len(s) <= maxClientValue {
		return s
	}
	i := maxClientValue
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return s[:i]
}

// trusted reports whether addr, its zone aside, is one of the trusted proxies.
func (t trustProxy) trusted(addr netip.Addr) bool {
	return slices.ContainsFunc(t.proxies, func(p netip.Prefix) bool { return p.Contains(addr.WithZone("")) })
}

// fromRight yields the entries of comma-separated header lines, such as
// X-Forwarded-For's, from the last one back: several lines are one list.
func fromRight(lines []string) iter.Seq[string] {
	return func(yield func(string) bool) {
		for i := len(lines) - 1; i >= 0; i-- {
			for list := lines[i]; ; {
				comma := strings.LastIndexByte(list, ',')
				if !yield(list[comma+1:]) {
					return
				}
				if comma < 0 {
					break
				}
				list = list[:comma]
			}
		}
	}
}

// nthFromRight is the nth entry from the right of comma-separated header
// lines; with fewer entries, the leftmost.
func nthFromRight(lines []string, n int) (entry string) {
	for e := range fromRight(lines) {
		if entry, n = e, n-1; n == 0 {
			break
		}
	}
	return entry
}

// parseEntry reads one entry of a forwarding header: an address, with a
// port (Azure's Application Gateway adds one) or without, spaces around it;
// a zone is dropped, and an IPv4-mapped address is the IPv4 one.
func parseEntry(s string) (netip.Addr, bool) {
	s = strings.TrimSpace(s)
	addr, err := netip.ParseAddr(s)
	if err != nil {
		ap, err2 := netip.ParseAddrPort(s)
		addr, err = ap.Addr(), err2
	}
	return addr.WithZone("").Unmap(), err == nil
}

// The IPv6 ranges that carry an IPv4 address, as RFC 6052's NAT64 and RFC
// 3056's 6to4 do: a client there is the IPv4 address inside.
var (
	nat64     = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour = netip.MustParsePrefix("2002::/16")
)

// clientKey is what a limit counts by: an IPv4 address (bits 32), an IPv6
// /64 (one subscriber's prefix) or an IPv6 /48 (one site's).
type clientKey struct {
	addr [16]byte
	bits uint8
}

// keysOf returns the keys addr is limited by: its own, and for IPv6 its
// /48's (ok false for IPv4, which has none).
func keysOf(addr netip.Addr) (own, network clientKey, ok bool) {
	addr = addr.WithZone("").Unmap()
	b := addr.As16()
	switch {
	case nat64.Contains(addr):
		addr = netip.AddrFrom4([4]byte(b[12:16]))
	case sixToFour.Contains(addr):
		addr = netip.AddrFrom4([4]byte(b[2:6]))
	}
	if addr.Is4() {
		return clientKey{addr.As16(), 32}, clientKey{}, false
	}
	p64, _ := addr.Prefix(64)
	p48, _ := addr.Prefix(48)
	return clientKey{p64.Addr().As16(), 64}, clientKey{p48.Addr().As16(), 48}, true
}

// The limits a request can hit, as its answer's description says them.
const (
	hitAddress = "too many requests from this address"
	hitNetwork = "too many requests from this address's network, its IPv6 /48"
	hitFull    = "too many clients are over their limit at once"
)

// allow counts a POST from client against RATE_LIMIT. It returns 0, or
// how long the client must wait and which limit it hit.
func (g *guard) allow(client netip.Addr) (time.Duration, string) {
	if g.limiter == nil {
		return 0, ""
	}
	wait, hit := g.limiter.wait(client)
	if wait > 0 {
		g.metrics.rateLimited.Add(1)
	}
	if hit == hitFull && g.warnedFull.CompareAndSwap(false, true) {
		g.logger.Warn("the rate limiter's table is full of clients over their limit (a flood of addresses?): new addresses are refused until some are back under it")
	}
	return wait, hit
}

// maxClients bounds the limiter's table, whatever the number of distinct
// addresses, forged ones included.
const maxClients = 1 << 16

// limiter is a rate limiter per client (GCRA, the token bucket's twin): a
// client may make burst requests at once, then one every interval. An IPv6
// /48 may make 16 times as many as its /64s, so that its 65,536 of them do
// not add up to an unlimited client.
type limiter struct {
	n      int           // requests at once per client
	period time.Duration // in which a client may make n
	now    func() time.Time
	epoch  time.Time // times in tat count from here: 8 bytes each, not time.Time's 24, and never negative
	mu     sync.Mutex
	// tat is each client's theoretical arrival time: when it would have
	// its whole allowance back. A client whose tat has passed is as good
	// as new, so it may be forgotten.
	tat map[clientKey]time.Duration
	// fullUntil is when, after a sweep that found every client over its
	// limit, the first one will not be: until then a new client is
	// refused without another sweep.
	fullUntil time.Duration
}

// newLimiter allows n requests at once per client, and n per period, by
// the clock now (time.Now, or a test's).
func newLimiter(n int, period time.Duration, now func() time.Time) *limiter {
	return &limiter{n: n, period: period, now: now, epoch: now(), tat: make(map[clientKey]time.Duration)}
}

// limits returns the interval and the burst (how far ahead of now a
// client's schedule may run) of key's kind of client: an IPv6 /48 may make
// 16 times as many requests as an address or a /64.
func (l *limiter) limits(key clientKey) (interval, burst time.Duration) {
	n := l.n
	if key.bits == 48 {
		n *= 16
	}
	interval = l.period / time.Duration(n)
	return interval, time.Duration(n-1) * interval
}

// wait counts a request of client's and returns 0 if it may go ahead, or
// else how long until it may and which limit it hit. An IPv6 request
// counts against its /64's and its /48's limits, and only where both
// allow it.
func (l *limiter) wait(client netip.Addr) (time.Duration, string) {
	own, network, hasNetwork := keysOf(client)
	now := l.now().Sub(l.epoch)
	l.mu.Lock()
	defer l.mu.Unlock()
	keys, n := [2]clientKey{own, network}, 1
	if hasNetwork {
		n = 2
	}
	var tats [2]time.Duration
	var wait time.Duration
	hit, unknown := "", 0
	for i, key := range keys[:n] {
		tat, known := l.tat[key]
		if !known {
			tat, unknown = now, unknown+1
		}
		tats[i] = max(tat, now)
		if _, burst := l.limits(key); tats[i]-now-burst > wait {
			wait, hit = tats[i]-now-burst, [2]string{hitAddress, hitNetwork}[i]
		}
	}
	if wait > 0 {
		return wait, hit
	}
	if len(l.tat)+unknown > maxClients && !l.makeRoom(now, unknown) {
		return time.Second, hitFull
	}
	for i, key := range keys[:n] {
		interval, _ := l.limits(key)
		l.tat[key] = tats[i] + interval
	}
	return 0, ""
}

// makeRoom forgets clients until n more fit and reports whether they do.
// Clients whose allowance is fully back go first, then those closest to
// it, down to three quarters of the table, so that a flood of new
// addresses sweeps once per quarter; a client over its limit is never
// forgotten, or a flood could hand it a fresh allowance.
func (l *limiter) makeRoom(now time.Duration, n int) bool {
	if now < l.fullUntil {
		return false
	}
	var lefts []time.Duration // how far each client under its limit is from its whole allowance
	l.fullUntil = 1<<63 - 1
	for key, tat := range l.tat {
		_, burst := l.limits(key)
		switch left := tat - now; {
		case left <= 0:
			delete(l.tat, key)
		case left <= burst:
			lefts = append(lefts, left)
		default:
			l.fullUntil = min(l.fullUntil, tat-burst)
		}
	}
	if excess := len(l.tat) - maxClients*3/4; excess > 0 && len(lefts) > 0 {
		slices.Sort(lefts)
		cut := lefts[min(excess, len(lefts))-1]
		for key, tat := range l.tat {
			if _, burst := l.limits(key); tat-now <= min(cut, burst) {
				delete(l.tat, key)
			}
		}
	}
	if len(l.tat)+n <= maxClients {
		l.fullUntil = 0
		return true
	}
	return false
}

// limitConnections caps the connections one client holds open on ln at
// once, at CONNECTION_LIMIT, counting clients as the rate limit does; each
// listener counts its own. A connection over the cap is closed at once,
// unanswered. On the service's listener only peers that are clients are
// capped: behind a count or a header every peer is the platform's proxy,
// and in the list form the trusted proxies are not capped. On the metrics
// listener (direct), every peer is.
func (g *guard) limitConnections(ln net.Listener, direct bool) net.Listener {
	if g.connLimit == 0 || !direct && (g.trust.hops > 0 || g.trust.header != "") {
		return ln
	}
	return &cappedListener{Listener: ln, g: g, direct: direct, open: map[clientKey]int{}}
}

type cappedListener struct {
	net.Listener
	g      *guard
	direct bool
	mu     sync.Mutex
	open   map[clientKey]int // open connections by client, those with some only
}

func (l *cappedListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return conn, err
		}
		peer, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
		if !l.direct && l.g.trust.trusted(peer.Addr().Unmap()) {
			return conn, nil
		}
		if key, _, _ := keysOf(peer.Addr()); l.hold(key, 1) {
			return &countedConn{Conn: conn, release: func() { l.hold(key, -1) }}, nil
		}
		conn.Close()
	}
}

// hold counts n more connections of key's open (n may be -1) and reports
// whether that is within CONNECTION_LIMIT; a connection over it is refused,
// and not counted.
func (l *cappedListener) hold(key clientKey, n int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if g := l.g; n > 0 && l.open[key]+n > g.connLimit {
		g.metrics.connectionsRefused.Add(1)
		if g.warnedConns.CompareAndSwap(false, true) {
			g.logger.Warn("a client address holds CONNECTION_LIMIT connections: more from it are closed at once", "limit", g.connLimit)
		}
		return false
	}
	if l.open[key] += n; l.open[key] <= 0 {
		delete(l.open, key)
	}
	return true
}

// countedConn releases its place under the cap when it is first closed.
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *countedConn) Close() error {
	c.once.Do(c.release)
	return c.Conn.Close()
}
