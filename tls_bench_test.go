package main_test

// Benchmarks of handoff serve over TLS and h2c (tls_test.go has the helpers):
//
//	go test -run '^$' -bench 'BenchmarkTLS|BenchmarkH2C' -benchtime 1x .
//
// The three load benchmarks send 2000 req/s (2% to /slow?ms=800) and do 20
// upgrades 1 s apart, each once the previous generation has exited (15 s at
// most); they report what the client saw. BenchmarkTLSHTTP2ServerOverhead
// compares package server with a bare http.Server in process. None asserts
// timing.

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
	"github.com/handoff-dev/handoff/server"
)

// tlsRate is an open-loop load: rate requests per second for as long as it
// runs, each on the client pick(seq) returns, never retried by us.
type tlsRate struct {
	base string
	rate int
	slow float64 // share of requests to /slow?ms=800
	pick func(seq int64) *http.Client

	stopC chan struct{}
	done  chan struct{}
	wg    sync.WaitGroup
	sem   chan struct{} // at most this many in flight; more count as failed (overload)

	requests, failed, http2, overload atomic.Int64
	mu                                sync.Mutex
	errs                              []string
	byPID                             map[int]int64
}

func tlsStartRate(tb testing.TB, base string, rate int, slow float64, pick func(int64) *http.Client) *tlsRate {
	l := &tlsRate{base: base, rate: rate, slow: slow, pick: pick, stopC: make(chan struct{}), done: make(chan struct{}),
		sem: make(chan struct{}, 2048), byPID: map[int]int64{}}
	go l.run()
	tb.Cleanup(l.stop)
	return l
}

func (l *tlsRate) run() {
	defer close(l.done)
	start := time.Now()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	var seq int64
	slowEvery := int64(1 / l.slow)
	for {
		select {
		case <-l.stopC:
			return
		case <-tick.C:
		}
		due := int64(time.Since(start).Seconds() * float64(l.rate))
		for ; seq < due; seq++ {
			path, want := "/", "Hello World !!!"
			if seq%slowEvery == slowEvery-1 {
				path, want = "/slow?ms=800", "slept 800 ms"
			}
			l.requests.Add(1)
			select {
			case l.sem <- struct{}{}:
			default:
				l.overload.Add(1) // a failure too, of the client's making: not sent
				continue
			}
			c := l.pick(seq)
			l.wg.Go(func() {
				defer func() { <-l.sem }()
				l.one(c, path, want)
			})
		}
	}
}

func (l *tlsRate) fail(msg string) {
	l.failed.Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < 10 {
		l.errs = append(l.errs, time.Now().Format("15:04:05.000 ")+msg)
	}
}

func (l *tlsRate) one(c *http.Client, path, want string) {
	resp, err := c.Get(l.base + path)
	if err != nil {
		l.fail(err.Error())
		return
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 || string(b) != want {
		l.fail(fmt.Sprintf("GET %s: %d %q %v", path, resp.StatusCode, b, err))
		return
	}
	if resp.ProtoMajor == 2 {
		l.http2.Add(1)
	}
	pid, _ := strconv.Atoi(resp.Header.Get("Handoff-Pid"))
	l.mu.Lock()
	l.byPID[pid]++
	l.mu.Unlock()
}

// stop stops sending and waits (bounded by the clients' timeouts) for the
// answers in flight.
func (l *tlsRate) stop() {
	select {
	case <-l.stopC:
	default:
		close(l.stopC)
	}
	<-l.done
	l.wg.Wait()
}

// tlsBenchUpgrades does n upgrades 1 s apart by SIGHUP, each once the previous
// replaced generation has exited (15 s at most), and returns how many took
// place and the replaced PIDs.
func tlsBenchUpgrades(b *testing.B, s *tlsServer, n int) (int, []int, []string) {
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	var replaced []int
	var hups []string
	for i := 1; i <= n; i++ {
		<-tick.C
		if len(replaced) > 0 {
			prev := replaced[len(replaced)-1]
			if !itest.Poll(15*time.Second, func() bool { return !itest.Alive(prev) }) {
				b.Errorf("upgrade %d: generation %d still alive 15s after being replaced", i, prev)
				break
			}
		}
		old := itest.ReadPID(b, s.pidFile)
		v := itest.NextVersion(s.version)
		itest.CopyFile(b, itest.Binary(b, "handoff-"+v), s.live+".new", 0o755)
		if err := os.Rename(s.live+".new", s.live); err != nil {
			b.Fatal(err)
		}
		hups = append(hups, time.Now().Format("05.000"))
		if err := syscall.Kill(old, syscall.SIGHUP); err != nil {
			b.Fatalf("SIGHUP %d: %v", old, err)
		}
		if !itest.Poll(15*time.Second, func() bool { p, err := itest.ReadPIDFile(s.pidFile); return err == nil && p != old }) {
			b.Errorf("upgrade %d: PID file still names %d 15s after SIGHUP", i, old)
			break
		}
		s.version = v
		replaced = append(replaced, old)
	}
	<-tick.C // one more second of load after the last upgrade
	if len(replaced) > 0 {
		last := replaced[len(replaced)-1]
		itest.Poll(15*time.Second, func() bool { return !itest.Alive(last) })
	}
	return len(replaced), replaced, hups
}

// tlsBenchUnderLoad runs the load benchmark on s with the clients of pick and
// reports its figures; drained lines are read once the output reached EOF.
func tlsBenchUnderLoad(b *testing.B, s *tlsServer, pick func(int64) *http.Client) {
	const rate, upgrades = 2000, 20
	load := tlsStartRate(b, s.base, rate, 0.02, pick)
	b.ResetTimer()
	start := time.Now()
	done, replaced, hups := tlsBenchUpgrades(b, s, upgrades)
	load.stop()
	sent := time.Since(start)
	b.StopTimer()
	s.stop(b)
	var goaway, cut, maxDrain int64
	var cutLines []string
	for _, p := range replaced {
		if d, ok := tlsDrained(b, s.logs, p); ok {
			n, _ := d.Num("http2")
			c, _ := d.Num("cut")
			dur, _ := d.Num("duration")
			goaway, cut, maxDrain = goaway+n, cut+c, max(maxDrain, dur)
			if c > 0 {
				cutLines = append(cutLines, d.Raw)
			}
		}
	}
	req, failed, overload := load.requests.Load(), load.failed.Load(), load.overload.Load()
	ok := req - failed - overload
	share := 0.0
	if ok > 0 {
		share = 100 * float64(load.http2.Load()) / float64(ok)
	}
	b.ReportMetric(float64(req), "requests")
	b.ReportMetric(float64(failed), "failed")
	b.ReportMetric(float64(overload), "not-sent")
	b.ReportMetric(float64(done), "upgrades")
	b.ReportMetric(share, "http2-%")
	b.ReportMetric(float64(cut), "cut-conns")
	b.Logf("%d requests in %v at %d/s: %d failed, %d not sent (2048 in flight already); %d of %d upgrades; HTTP/2 answers %.2f%% of %d ok; "+
		"old generations: %d GOAWAYs, %d connections cut, longest drain %v",
		req, sent.Round(time.Millisecond), rate, failed, overload, done, upgrades, share, ok,
		goaway, cut, time.Duration(maxDrain).Round(time.Millisecond))
	for _, l := range cutLines {
		b.Logf("cut: %s", l)
	}
	// net/http's own complaints (TLS handshake errors, timeouts), by kind.
	httpErrs, _ := s.logs.Find(0, "", func(l itest.Line) bool { return strings.HasPrefix(l.Msg(), "http: ") })
	kinds := map[string]int{}
	for _, l := range httpErrs {
		m := l.Msg()
		if i := strings.LastIndex(m, ": "); i > 0 {
			m = m[i+2:]
		}
		kinds[m]++
	}
	if len(httpErrs) > 0 {
		b.Logf("%d net/http error lines in the servers' output, by cause: %v", len(httpErrs), kinds)
	}
	b.Logf("HUPs at (seconds of the minute): %s", strings.Join(hups, " "))
	if len(load.errs) > 0 {
		b.Logf("first errors:\n%s", strings.Join(load.errs, "\n"))
	}
}

// (a) HTTP/2 over TLS on 8 connections (one transport each).
func BenchmarkTLSHTTP2UpgradesUnderLoad(b *testing.B) {
	dir := b.TempDir()
	ca := tlsNewCA(b, "handoff bench CA")
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	tlsWriteFiles(b, ca.issue(b, "handoff bench", 1), certFile, keyFile)
	s := tlsStartServe(b, dir, tlsPool(ca), "10s", "--tls-cert", certFile, "--tls-key", keyFile)
	clients := tlsBenchClients(8, func() *http.Transport {
		return &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tlsPool(ca)}, Protocols: tlsProtocols(false, true, false)}
	})
	tlsBenchUnderLoad(b, s, func(seq int64) *http.Client { return clients[seq%int64(len(clients))] })
}

// (b) h2c on 8 connections.
func BenchmarkH2CUpgradesUnderLoad(b *testing.B) {
	s := tlsStartServe(b, b.TempDir(), nil, "10s")
	clients := tlsBenchClients(8, func() *http.Transport {
		return &http.Transport{Protocols: tlsProtocols(false, false, true)}
	})
	tlsBenchUnderLoad(b, s, func(seq int64) *http.Client { return clients[seq%int64(len(clients))] })
}

// (c) HTTP/1.1 over TLS with the harness's pattern (internal/loadgen speaks
// no TLS): 16 pooled keep-alive connections, 30% of requests on a new
// connection each.
func BenchmarkTLSHTTP1UpgradesUnderLoad(b *testing.B) {
	dir := b.TempDir()
	ca := tlsNewCA(b, "handoff bench CA")
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	tlsWriteFiles(b, ca.issue(b, "handoff bench", 1), certFile, keyFile)
	s := tlsStartServe(b, dir, tlsPool(ca), "10s", "--tls-cert", certFile, "--tls-key", keyFile)
	pooled := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tlsPool(ca)}, Protocols: tlsProtocols(true, false, false), MaxIdleConnsPerHost: 16}
	fresh := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tlsPool(ca)}, Protocols: tlsProtocols(true, false, false), DisableKeepAlives: true}
	defer pooled.CloseIdleConnections()
	pc := &http.Client{Transport: pooled, Timeout: 20 * time.Second}
	fc := &http.Client{Transport: fresh, Timeout: 20 * time.Second}
	tlsBenchUnderLoad(b, s, func(seq int64) *http.Client {
		if seq%10 < 3 {
			return fc
		}
		return pc
	})
}

func tlsBenchClients(n int, transport func() *http.Transport) []*http.Client {
	var cs []*http.Client
	for range n {
		cs = append(cs, &http.Client{Transport: transport(), Timeout: 20 * time.Second})
	}
	return cs
}

// (d) Steady-state HTTP/2 throughput over TLS of package server against a
// bare http.Server with the same handler, in process: 64 client goroutines on
// 8 connections, 3 s each, alternated 3 times (A B, B A, A B).
func BenchmarkTLSHTTP2ServerOverhead(b *testing.B) {
	ca := tlsNewCA(b, "handoff bench CA")
	leaf := ca.issue(b, "handoff bench", 1)
	cert, err := tls.X509KeyPair(leaf.certPEM, leaf.keyPEM)
	if err != nil {
		b.Fatal(err)
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", "1")
		io.WriteString(w, "Hello World !!!")
	})
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		return ln
	}
	// package server
	ours := &server.Server{HTTP: &http.Server{Handler: handler, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}}
	lnA := listen()
	go ours.ServeTLS(lnA, "", "")
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		ours.Drain(ctx)
	}()
	// bare net/http
	bare := &http.Server{Handler: handler, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}}
	lnB := listen()
	go bare.ServeTLS(lnB, "", "")
	defer bare.Close()

	clients := tlsBenchClients(8, func() *http.Transport {
		return &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tlsPool(ca)}, Protocols: tlsProtocols(false, true, false)}
	})
	measure := func(addr string, d time.Duration) (float64, int64) {
		var n, failed atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for g := range 64 {
			c := clients[g%len(clients)]
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					resp, err := c.Get("https://" + addr + "/")
					if err != nil {
						failed.Add(1)
						continue
					}
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err != nil || resp.StatusCode != 200 || resp.ProtoMajor != 2 {
						failed.Add(1)
						continue
					}
					n.Add(1)
				}
			})
		}
		start := time.Now()
		<-time.After(d) // the measurement window
		close(stop)
		wg.Wait()
		return float64(n.Load()) / time.Since(start).Seconds(), failed.Load()
	}
	// Warm both (connections, handshakes).
	measure(lnA.Addr().String(), 300*time.Millisecond)
	measure(lnB.Addr().String(), 300*time.Millisecond)
	b.ResetTimer()
	var sumA, sumB float64
	var rounds []string
	var failed int64
	for i := range 3 {
		// The order alternates too, so that a drift of the machine's load
		// weighs on both alike.
		var a, bb float64
		var fa, fb int64
		if i%2 == 0 {
			a, fa = measure(lnA.Addr().String(), 3*time.Second)
			bb, fb = measure(lnB.Addr().String(), 3*time.Second)
		} else {
			bb, fb = measure(lnB.Addr().String(), 3*time.Second)
			a, fa = measure(lnA.Addr().String(), 3*time.Second)
		}
		sumA, sumB, failed = sumA+a, sumB+bb, failed+fa+fb
		rounds = append(rounds, fmt.Sprintf("round %d: server %.0f req/s, bare %.0f req/s (%.3f)", i+1, a, bb, a/bb))
	}
	b.StopTimer()
	b.ReportMetric(sumA/3, "server-req/s")
	b.ReportMetric(sumB/3, "bare-req/s")
	b.ReportMetric(sumA/sumB, "ratio")
	b.Logf("HTTP/2 over TLS, 64 goroutines on 8 connections: package server / bare http.Server = %.3f (target >= 0.97); %d failed\n%s",
		sumA/sumB, failed, strings.Join(rounds, "\n"))
}
