package server

// BenchmarkServeSteady measures what package server costs in steady state:
// its Server against a bare http.Server with the same handler and the same
// timeouts, in one run, with the same client, over HTTP/1.1 keep-alive:
//
//	go test -run '^$' -bench BenchmarkServeSteady -benchtime 5s -count 3 ./server
//	go test -run '^$' -bench BenchmarkServeSteady -benchtime 5s -cpuprofile cpu.out ./server
//
// One op is one request to each server. The requests go in rounds, a round to
// one server then a round to the other, the order swapped every round, so
// that both see the same machine. The client is steadyClients goroutines,
// each with one persistent connection to each server, writing a request and
// reading its answer by hand (no pipelining, no net/http Transport).
//
// It reports, for each: requests per second (wall clock), the p50 and p99
// latency, and the CPU time of the whole process (client included, the same
// for both) per request; and "ratio", the median over the rounds of server's
// rate over bare's in the round next to it, "ratio-total" (total rates), and
// "cpu-ratio" (bare's CPU per request over server's). On a busy machine the
// wall-clock figures move with the other processes; the CPU ones much less.
//
// The goroutines carry pprof labels, so that a CPU profile splits by side:
//
//	go tool pprof -tagfocus srv=server -top cpu.out   # package server's Server
//	go tool pprof -tagfocus srv=bare -top cpu.out     # the bare http.Server
//	go tool pprof -tagfocus srv=client -top cpu.out   # the client

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime/pprof"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const (
	steadyClients = 16   // concurrent keep-alive connections per server
	steadyRound   = 4096 // requests per round and server
)

func BenchmarkServeSteady(b *testing.B) {
	hello := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "Hello World")
	})

	oursAddr, oursStop := steadyServe(b, "server", func(ln net.Listener) (func() error, func()) {
		s := &Server{Handler: hello}
		return func() error { return s.Serve(ln) }, func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s.Drain(ctx)
		}
	})
	bareAddr, bareStop := steadyServe(b, "bare", func(ln net.Listener) (func() error, func()) {
		// The timeouts package server gives a zero-value Server.
		s := &http.Server{Handler: hello, ReadHeaderTimeout: DefaultReadHeaderTimeout, IdleTimeout: DefaultIdleTimeout}
		return func() error { return s.Serve(ln) }, func() { s.Close() }
	})

	targets := []*steadyTarget{
		{name: "server", conns: steadyDial(b, oursAddr)},
		{name: "bare", conns: steadyDial(b, bareAddr)},
	}
	for _, t := range targets {
		t.lat = make([]time.Duration, 0, b.N)
	}
	var pairs []float64 // server's rate over bare's, round by round
	b.ResetTimer()
	pprof.Do(context.Background(), pprof.Labels("srv", "client"), func(context.Context) {
		for done, round := 0, 0; done < b.N; round++ {
			n := min(steadyRound, b.N-done)
			order := targets
			if round%2 == 1 {
				order = []*steadyTarget{targets[1], targets[0]}
			}
			rates := map[string]float64{}
			for _, t := range order {
				r, err := t.round(n)
				if err != nil {
					b.Fatalf("%s: %v", t.name, err)
				}
				rates[t.name] = r
			}
			pairs = append(pairs, rates["server"]/rates["bare"])
			done += n
		}
	})
	b.StopTimer()
	for _, t := range targets {
		for _, c := range t.conns {
			c.c.Close()
		}
	}
	oursStop()
	bareStop()

	rate, cpu := map[string]float64{}, map[string]float64{}
	for _, t := range targets {
		rate[t.name] = float64(len(t.lat)) / t.busy.Seconds()
		cpu[t.name] = float64(t.cpu.Nanoseconds()) / 1e3 / float64(len(t.lat))
		slices.Sort(t.lat)
		b.ReportMetric(rate[t.name], t.name+"-req/s")
		b.ReportMetric(cpu[t.name], t.name+"-cpu-us/req")
		b.ReportMetric(float64(steadyPct(t.lat, 50).Nanoseconds())/1e3, t.name+"-p50-us")
		b.ReportMetric(float64(steadyPct(t.lat, 99).Nanoseconds())/1e3, t.name+"-p99-us")
	}
	slices.Sort(pairs)
	b.ReportMetric(pairs[len(pairs)/2], "ratio")
	b.ReportMetric(rate["server"]/rate["bare"], "ratio-total")
	b.ReportMetric(cpu["bare"]/cpu["server"], "cpu-ratio")
}

// steadyCPU is the CPU time of this process so far.
func steadyCPU() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// steadyServe listens on loopback and serves with what mk returns (serve,
// and stop, which must make serve return), its goroutines labelled srv=name;
// the returned stop stops and waits.
func steadyServe(b *testing.B, name string, mk func(net.Listener) (serve func() error, stop func())) (string, func()) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	serve, stop := mk(ln)
	done := make(chan error, 1)
	pprof.Do(context.Background(), pprof.Labels("srv", name), func(context.Context) {
		go func() { done <- serve() }()
	})
	var once sync.Once
	wait := func() {
		once.Do(func() {
			stop()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				b.Error("server did not stop")
			}
		})
	}
	b.Cleanup(wait)
	return ln.Addr().String(), wait
}

// steadyTarget is one server as the client sees it.
type steadyTarget struct {
	name  string
	conns []*steadyConn
	busy  time.Duration   // time spent in its rounds
	cpu   time.Duration   // the process's CPU time in its rounds
	lat   []time.Duration // every request's latency
}

// round sends n requests spread over the connections, waits for them and
// returns the rate.
func (t *steadyTarget) round(n int) (float64, error) {
	per := make([][]time.Duration, len(t.conns))
	errs := make([]error, len(t.conns))
	var wg sync.WaitGroup
	cpu0, start := steadyCPU(), time.Now()
	for i, c := range t.conns {
		k := n / len(t.conns)
		if i < n%len(t.conns) {
			k++
		}
		wg.Go(func() {
			lat := make([]time.Duration, 0, k)
			for range k {
				t0 := time.Now()
				if err := c.get(); err != nil {
					errs[i] = err
					return
				}
				lat = append(lat, time.Since(t0))
			}
			per[i] = lat
		})
	}
	wg.Wait()
	took := time.Since(start)
	t.busy += took
	t.cpu += steadyCPU() - cpu0
	for _, l := range per {
		t.lat = append(t.lat, l...)
	}
	return float64(n) / took.Seconds(), errors.Join(errs...)
}

// steadyConn is a persistent HTTP/1.1 connection.
type steadyConn struct {
	c  net.Conn
	br *bufio.Reader
}

var steadyReq = []byte("GET / HTTP/1.1\r\nHost: bench\r\n\r\n")

func steadyDial(b *testing.B, addr string) []*steadyConn {
	cs := make([]*steadyConn, steadyClients)
	for i := range cs {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		cs[i] = &steadyConn{c: c, br: bufio.NewReader(c)}
	}
	return cs
}

// get sends GET / and reads the answer: a status line, headers, and a body
// of Content-Length bytes.
func (c *steadyConn) get() error {
	if _, err := c.c.Write(steadyReq); err != nil {
		return err
	}
	line, err := c.br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
		return fmt.Errorf("answer %q", line)
	}
	length := -1
	for {
		line, err = c.br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) <= 2 {
			break
		}
		if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
			length, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if length < 0 {
		return errors.New("answer without Content-Length")
	}
	_, err = c.br.Discard(length)
	return err
}

// steadyPct is the nearest-rank p-th percentile of sorted xs.
func steadyPct(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	i := int(p/100*float64(len(xs))+0.5) - 1
	return xs[max(0, min(i, len(xs)-1))]
}
