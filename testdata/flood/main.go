// Command flood measures what docs/security.md promises of CONNECTION_LIMIT and
// the 16 KiB header cap: with the defaults and no GOMEMLIMIT, a flood of
// idle or slow-header connections from one address leaves the service's RSS
// under 64 MiB, and a client at another address still gets its answer in
// under a second meanwhile. From the repository root:
//
//	go run ./testdata/flood [-duration 8s] [-max-rss 64] [-max-latency 1s] [-gomemlimit 48MiB] [-bin PATH] [-v]
//
// It builds the service (or runs -bin) in an empty directory against a fake
// Spotify, then floods it from 127.0.0.1 four ways, one after another: idle
// keep-alive connections, slow headers, twice as many slow headers, and idle
// connections to the metrics listener, reopening each connection the service
// closes. Meanwhile a client at 127.0.0.2 swaps a code every 100 ms on a new
// connection. It prints, for each flood, the connections the attacker held at
// the peak and those the service closed on it, the service's peak RSS, and
// the client's swaps and worst latency; it exits 1 if a peak RSS or a swap
// missed its target. -v prints the service's log. Linux only: it reads /proc,
// and needs some 8,000 file descriptors (ulimit -Hn).
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"
)

// flood is one way of attacking the service, and then what it measured.
type flood struct {
	name    string
	conns   int  // connections the attacker tries to hold at once
	slow    bool // headers dripped 1 KiB every 100 ms, else one request then idle
	metrics bool // against the metrics listener, else the service's port

	held, closed, dialErrs int64  // held at the peak, closed by the service, dials failed
	dialErr                string // the first failed dial's error
	peakRSS                int64  // bytes
	ok, total              int    // the legitimate client's swaps
	worst                  time.Duration
	failure                string // the first failed swap's error
}

const (
	dialers    = 64 // dials in progress at once
	slowChunk  = 1 << 10
	slowTarget = 60 << 10
	tick       = 100 * time.Millisecond
)

var attackerIP, clientIP = net.IPv4(127, 0, 0, 1), net.IPv4(127, 0, 0, 2)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ok, err := run(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "flood:", err)
	}
	if err != nil || !ok {
		os.Exit(1)
	}
}

func run(ctx context.Context) (bool, error) {
	duration := flag.Duration("duration", 8*time.Second, "how long each flood lasts")
	maxRSS := flag.Float64("max-rss", 64, "the service's peak RSS must stay under this many MiB")
	maxLatency := flag.Duration("max-latency", time.Second, "every swap must be answered within this")
	gomemlimit := flag.String("gomemlimit", "", "GOMEMLIMIT for the service (default none)")
	bin := flag.String("bin", "", "the service's binary (default: go build it from the working directory)")
	verbose := flag.Bool("v", false, "print the service's log")
	flag.Parse()
	floods := []*flood{
		{name: "idle keep-alive", conns: 7000},
		{name: "slow headers", conns: 1500, slow: true},
		{name: "slow headers x2", conns: 3000, slow: true},
		{name: "metrics listener", conns: 7000, metrics: true},
	}
	var lim syscall.Rlimit // Go has raised the soft limit to the hard one
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < 8000 {
		return false, fmt.Errorf("the attacker needs some 8000 file descriptors and may open only %d: raise the hard limit (ulimit -Hn)", lim.Cur)
	}
	tmp, err := os.MkdirTemp("", "flood")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(tmp)
	if *bin == "" {
		*bin, err = build(ctx, tmp)
	} else {
		*bin, err = filepath.Abs(*bin) // the service runs in another directory
	}
	if err != nil {
		return false, err
	}
	fake, err := fakeSpotify()
	if err != nil {
		return false, err
	}
	defer fake.Close()
	svc, err := start(ctx, *bin, tmp, "http://"+fake.Addr().String(), *gomemlimit, *verbose)
	if err != nil {
		return false, err
	}
	defer svc.stop()

	for _, f := range floods {
		if err := f.run(ctx, svc, *duration); err != nil {
			return false, fmt.Errorf("%s: %w", f.name, err)
		}
		select {
		case <-ctx.Done():
			return false, ctx.Err()
		case <-time.After(time.Second):
		}
	}
	if err := report(floods, svc); err != nil {
		return false, err
	}
	return verdict(floods, *maxRSS, *maxLatency), nil
}

// report prints what the floods measured, and the service's own figures.
func report(floods []*flood, svc *service) error {
	hwm, err := procStatus(svc.cmd.Process.Pid, "VmHWM")
	if err != nil {
		return err
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "flood\theld at peak\tclosed by service\tdial errors\tpeak RSS MiB\tswaps ok/total\tworst ms")
	for _, f := range floods {
		fmt.Fprintf(w, "%s\t%d\t%d\t%d\t%.1f\t%d/%d\t%d\n", f.name, f.held, f.closed, f.dialErrs,
			mib(f.peakRSS), f.ok, f.total, f.worst.Milliseconds())
	}
	w.Flush()
	for _, f := range floods {
		if f.dialErr != "" {
			fmt.Printf("%s: first dial error: %s\n", f.name, f.dialErr)
		}
	}
	fmt.Printf("service VmHWM: %.1f MiB\n", mib(hwm))
	for _, name := range []string{"tokenswap_connections_refused_total", "process_resident_memory_bytes"} {
		fmt.Printf("%s %s\n", name, scrape(svc.metricsAddr, name))
	}
	lines, warnings := svc.log.summary()
	fmt.Printf("service log: %d lines; its warnings and other lines: %q\n", lines, warnings)
	return nil
}

// verdict prints what missed its target, and reports whether all met theirs.
func verdict(floods []*flood, maxRSS float64, maxLatency time.Duration) bool {
	ok := true
	for _, f := range floods {
		var failed []string
		if rss := mib(f.peakRSS); rss >= maxRSS {
			failed = append(failed, fmt.Sprintf("peak RSS %.1f MiB, %.1f MiB over %.0f", rss, rss-maxRSS, maxRSS))
		}
		if f.ok < f.total || f.total == 0 {
			failed = append(failed, fmt.Sprintf("%d of %d swaps failed (first: %s)", f.total-f.ok, f.total, f.failure))
		}
		if f.worst >= maxLatency {
			failed = append(failed, fmt.Sprintf("worst swap took %v, limit %v", f.worst.Round(time.Millisecond), maxLatency))
		}
		if failed != nil {
			ok = false
			fmt.Printf("FAIL %s: %s\n", f.name, strings.Join(failed, "; "))
		}
	}
	if ok {
		fmt.Printf("ok: every peak RSS under %.0f MiB, every swap answered within %v\n", maxRSS, maxLatency)
	}
	return ok
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// build builds the service from the working directory, the repository root.
func build(ctx context.Context, dir string) (string, error) {
	mod, err := os.ReadFile("go.mod")
	if err != nil || !bytes.HasPrefix(mod, []byte("module spotify-token-swap\n")) {
		return "", errors.New("the working directory is not the repository root: run go run ./testdata/flood there, or give -bin")
	}
	bin := filepath.Join(dir, "spotify-token-swap")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, ".")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building the service: %w", err)
	}
	return bin, nil
}

// fakeSpotify answers every token request with tokens.
func fakeSpotify() (net.Listener, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("fake Spotify: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /api/token", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"access_token":"at","token_type":"Bearer","expires_in":3600,"refresh_token":"rt"}`)
	})
	go http.Serve(ln, mux)
	return ln, nil
}

// service is the service, running as a child process.
type service struct {
	cmd               *exec.Cmd
	addr, metricsAddr string        // 127.0.0.1:port
	exited            chan struct{} // closed once it has exited and its log is read
	log               serviceLog
}

// serviceLog is what the service logged: counted, and kept in part.
type serviceLog struct {
	mu                sync.Mutex
	lines             int
	kept              []string // distinct warnings, and lines that are not JSON
	addr, metricsAddr string
	ready             chan struct{} // closed once both addresses are known
	once              sync.Once
}

func (l *serviceLog) read(r io.Reader, verbose bool) {
	s := bufio.NewScanner(r)
	s.Buffer(nil, 1<<20)
	for s.Scan() {
		if verbose {
			fmt.Fprintln(os.Stderr, "service:", s.Text())
		}
		var line struct{ Level, Msg, Addr string }
		err := json.Unmarshal(s.Bytes(), &line)
		l.mu.Lock()
		l.lines++
		switch {
		case err != nil:
			l.kept = append(l.kept, s.Text())
		case line.Level == "WARN" && !slices.Contains(l.kept, line.Msg):
			l.kept = append(l.kept, line.Msg)
		case line.Msg == "serving metrics":
			l.metricsAddr = line.Addr
		case line.Msg == "listening":
			_, port, _ := net.SplitHostPort(line.Addr)
			l.addr = net.JoinHostPort("127.0.0.1", port)
		}
		if l.addr != "" && l.metricsAddr != "" {
			l.once.Do(func() { close(l.ready) })
		}
		l.mu.Unlock()
	}
}

func (l *serviceLog) summary() (int, []string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lines, slices.Clone(l.kept)
}

// start runs the service in a clean environment and an empty directory,
// and waits until it listens.
func start(ctx context.Context, bin, tmp, accountsURL, gomemlimit string, verbose bool) (*service, error) {
	env := []string{"PORT=0", "SPOTIFY_CLIENT_ID=flood-client-id", "SPOTIFY_CLIENT_SECRET=flood-client-secret",
		"SPOTIFY_CLIENT_CALLBACK_URL=flood-app://callback", "SPOTIFY_ACCOUNTS_URL=" + accountsURL, "METRICS_ADDR=127.0.0.1:0"}
	for _, name := range []string{"PATH", "HOME"} {
		if v, ok := os.LookupEnv(name); ok {
			env = append(env, name+"="+v)
		}
	}
	if gomemlimit != "" {
		env = append(env, "GOMEMLIMIT="+gomemlimit)
	}
	cmd := exec.Command(bin)
	cmd.Env, cmd.Dir = env, filepath.Join(tmp, "work")
	if err := os.Mkdir(cmd.Dir, 0o755); err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting the service: %w", err)
	}
	s := &service{cmd: cmd, exited: make(chan struct{}), log: serviceLog{ready: make(chan struct{})}}
	go func() {
		s.log.read(stderr, verbose)
		cmd.Wait()
		close(s.exited)
	}()
	select {
	case <-s.log.ready:
		s.addr, s.metricsAddr = s.log.addr, s.log.metricsAddr
		return s, nil
	case <-s.exited:
		_, logged := s.log.summary()
		return nil, fmt.Errorf("the service exited at start (%s): %q", cmd.ProcessState, logged)
	case <-ctx.Done():
		err = ctx.Err()
	case <-time.After(10 * time.Second):
		err = errors.New("the service did not log its addresses within 10s")
	}
	s.stop()
	return nil, err
}

// stop stops the service with SIGTERM, and kills it if it takes over 30 s.
func (s *service) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-s.exited
	}
}

// run floods the service for d, while sampling its RSS and swapping codes
// as a legitimate client, then closes the attacker's connections.
func (f *flood) run(ctx context.Context, svc *service, d time.Duration) error {
	ctx, cancelTimeout := context.WithTimeout(ctx, d)
	defer cancelTimeout()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	a := &attacker{flood: f, addr: svc.addr, tokens: make(chan struct{}, dialers), cancel: cancel,
		dialer: net.Dialer{LocalAddr: &net.TCPAddr{IP: attackerIP}, Timeout: 5 * time.Second}}
	if f.metrics {
		a.addr = svc.metricsAddr
	}
	var wg sync.WaitGroup
	wg.Add(f.conns + 2)
	for range f.conns {
		go func() { defer wg.Done(); a.attack(ctx) }()
	}
	go func() { defer wg.Done(); f.swap(ctx, "http://"+svc.addr+"/api/token") }()
	go func() {
		defer wg.Done()
		for t := time.NewTicker(tick); ctx.Err() == nil; <-t.C {
			rss, err := procStatus(svc.cmd.Process.Pid, "VmRSS")
			if err != nil {
				cancel(fmt.Errorf("reading the service's RSS (has it exited?): %w", err))
			}
			f.peakRSS = max(f.peakRSS, rss)
		}
	}()
	wg.Wait()
	f.held, f.closed, f.dialErrs = a.peak.Load(), a.closed.Load(), a.dialErrs.Load()
	if err := context.Cause(ctx); !errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return nil
}

// attacker holds connections open from attackerIP.
type attacker struct {
	*flood
	addr                         string
	dialer                       net.Dialer
	tokens                       chan struct{} // one per dial in progress
	cancel                       context.CancelCauseFunc
	mu                           sync.Mutex // guards flood.dialErr
	open, peak, closed, dialErrs atomic.Int64
}

// attack holds one connection open until ctx is done, reopening it each
// time the service closes it.
func (a *attacker) attack(ctx context.Context) {
	for ctx.Err() == nil {
		conn, br := a.dial(ctx)
		if conn == nil {
			continue
		}
		gone := make(chan struct{}) // closed when the connection is
		go func() { io.Copy(io.Discard, br); close(gone) }()
		if a.hold(ctx, conn, gone) {
			a.closed.Add(1)
		}
		conn.Close()
		<-gone
	}
}

// dial opens a connection and sends what comes before holding it: a whole
// request, whose answer it reads, or the start of one. It returns nil if
// that failed, and counts why.
func (a *attacker) dial(ctx context.Context) (net.Conn, *bufio.Reader) {
	select {
	case a.tokens <- struct{}{}:
		defer func() { <-a.tokens }()
	case <-ctx.Done():
		return nil, nil
	}
	conn, err := a.dialer.DialContext(ctx, "tcp", a.addr)
	if err != nil {
		a.dialFailed(ctx, err)
		return nil, nil
	}
	br := bufio.NewReader(conn)
	request := "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
	if a.slow {
		request = strings.TrimSuffix(request, "\r\n") + "X-Padding: "
	}
	_, err = io.WriteString(conn, request)
	if err == nil && !a.slow {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		var resp *http.Response
		if resp, err = http.ReadResponse(br, nil); err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
		} else if errors.Is(err, os.ErrDeadlineExceeded) {
			err = nil // no answer, but open: held all the same
		}
		conn.SetReadDeadline(time.Time{})
	}
	if err != nil {
		conn.Close()
		if !over(ctx) {
			a.closed.Add(1)
		}
		return nil, nil
	}
	return conn, br
}

// dialFailed counts a failed dial, and stops the flood if the attacker is
// out of file descriptors.
func (a *attacker) dialFailed(ctx context.Context, err error) {
	if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
		a.cancel(fmt.Errorf("out of file descriptors with %d connections held: raise the limit (ulimit -Hn): %w", a.open.Load(), err))
	}
	if over(ctx) {
		return
	}
	a.dialErrs.Add(1)
	a.mu.Lock()
	if a.dialErr == "" {
		a.dialErr = err.Error()
	}
	a.mu.Unlock()
	time.Sleep(10 * time.Millisecond)
}

// hold keeps conn open, dripping headers if slow, until ctx is done or the
// connection is gone; it reports whether the service closed it. It counts
// as held once the service shows it took it: it answered the request, or
// has not closed the slow one for half a second (one over the cap is
// closed at once, one under it only at 16 KiB, after 1.6 s).
func (a *attacker) hold(ctx context.Context, conn net.Conn, gone <-chan struct{}) bool {
	t := time.NewTicker(tick)
	defer t.Stop()
	heldAfter := 0
	if a.slow {
		heldAfter = 5
	}
	chunk := bytes.Repeat([]byte("a"), slowChunk)
	for n := 0; ; n++ {
		if n == heldAfter {
			for held := a.open.Add(1); held > a.peak.Load(); {
				a.peak.CompareAndSwap(a.peak.Load(), held)
			}
			defer a.open.Add(-1)
		}
		select {
		case <-ctx.Done():
			return false
		case <-gone:
			return true
		case <-t.C:
		}
		if a.slow && n < slowTarget/slowChunk {
			if _, err := conn.Write(chunk); err != nil {
				return !over(ctx)
			}
		}
	}
}

// over reports whether the flood is over: net gives up at ctx's deadline a
// moment before ctx itself says so.
func over(ctx context.Context) bool {
	deadline, ok := ctx.Deadline()
	return ctx.Err() != nil || ok && !time.Now().Before(deadline)
}

// swap swaps a code at url every tick, on a new connection from clientIP,
// until ctx is done, and records the answers.
func (f *flood) swap(ctx context.Context, url string) {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: clientIP}}).DialContext}}
	for t := time.NewTicker(tick); ctx.Err() == nil; <-t.C {
		start := time.Now()
		resp, err := client.Post(url, "application/x-www-form-urlencoded", strings.NewReader("code=flood-check"))
		if err == nil {
			body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				err = fmt.Errorf("%s: %s", resp.Status, body)
			}
		}
		f.total++
		f.worst = max(f.worst, time.Since(start))
		if err == nil {
			f.ok++
		} else if f.failure == "" {
			f.failure = err.Error()
		}
	}
}

// procStatus returns a size field of /proc/pid/status, in bytes.
func procStatus(pid int, field string) (int64, error) {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(status)) {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// scrape returns the value of the metric name at addr, or why there is none.
func scrape(addr, name string) string {
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: clientIP}}).DialContext}}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	s := bufio.NewScanner(resp.Body)
	for s.Scan() {
		if value, ok := strings.CutPrefix(s.Text(), name+" "); ok {
			return value
		}
	}
	return "(not exported)"
}
