package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testGuard is a guard for TRUST_PROXY=setting that logs to log.
func testGuard(t *testing.T, setting string, log io.Writer) *guard {
	t.Helper()
	trust, err := parseTrustProxy(setting)
	if err != nil {
		t.Fatalf("parseTrustProxy(%q): %v", setting, err)
	}
	return newGuard(slog.New(slog.NewJSONHandler(log, nil)), &metrics{}, trust, newLimiter(10, time.Minute, time.Now), 3)
}

// TestClientAddress checks, for each form of TRUST_PROXY, which address a
// request's client is, and when it falls back to the TCP peer.
func TestClientAddress(t *testing.T) {
	t.Parallel()
	const proxy, client = "10.0.0.2:4242", "203.0.113.7"
	trusted := "10.0.0.0/8, 192.0.2.1, 2001:db8:cafe::/48"
	tests := []struct {
		setting, peer string
		headers       []string // name: value, in order
		want          string
		fallback      bool // the entry TRUST_PROXY selects is missing or no address
	}{
		// 0: the TCP peer, whatever the client sends.
		{"0", "198.51.100.1:4242", []string{"X-Forwarded-For: " + client}, "198.51.100.1", false},
		{"0", "[::ffff:198.51.100.1]:4242", nil, "198.51.100.1", false},
		{"0", "[2001:db8::1]:4242", []string{"Fly-Client-IP: " + client}, "2001:db8::1", false},

		// A count: the Nth entry from the right, the lines read as one list.
		{"1", proxy, []string{"X-Forwarded-For: " + client}, client, false},
		{"1", proxy, []string{"X-Forwarded-For: 1.1.1.1, 8.8.8.8, " + client}, client, false},
		{"2", proxy, []string{"X-Forwarded-For: 1.1.1.1, " + client + ", 10.0.0.9"}, client, false},
		{"2", proxy, []string{"X-Forwarded-For: 1.1.1.1, " + client, "X-Forwarded-For: 10.0.0.9"}, client, false},
		{"2", proxy, []string{"X-Forwarded-For: 1.1.1.1", "X-Forwarded-For: " + client + ", 10.0.0.9"}, client, false},
		{"3", proxy, []string{"X-Forwarded-For: 1.1.1.1", "X-Forwarded-For: 8.8.8.8, 10.0.0.8", "X-Forwarded-For: 10.0.0.9"}, "8.8.8.8", false},
		{"3", proxy, []string{"X-Forwarded-For: " + client + ", 10.0.0.9"}, client, false}, // fewer: the leftmost
		{"10", proxy, []string{"X-Forwarded-For: " + client, "X-Forwarded-For: 10.0.0.9"}, client, false},
		{"1", proxy, []string{"X-Forwarded-For:   " + client + "  "}, client, false},
		{"1", proxy, []string{"X-Forwarded-For: 1.1.1.1,\t" + client}, client, false}, // a tab is a space too (RFC 9110's OWS)
		{"1", proxy, []string{"X-Forwarded-For: " + client + ":5100"}, client, false}, // Azure adds the port
		{"1", proxy, []string{"X-Forwarded-For: [2001:db8::7]:5100"}, "2001:db8::7", false},
		{"1", proxy, []string{"X-Forwarded-For: 2001:db8::7"}, "2001:db8::7", false},
		{"1", proxy, []string{"X-Forwarded-For: fe80::7%eth0"}, "fe80::7", false}, // the zone dropped
		{"1", proxy, []string{"X-Forwarded-For: [fe80::7%" + strings.Repeat("z", 2000) + "]:80"}, "fe80::7", false},
		{"1", proxy, []string{"X-Forwarded-For: ::ffff:" + client}, client, false},
		{"1", proxy, nil, "10.0.0.2", false}, // the proxy's own health check
		{"1", proxy, []string{"X-Forwarded-For: " + client + ", unknown"}, "10.0.0.2", true},
		{"1", proxy, []string{"X-Forwarded-For: " + client + ","}, "10.0.0.2", true},
		{"2", proxy, []string{"X-Forwarded-For: ," + client}, "10.0.0.2", true}, // an empty entry is no address either
		{"1", proxy, []string{"X-Forwarded-For: "}, "10.0.0.2", true},
		{"1", proxy, []string{"X-Forwarded-For: " + client + ":port"}, "10.0.0.2", true},
		{"1", proxy, []string{"X-Forwarded-For: [" + client + "]"}, "10.0.0.2", true},
		{"2", proxy, []string{"X-Forwarded-For: <script>, 10.0.0.9"}, "10.0.0.2", true},
		{"2", proxy, []string{"X-Forwarded-For: <script>, " + client + ", 10.0.0.9"}, client, false}, // left of it: never read
		{"1", proxy, []string{"X-Real-IP: " + client}, "10.0.0.2", false},                            // no forwarding header it reads

		// A list: past the trusted proxies, from the right.
		{trusted, proxy, []string{"X-Forwarded-For: " + client}, client, false},
		{trusted, proxy, []string{"X-Forwarded-For: 1.1.1.1, " + client + ", 10.9.9.9, 192.0.2.1"}, client, false},
		{trusted, proxy, []string{"X-Forwarded-For: 1.1.1.1, " + client, "X-Forwarded-For: 10.9.9.9"}, client, false},
		{trusted, "[2001:db8:cafe:1::5]:443", []string{"X-Forwarded-For: 2001:db8:beef::1, 2001:db8:cafe:9::9"}, "2001:db8:beef::1", false},
		{trusted, proxy, []string{"X-Forwarded-For: 10.1.1.1, 192.0.2.1"}, "10.1.1.1", false}, // all trusted: the leftmost
		{trusted, "192.0.2.1:80", nil, "192.0.2.1", false},
		{trusted, "198.51.100.1:4242", []string{"X-Forwarded-For: " + client}, "198.51.100.1", false}, // an untrusted peer is the client
		{trusted, "192.0.2.2:4242", []string{"X-Forwarded-For: " + client}, "192.0.2.2", false},       // one address past a /32
		{trusted, "[::ffff:10.0.0.2]:4242", []string{"X-Forwarded-For: " + client}, client, false},
		{trusted, proxy, []string{"X-Forwarded-For: " + client + ":5100, 10.0.0.9:443"}, client, false},
		{trusted, proxy, []string{"X-Forwarded-For: " + client + ", garbage, 10.0.0.9"}, "10.0.0.2", true},
		{trusted, proxy, []string{"X-Forwarded-For: garbage, " + client + ", 10.0.0.9"}, client, false},
		{"fe80::/10", "[fe80::1%eth0]:4242", []string{"X-Forwarded-For: " + client}, client, false}, // a link-local proxy, its zone aside

		// A header: the one address the platform's proxy writes.
		{"Fly-Client-IP", proxy, []string{"Fly-Client-IP: " + client, "X-Forwarded-For: 1.1.1.1"}, client, false},
		{"fly-client-ip", proxy, []string{"Fly-Client-IP: " + client}, client, false},
		{"CF-Connecting-IP", proxy, []string{"Cf-Connecting-Ip: 1.1.1.1", "Cf-Connecting-Ip: " + client}, client, false}, // several: the last
		{"CF-Connecting-IP", proxy, []string{"Cf-Connecting-Ip: 1.1.1.1, " + client}, client, false},                     // on one line too
		{"True-Client-IP", proxy, []string{"True-Client-IP: " + client + ":443"}, client, false},
		{"X-Real-IP", proxy, []string{"X-Forwarded-For: " + client}, "10.0.0.2", true}, // missing while X-Forwarded-For is there
		{"X-Real-IP", proxy, nil, "10.0.0.2", false},
		{"X-Real-IP", proxy, []string{"X-Real-IP: unknown"}, "10.0.0.2", true},
	}
	for _, tt := range tests {
		var log strings.Builder
		g := testGuard(t, tt.setting, &log)
		r := httptest.NewRequest("POST", tokenPath, nil)
		r.RemoteAddr = tt.peer
		for _, h := range tt.headers {
			name, value, _ := strings.Cut(h, ": ")
			r.Header.Add(name, value)
		}
		what := fmt.Sprintf("TRUST_PROXY=%s, peer %s, %q", tt.setting, tt.peer, tt.headers)
		if got := g.client(r).String(); got != tt.want {
			t.Errorf("%s: client %s, want %s", what, got, tt.want)
		}
		g.client(r) // a second time: counted again, not logged again
		if fell, n := g.metrics.clientFallbacks.Load(), strings.Count(log.String(), `"level":"WARN","msg":"the forwarding header entry`); fell != uint64(2*boolToInt(tt.fallback)) || n != boolToInt(tt.fallback) {
			t.Errorf("%s: %d fallbacks counted and %d logged, want %d and %d", what, fell, n, 2*boolToInt(tt.fallback), boolToInt(tt.fallback))
		}
	}
}

func boolToInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// TestParseTrustProxy checks the three forms of TRUST_PROXY and what is
// refused.
func TestParseTrustProxy(t *testing.T) {
	t.Parallel()
	for setting, want := range map[string]string{
		"0":                          "hops 0",
		"10":                         "hops 10",
		"Fly-Client-IP":              "header Fly-Client-Ip",
		"cf-connecting-ip":           "header Cf-Connecting-Ip",
		"10.0.0.0/8":                 "proxies [10.0.0.0/8]",
		"10.1.2.3/8, 2606:4700::/32": "proxies [10.0.0.0/8 2606:4700::/32]",
		"192.0.2.1":                  "proxies [192.0.2.1/32]",
		"::ffff:192.0.2.1":           "proxies [192.0.2.1/32]",
		"::ffff:10.0.0.0/104":        "proxies [10.0.0.0/8]", // IPv4-mapped, as peers are not
		"::ffff:10.0.0.0/100":        "error TRUST_PROXY: ::ffff:10.0.0.0/100 trusts far more",
		"2001:db8::1":                "proxies [2001:db8::1/128]",
		"fe80::1%eth0":               "proxies [fe80::1/128]",
		"11":                         `error TRUST_PROXY: "11" is not a number of proxies from 0 to 10`,
		"-1":                         `error TRUST_PROXY: "-1" is not a number`,
		"two":                        `error TRUST_PROXY: "two" is neither`,
		"X-Forwarded-For":            "error TRUST_PROXY: X-Forwarded-For is a list that clients add to",
		"x-forwarded-for":            "error TRUST_PROXY: X-Forwarded-For is a list that clients add to",
		"Fly_Client_IP":              `error TRUST_PROXY: "Fly_Client_IP" is neither`,
		"10.0.0.0/8,":                `error TRUST_PROXY: "10.0.0.0/8," is neither`,
		"10.0.0.300":                 `error TRUST_PROXY: "10.0.0.300" is neither`,
		"0.0.0.0/0":                  "error TRUST_PROXY: 0.0.0.0/0 trusts far more than a proxy's addresses",
		"10.0.0.0/8, ::/0":           "error TRUST_PROXY: ::/0 trusts far more",
		"0.0.0.0/1, 128.0.0.0/1":     "error TRUST_PROXY: 0.0.0.0/1 trusts far more", // everyone, in halves
		"10.0.0.0/7":                 "error TRUST_PROXY: 10.0.0.0/7 trusts far more",
		"fc00::/7, 10.0.0.0/8":       "proxies [fc00::/7 10.0.0.0/8]", // the private ranges
		"f800::/6":                   "error TRUST_PROXY: f800::/6 trusts far more",
	} {
		trust, err := parseTrustProxy(setting)
		got := fmt.Sprintf("hops %d", trust.hops)
		switch {
		case err != nil:
			got = "error " + err.Error()
		case trust.header != "":
			got = "header " + trust.header
		case trust.proxies != nil:
			got = fmt.Sprintf("proxies %v", trust.proxies)
		}
		if !strings.HasPrefix(got, want) || (err == nil) != !strings.HasPrefix(want, "error") {
			t.Errorf("TRUST_PROXY=%s: %s, want %s", setting, got, want)
		}
	}
}

// TestLimitKeys checks what counts as one client: an IPv4 address, an IPv6
// /64 within its /48, and an IPv6 address that carries an IPv4 one as that.
func TestLimitKeys(t *testing.T) {
	t.Parallel()
	v4 := func(s string) clientKey { return clientKey{netip.MustParseAddr("::ffff:" + s).As16(), 32} }
	v6 := func(s string, bits uint8) clientKey { return clientKey{netip.MustParseAddr(s).As16(), bits} }
	tests := []struct {
		addr     string
		own, net clientKey
	}{
		{"203.0.113.7", v4("203.0.113.7"), clientKey{}},
		{"::ffff:203.0.113.7", v4("203.0.113.7"), clientKey{}},
		{"64:ff9b::cb00:7107", v4("203.0.113.7"), clientKey{}},    // NAT64
		{"2002:cb00:7107:1:2::3", v4("203.0.113.7"), clientKey{}}, // 6to4
		{"2001:db8:1:2:3:4:5:6", v6("2001:db8:1:2::", 64), v6("2001:db8:1::", 48)},
		{"2001:db8:1:2:ffff::9", v6("2001:db8:1:2::", 64), v6("2001:db8:1::", 48)},
		{"2001:db8:1:ff02::9", v6("2001:db8:1:ff02::", 64), v6("2001:db8:1::", 48)},
		{"fe80::1%eth0", v6("fe80::", 64), v6("fe80::", 48)},
		{"64:ff9b:1::cb00:7107", v6("64:ff9b:1::", 64), v6("64:ff9b:1::", 48)}, // RFC 8215's local NAT64: no IPv4 inside
	}
	for _, tt := range tests {
		own, network, hasNetwork := keysOf(netip.MustParseAddr(tt.addr))
		if own != tt.own || network != tt.net || hasNetwork != (tt.net != clientKey{}) {
			t.Errorf("keysOf(%s) = %v, %v, %v; want %v, %v", tt.addr, own, network, hasNetwork, tt.own, tt.net)
		}
	}
}

// TestLimiter checks the bucket arithmetic: a burst of N, then one every
// period/N, each client on its own; an IPv6 /64 as one client, and its /48
// under a limit of 16 times as many.
func TestLimiter(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	l := newLimiter(3, time.Minute, clock.now) // 3 at once, then one every 20 s
	wait := func(addr string) time.Duration {
		w, _ := l.wait(netip.MustParseAddr(addr))
		return w
	}
	for i := range 3 {
		if w := wait("203.0.113.7"); w != 0 {
			t.Fatalf("request %d of a burst of 3: wait %v, want 0", i+1, w)
		}
	}
	if w, hit := l.wait(netip.MustParseAddr("203.0.113.7")); w != 20*time.Second || hit != hitAddress {
		t.Errorf("4th request at once: wait %v (%s), want 20s (%s)", w, hit, hitAddress)
	}
	if w := wait("203.0.113.8"); w != 0 {
		t.Errorf("another client's first request: wait %v, want 0", w)
	}
	clock.advance(19*time.Second + 500*time.Millisecond)
	if w := wait("203.0.113.7"); w != 500*time.Millisecond {
		t.Errorf("19.5 s later: wait %v, want 500ms", w)
	}
	clock.advance(500 * time.Millisecond)
	if w := wait("203.0.113.7"); w != 0 {
		t.Errorf("20 s later: wait %v, want 0 (one request earned back)", w)
	}
	if w := wait("::ffff:203.0.113.7"); w != 20*time.Second {
		t.Errorf("right after, IPv4-mapped: wait %v, want 20s: the same client", w)
	}
	clock.advance(time.Hour)
	for i := range 3 {
		if w := wait("203.0.113.7"); w != 0 {
			t.Errorf("an hour later, request %d: wait %v, want 0 (the whole burst back, no more)", i+1, w)
		}
	}
	if w := wait("203.0.113.7"); w == 0 {
		t.Errorf("an hour later, request 4: allowed, want refused: idle time must not pile up beyond the burst")
	}

	// One /64 is one client; a /48 may make 16 times as many, across its
	// /64s: a burst of 48, then one every 20/16 s.
	for i := range 3 {
		if w := wait(fmt.Sprintf("2001:db8:1:0:%x::1", i)); w != 0 {
			t.Fatalf("request %d from one /64: wait %v, want 0", i+1, w)
		}
	}
	if w, hit := l.wait(netip.MustParseAddr("2001:db8:1:0:ffff::9")); w != 20*time.Second || hit != hitAddress {
		t.Errorf("4th request from one /64: wait %v (%s), want 20s (%s)", w, hit, hitAddress)
	}
	for i := 1; i < 16; i++ {
		for j := range 3 {
			if w := wait(fmt.Sprintf("2001:db8:1:%x::%x", i, j+1)); w != 0 {
				t.Fatalf("/64 number %d of a /48, request %d: wait %v, want 0", i+1, j+1, w)
			}
		}
	}
	w, hit := l.wait(netip.MustParseAddr("2001:db8:1:10::1"))
	if w != 20*time.Second/16 || hit != hitNetwork {
		t.Errorf("request 49 from one /48, from a new /64: wait %v (%s), want %v (%s)", w, hit, 20*time.Second/16, hitNetwork)
	}
	if w := wait("2001:db8:2::1"); w != 0 {
		t.Errorf("the next /48: wait %v, want 0", w)
	}
	clock.advance(20 * time.Second / 16)
	if w := wait("2001:db8:1:10::1"); w != 0 {
		t.Errorf("20/16 s later, the /48 earned one back: wait %v, want 0", w)
	}
	// Refused by both, the longer wait and its limit: the first /64,
	// 1.25 s after its burst, waits 18.75 s; the /48, at most 20/16 s.
	if w, hit := l.wait(netip.MustParseAddr("2001:db8:1::ffff")); hit != hitAddress || w != 18750*time.Millisecond {
		t.Errorf("refused by its /64 and its /48: wait %v (%s), want 18.75s (%s): the longer wait", w, hit, hitAddress)
	}
	// A request refused by one limit is not counted by the other.
	clock.advance(time.Hour)
	for range 3 {
		wait("2001:db8:3:1::1")
	}
	for range 20 {
		wait("2001:db8:3:1::1") // refused by the /64: must not use up the /48
	}
	for i := 2; i < 17; i++ {
		for j := range 3 {
			if w := wait(fmt.Sprintf("2001:db8:3:%x::%x", i, j+1)); w != 0 {
				t.Fatalf("a /48 whose one /64 was refused 20 times: /64 %d, request %d: wait %v, want 0", i, j+1, w)
			}
		}
	}
}

// TestLimiterUnderAFlood floods a limiter's table with new addresses, twice
// over, with a fake clock: the table stays within
// maxClients, clients whose allowance is back are forgotten first, then
// those closest to it, a client over its limit is never forgotten, and a
// table full of clients over their limit refuses new ones for a second.
func TestLimiterUnderAFlood(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	l := newLimiter(3, time.Hour, clock.now) // 3 at once, then one every 20 min
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}) }
	wait := func(a netip.Addr) time.Duration {
		w, _ := l.wait(a)
		return w
	}
	limited, two, fresh := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3")
	for range 3 {
		wait(limited) // over its limit for 20 min
	}
	wait(two)
	wait(two) // one request left, 40 min from its whole allowance
	// Twice the table of new addresses, one request each: 20 min from
	// their whole allowance, closer than two.
	for i := range 2 * maxClients {
		clock.advance(time.Microsecond) // no two alike, so that a sweep's cut is exact
		if w := wait(addr(i)); w != 0 {
			t.Fatalf("new address %d of the flood: wait %v, want 0", i, w)
		}
		if n := len(l.tat); n > maxClients || i >= maxClients && n <= maxClients*3/4 {
			t.Fatalf("after %d new addresses the table holds %d clients, want at most %d, and at least three quarters of that and the newcomer once full: a sweep forgets no more than it must",
				i+1, n, maxClients)
		}
	}
	if w := wait(limited); w == 0 {
		t.Errorf("a client over its limit was forgotten in a flood: it got a fresh allowance")
	}
	if w := wait(two); w != 0 || wait(two) == 0 {
		t.Errorf("the client with one request left, after the flood: want one more allowed, then refused: it was forgotten before the flood's closer clients")
	}
	if w := wait(addr(2*maxClients - 1)); w != 0 || wait(addr(2*maxClients-1)) != 0 || wait(addr(2*maxClients-1)) == 0 {
		t.Errorf("the flood's last address: want 2 more allowed, then refused")
	}

	// A flood of IPv6 /48s, whose allowance is longer than an address's,
	// does not free a client over its limit either.
	clock.advance(2 * time.Hour)
	for range 3 {
		wait(limited)
	}
	clock.advance(5 * time.Minute)      // 55 min from its whole allowance, 15 over its limit
	for i := range maxClients/15 + 16 { // past the table's size
		for j := range 15 { // 45 requests a /48: 56.25 min from its whole allowance, under its limit of 58.75
			for range 3 {
				wait(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, byte(i >> 8), byte(i), byte(j), 15: 1}))
			}
		}
	}
	if w := wait(limited); w == 0 {
		t.Errorf("a client over its limit was forgotten in a flood of IPv6 /48s")
	}
	if n := len(l.tat); n > 65536 {
		t.Errorf("the table holds %d clients, want at most 65,536", n)
	}

	// Every client in the table, all 65,536 of them, over its limit: a new
	// address is refused for a second, without a sweep, until the first
	// one comes back.
	clock.advance(2 * time.Hour)
	for i := range 65_536 {
		if w := wait(addr(i)); w != 0 {
			t.Fatalf("new address %d of 65,536: wait %v, want 0: the table holds 65,536 clients", i+1, w)
		}
		for range 3 * min(i, 1) { // all but the first over their limit
			wait(addr(i))
		}
	}
	if n := len(l.tat); n != 65_536 {
		t.Errorf("after 65,536 new addresses the table holds %d clients, want every one: no sweep before it is full", n)
	}
	if w := wait(fresh); w != 0 { // in the place of the one under its limit
		t.Fatalf("a new address when one client of 65,536 is under its limit: wait %v, want 0", w)
	}
	for range 3 {
		wait(fresh)
	}
	if w, hit := l.wait(netip.MustParseAddr("192.0.2.4")); w != time.Second || hit != hitFull {
		t.Errorf("a new address while every client is over its limit: wait %v (%s), want 1s (%s)", w, hit, hitFull)
	}
	// Through the guard: counted, and one warning for them all.
	var log strings.Builder
	g := newGuard(slog.New(slog.NewJSONHandler(&log, nil)), &metrics{}, trustProxy{}, l, 0)
	for range 3 {
		g.allow(netip.MustParseAddr("198.51.100.7"))
	}
	g.allow(netip.MustParseAddr("2001:db8:ffff::1"))
	if n, warned := g.metrics.rateLimited.Load(), strings.Count(log.String(), `"level":"WARN","msg":"the rate limiter's table is full`); n != 4 || warned != 1 {
		t.Errorf("4 new addresses against a full table: %d counted as limited, %d warnings; want 4 and 1", n, warned)
	}
	// No scan of the table for each: 20,000 more new addresses cost about
	// what 20,000 requests cost (a scan each would take seconds).
	start := time.Now()
	for i := range 20_000 {
		l.wait(netip.AddrFrom4([4]byte{11, byte(i >> 16), byte(i >> 8), byte(i)}))
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("20,000 new addresses against a full table took %v: a scan of the table for each?", took)
	}
	if w := wait(addr(1)); w == 0 {
		t.Errorf("a client over its limit was let through while the table was full")
	}
	// Every one is 20 min over its limit: a new address is refused until
	// that very moment, and no longer.
	clock.advance(20*time.Minute - time.Nanosecond)
	if w, hit := l.wait(netip.MustParseAddr("192.0.2.5")); w != time.Second || hit != hitFull {
		t.Errorf("a new address 1 ns before the first clients are back under their limit: wait %v (%s), want 1s (%s)", w, hit, hitFull)
	}
	clock.advance(time.Nanosecond)
	if w := wait(netip.MustParseAddr("192.0.2.5")); w != 0 {
		t.Errorf("a new address the moment the first clients are back under their limit: wait %v, want 0", w)
	}
}

// TestLimiterMemory feeds a limiter a million forged IPv6 addresses, each
// a /48 and a /64 of its own, and reports what its table keeps. Not
// parallel: it measures the whole process's heap.
func TestLimiterMemory(t *testing.T) {
	clock := newFakeClock()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l := newLimiter(3, time.Hour, clock.now)
	for i := range 1_000_000 {
		clock.advance(time.Millisecond)
		l.wait(netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, byte(i >> 16), byte(i >> 8), byte(i), 7: 1}))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	heap := float64(after.HeapAlloc-min(before.HeapAlloc, after.HeapAlloc)) / (1 << 20)
	t.Logf("a million forged IPv6 addresses, each a /48 and a /64 of its own: %d clients kept, %.1f MiB", len(l.tat), heap)
	if len(l.tat) > maxClients || heap > 16 {
		t.Errorf("a million forged addresses: %d clients and %.1f MiB kept, want at most %d and 16 MiB", len(l.tat), heap, maxClients)
	}
	runtime.KeepAlive(l)
}

// TestConnectionLimit checks CONNECTION_LIMIT on a real listener: one
// client address holds at most the limit, more are closed unanswered and
// counted, other addresses and trusted proxies are not affected, and a
// closed connection frees its place.
func TestConnectionLimit(t *testing.T) {
	t.Parallel()
	serve := func(t *testing.T, setting string, direct bool) (*guard, string, *strings.Builder) {
		var log strings.Builder
		g := testGuard(t, setting, &log)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {})}
		go srv.Serve(g.limitConnections(ln, direct))
		t.Cleanup(func() { srv.Close() })
		return g, ln.Addr().String(), &log
	}
	// open dials from local and reports whether the connection is served.
	open := func(t *testing.T, local, addr string) (net.Conn, bool) {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(local)}, Timeout: 5 * time.Second}
		conn, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial from %s: %v", local, err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprint(conn, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		answer, err := io.ReadAll(io.LimitReader(conn, 12))
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("a connection from %s neither answered nor closed within 5 s: one over the cap must be closed at once", local)
		}
		return conn, string(answer) == "HTTP/1.1 200"
	}
	for _, tt := range []struct {
		setting string
		direct  bool
		capped  bool // 127.0.0.1 is capped
	}{
		{"0", false, true},
		{"10.0.0.0/8", false, true}, // the peer is no trusted proxy
		{"127.0.0.1", false, false}, // it is
		{"1", false, false},         // behind a count, the peer is a proxy
		{"Fly-Client-IP", false, false},
		{"1", true, true}, // on the metrics listener, every peer is capped
		{"127.0.0.1", true, true},
	} {
		t.Run(fmt.Sprintf("TRUST_PROXY=%s,direct=%v", tt.setting, tt.direct), func(t *testing.T) {
			t.Parallel()
			g, addr, log := serve(t, tt.setting, tt.direct)
			var first net.Conn
			for i := range 3 {
				conn, served := open(t, "127.0.0.1", addr)
				if !served {
					t.Fatalf("connection %d of 3 from one address was not served", i+1)
				}
				if i == 0 {
					first = conn
				}
			}
			if _, served := open(t, "127.0.0.1", addr); served == tt.capped {
				t.Fatalf("a 4th connection from one address: served %v, want %v", served, !tt.capped)
			}
			if !tt.capped {
				return
			}
			open(t, "127.0.0.1", addr)
			if _, served := open(t, "127.0.0.2", addr); !served {
				t.Errorf("another address's first connection was not served")
			}
			if n, warned := g.metrics.connectionsRefused.Load(), strings.Count(log.String(), `"level":"WARN","msg":"a client address holds CONNECTION_LIMIT`); n != 2 || warned != 1 {
				t.Errorf("%d connections refused and %d warnings, want 2 and 1", n, warned)
			}
			first.Close()
			for range 100 { // the server sees the close a moment later
				if _, served := open(t, "127.0.0.1", addr); served {
					return
				}
			}
			t.Errorf("a closed connection's place was not freed")
		})
	}
	// One client as the rate limit counts them: an IPv6 /64; an IPv4
	// address, however IPv6 carries it.
	g := testGuard(t, "0", io.Discard) // a cap of 3
	peers := make(chan net.Conn, 16)
	for _, addr := range []string{"2001:db8::1", "2001:db8::2", "2001:db8::ffff:3", "2001:db8::4", "2001:db8:0:1::1",
		"192.0.2.1", "::ffff:192.0.2.1", "64:ff9b::c000:201", "2002:c000:201::1"} {
		conn, _ := net.Pipe()
		peers <- peerConn{conn, &net.TCPAddr{IP: net.ParseIP(addr), Port: 4242}}
	}
	close(peers)
	var accepted []string
	var conns []net.Conn
	ln := g.limitConnections(chanListener(peers), false)
	for {
		conn, err := ln.Accept()
		if err != nil {
			break
		}
		accepted = append(accepted, conn.RemoteAddr().(*net.TCPAddr).IP.String())
		conns = append(conns, conn)
	}
	if want := "2001:db8::1 2001:db8::2 2001:db8::ffff:3 2001:db8:0:1::1 192.0.2.1 192.0.2.1 64:ff9b::c000:201"; strings.Join(accepted, " ") != want {
		t.Errorf("CONNECTION_LIMIT=3: accepted %s, want %s: the 4th of one /64, and of one IPv4 address, refused", strings.Join(accepted, " "), want)
	}
	// A second close frees nothing more: with one of 192.0.2.1's three
	// closed twice, it may open one more, not two.
	conns[4].Close()
	conns[4].Close()
	key, _, _ := keysOf(netip.MustParseAddr("192.0.2.1"))
	if one, two := ln.(*cappedListener).hold(key, 1), ln.(*cappedListener).hold(key, 1); !one || two {
		t.Errorf("192.0.2.1 with one of its 3 connections closed twice: a 4th allowed %v, a 5th %v; want true, false (a cap of 3)", one, two)
	}
	ln.(*cappedListener).hold(key, -1)
	for _, conn := range conns {
		conn.Close()
		conn.Close()
	}
	if open := ln.(*cappedListener).open; len(open) != 0 {
		t.Errorf("every connection closed, and the listener still counts %v", open)
	}
	// Closed while others are accepted, as on a busy server: each close
	// still frees its place.
	peers = make(chan net.Conn)
	go func() {
		for i := range 20_000 {
			conn, _ := net.Pipe()
			peers <- peerConn{conn, &net.TCPAddr{IP: net.IPv4(192, 0, 2, byte(i%2)), Port: 4242}}
		}
		close(peers)
	}()
	ln = g.limitConnections(chanListener(peers), false)
	var wg sync.WaitGroup
	for {
		conn, err := ln.Accept()
		if err != nil {
			break
		}
		wg.Add(1)
		go func() { defer wg.Done(); conn.Close() }()
	}
	wg.Wait()
	if open := ln.(*cappedListener).open; len(open) != 0 {
		t.Errorf("20,000 connections closed as others were accepted, and the listener still counts %v", open)
	}

	// Off: the listener as it is.
	g = newGuard(slog.New(slog.DiscardHandler), &metrics{}, trustProxy{}, nil, 0)
	if ln := (&net.TCPListener{}); g.limitConnections(ln, true) != net.Listener(ln) {
		t.Errorf("CONNECTION_LIMIT=off: the listener is wrapped")
	}
}

// limiterClock runs the service's own limiter, as RATE_LIMIT made it, on clock.
func limiterClock(clock *fakeClock) func(*server, *spotifyClient) {
	return func(s *server, _ *spotifyClient) { s.guard.limiter.now, s.guard.limiter.epoch = clock.now, clock.now() }
}

// TestRateLimit runs RATE_LIMIT through the whole handler stack: every POST
// to a token endpoint counts, valid or not; nothing else does; a client over
// the limit gets 429 with Retry-After, and Spotify is not called.
func TestRateLimit(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	svc := startService(t, likeSpotify, map[string]string{"RATE_LIMIT": "2/min", "CORS_ALLOWED_ORIGINS": "https://app.example.com"},
		limiterClock(clock))
	for range 5 {
		send(t, "GET", svc.url+"/healthz", noneType, "")
		send(t, "GET", svc.url+"/", noneType, "")
		send(t, "OPTIONS", svc.url+tokenPath, noneType, "", "Origin", "https://app.example.com", "Access-Control-Request-Method", "POST")
		send(t, "POST", svc.url+"/swap", formType, "code=a")
		send(t, "GET", svc.url+tokenPath, noneType, "")
	}
	if got := send(t, "POST", svc.url+tokenPath, formType, "code=AQDfirst"); got.status != 200 {
		t.Fatalf("first POST = %d %s, want 200", got.status, got.body)
	}
	checkError(t, "second POST, no refresh_token", send(t, "POST", svc.url+refreshPath, formType, ""), 400, "invalid_request")
	clock.advance(700 * time.Millisecond) // 29.3 s left: rounded up, not to the nearest
	got := send(t, "POST", svc.url+tokenPath, formType, "code=AQDthird", "Origin", "https://app.example.com")
	checkError(t, "third POST", got, 429, "temporarily_unavailable")
	if ra := got.header.Get("Retry-After"); ra != "30" {
		t.Errorf("third POST 0.7 s after the second: Retry-After = %q, want 30 (one request every 30 s, 29.3 s left)", ra)
	}
	if got.header.Get("Access-Control-Allow-Origin") != "https://app.example.com" {
		t.Errorf("third POST: no Access-Control-Allow-Origin, so the page cannot read its 429")
	}
	checkError(t, "fourth POST, at the other endpoint", send(t, "POST", svc.url+refreshPath, jsonType, `{"refresh_token":"AQB"}`), 429, "temporarily_unavailable")
	checkError(t, "fifth POST, declaring a body over 64 KiB", postDeclaring100MB(t, svc.url), 429, "temporarily_unavailable")
	if got := send(t, "GET", svc.url+"/healthz", noneType, ""); got.status != 200 {
		t.Errorf("GET /healthz over the limit = %d, want 200", got.status)
	}
	if forms := svc.spotify.received(); len(forms) != 1 {
		t.Errorf("Spotify received %d requests, want 1: a refused request must not reach it", len(forms))
	}
	if n := svc.server.metrics.rateLimited.Load(); n != 3 {
		t.Errorf("tokenswap_rate_limited_total = %d, want 3", n)
	}
	svc.close()
	lines := logLines(t, svc.log.String())
	last := lines[len(lines)-4] // the third POST
	if last.Status != 429 || last.Error != "temporarily_unavailable" || !strings.Contains(last.Reason, "RATE_LIMIT") || last.Client != "127.0.0.1" {
		t.Errorf("log line of a refused request = %+v, want 429 temporarily_unavailable, why (RATE_LIMIT), client 127.0.0.1", last)
	}
}

// TestRateLimitAtOnce checks that requests from one address that arrive
// all at once are counted each once: of 150 at RATE_LIMIT=100/h, exactly
// 100 reach Spotify.
func TestRateLimitAtOnce(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"RATE_LIMIT": "100/h"})
	var wg sync.WaitGroup
	var ok, limited atomic.Int64
	for range 150 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			switch send(t, "POST", svc.url+tokenPath, formType, "code=AQDatonce").status {
			case 200:
				ok.Add(1)
			case 429:
				limited.Add(1)
			}
		}()
	}
	wg.Wait()
	if ok.Load() != 100 || limited.Load() != 50 || len(svc.spotify.received()) != 100 {
		t.Errorf("150 POSTs at once at 100/h: %d answered 200, %d 429, Spotify received %d; want 100, 50, 100",
			ok.Load(), limited.Load(), len(svc.spotify.received()))
	}
	// The limiter alone, harder: 120,000 requests from one /64 at once.
	l := newLimiter(100_000, time.Hour, newFakeClock().now)
	var allowed atomic.Int64
	start := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range 30_000 {
				if w, _ := l.wait(netip.MustParseAddr("2001:db8::1")); w == 0 {
					allowed.Add(1)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	if allowed.Load() != 100_000 {
		t.Errorf("120,000 requests at once at 100000/h: %d allowed, want 100,000", allowed.Load())
	}
}

// TestRateLimitBehindProxies checks that with TRUST_PROXY the limit goes by
// the client's address that the proxy appended, not by what the client sent,
// and that without it, a request through a proxy logs one warning.
func TestRateLimitBehindProxies(t *testing.T) {
	t.Parallel()
	svc := startService(t, likeSpotify, map[string]string{"RATE_LIMIT": "1/h", "TRUST_PROXY": "1"})
	post := func(xff string) int {
		return send(t, "POST", svc.url+tokenPath, formType, "code=AQDproxy", "X-Forwarded-For", xff).status
	}
	if post("203.0.113.7") != 200 || post("203.0.113.8") != 200 {
		t.Errorf("two clients behind the proxy: want each its own limit")
	}
	if got := post("198.51.100.99, 203.0.113.7"); got != 429 {
		t.Errorf("client 203.0.113.7 again, with a forged entry on the left = %d, want 429", got)
	}
	// A client that rotates a first line of its own is the same client:
	// the proxy appends to the last.
	for i := range 3 {
		got := send(t, "POST", svc.url+tokenPath, formType, "code=AQDproxy", "X-Forwarded-For", fmt.Sprintf("198.51.100.%d", i), "X-Forwarded-For", "203.0.113.8")
		if got.status != 429 {
			t.Errorf("client 203.0.113.8 again, with a forged first line %d = %d, want 429", i, got.status)
		}
	}
	svc.close()
	if lines := logLines(t, svc.log.String()); lines[2].Client != "203.0.113.7" || lines[3].Client != "203.0.113.8" {
		t.Errorf("log line client = %q, want 203.0.113.7", lines[2].Client)
	}

	unlimited := startService(t, likeSpotify, nil)
	send(t, "POST", unlimited.url+tokenPath, formType, "code=AQDproxy", "X-Forwarded-For", "203.0.113.7")
	unlimited.close()
	if strings.Contains(unlimited.log.String(), "TRUST_PROXY") {
		t.Errorf("without RATE_LIMIT, X-Forwarded-For warned of the rate limit:\n%s", unlimited.log)
	}

	direct := startService(t, likeSpotify, map[string]string{"RATE_LIMIT": "100/min"})
	for range 3 {
		send(t, "POST", direct.url+tokenPath, formType, "code=AQDproxy", "X-Forwarded-For", "203.0.113.7")
	}
	direct.close()
	if n := strings.Count(direct.log.String(), `"level":"WARN","msg":"a request came with X-Forwarded-For but TRUST_PROXY is 0`); n != 1 {
		t.Errorf("requests with X-Forwarded-For and TRUST_PROXY=0: %d warnings, want 1:\n%s", n, direct.log)
	}
	if lines := logLines(t, direct.log.String()); lines[len(lines)-1].Client != "127.0.0.1" {
		t.Errorf("TRUST_PROXY=0: log line client = %q, want the TCP peer 127.0.0.1", lines[len(lines)-1].Client)
	}
}

// TestRateLimitPerSecond drives N/s through HTTP with a fake clock: a
// burst of N, then one every 1/N s, and the Retry-After of a wait under a
// second is 1.
func TestRateLimitPerSecond(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	svc := startService(t, likeSpotify, map[string]string{"RATE_LIMIT": "4/s"},
		limiterClock(clock))
	post := func() reply { return send(t, "POST", svc.url+tokenPath, formType, "code=AQDfast") }
	for i := range 4 {
		if got := post(); got.status != 200 {
			t.Fatalf("request %d of a burst of 4 at 4/s = %d, want 200", i+1, got.status)
		}
	}
	got := post()
	checkError(t, "5th request at once at 4/s", got, 429, "temporarily_unavailable")
	if ra := got.header.Get("Retry-After"); ra != "1" || !strings.Contains(got.body, "retry in 1 s") {
		t.Errorf("5th request at once at 4/s: Retry-After %q, body %s; want 1, and the body saying so", ra, got.body)
	}
	clock.advance(250 * time.Millisecond)
	if got := post(); got.status != 200 {
		t.Errorf("250 ms later = %d, want 200: one earned back", got.status)
	}
	if got := post(); got.status != 429 {
		t.Errorf("right after = %d, want 429", got.status)
	}
}

// TestRateLimitPerNetwork checks the IPv6 /48 limit through HTTP: the
// description says which limit a request hit, and Retry-After is the wait.
func TestRateLimitPerNetwork(t *testing.T) {
	t.Parallel()
	clock := newFakeClock()
	svc := startService(t, likeSpotify, map[string]string{"RATE_LIMIT": "1/min", "TRUST_PROXY": "1"},
		limiterClock(clock))
	post := func(from string) reply {
		return send(t, "POST", svc.url+tokenPath, formType, "code=AQDv6", "X-Forwarded-For", from)
	}
	for i := range 16 {
		if got := post(fmt.Sprintf("2001:db8:7:%x00::1", i)); got.status != 200 { // each in a /56 of its own
			t.Fatalf("/64 number %d of one /48 = %d, want 200", i+1, got.status)
		}
	}
	got := post("2001:db8:7:ffff::1")
	checkError(t, "a 17th /64 of one /48", got, 429, "temporarily_unavailable")
	if ra := got.header.Get("Retry-After"); ra != "4" || !strings.Contains(got.body, "network") {
		t.Errorf("a 17th /64 of one /48: Retry-After %q, body %s; want 4 (60/16 s, rounded up) and the /48 named", ra, got.body)
	}
	got = post("2001:db8:7:0::2")
	if ra := got.header.Get("Retry-After"); got.status != 429 || ra != "60" || strings.Contains(got.body, "network") {
		t.Errorf("the first /64 again = %d, Retry-After %q, body %s; want 429, 60, and this address named", got.status, ra, got.body)
	}
	if got := post("2001:db8:8::1"); got.status != 200 {
		t.Errorf("another /48 = %d, want 200", got.status)
	}
}

// chanListener is a listener whose connections come from a channel.
type chanListener chan net.Conn

func (l chanListener) Accept() (net.Conn, error) {
	if conn, ok := <-l; ok {
		return conn, nil
	}
	return nil, net.ErrClosed
}
func (l chanListener) Close() error   { return nil }
func (l chanListener) Addr() net.Addr { return &net.TCPAddr{} }

// peerConn is a connection from the address remote.
type peerConn struct {
	net.Conn
	remote net.Addr
}

func (c peerConn) RemoteAddr() net.Addr { return c.remote }
