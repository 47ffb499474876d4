// Package loadgen is handoff's HTTP/1.1 load generator. It sends requests at a
// constant rate and counts every one that fails. Its job is to prove that an
// upgrade loses nothing.
//
// It does not use net/http's Transport. When a request fails on a reused
// connection, the Transport may send it again on a fresh one, which would hide
// exactly the failures this tool must find. Instead, loadgen writes each
// request on a net.Conn itself and sends it once. It only runs checks before
// the first byte of a request is written (see conn.alive).
//
// A request is OK when a complete 2xx response, body included, arrives within
// Config.Timeout. Anything else is a failure of one kind:
//
//	dial      the connection could not be made
//	write     writing the request failed
//	read      EOF, reset or a malformed response before the response was complete
//	status    a complete response whose status is not 2xx
//	timeout   Config.Timeout passed before the response was complete
//	overload  Config.MaxInFlight requests were already in flight, so the request was not sent
package loadgen

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Config describes one run. Zero values take the defaults that are documented
// on each field. Negative values are rejected.
type Config struct {
	Network         string        // "tcp" (default) or "unix"
	Addr            string        // host:port, or the socket path for unix
	Rate            int           // requests per second, open loop (constant rate schedule); default 1000
	Duration        time.Duration // how long to send; default 10s; ctx cancellation stops earlier
	Conns           int           // max pooled keep-alive connections; default 16
	NewConnFraction float64       // share of requests sent on a fresh connection (with Connection: close); default 0
	SlowFraction    float64       // share of requests sent to /slow?ms=<Slow>; default 0
	Slow            time.Duration // default 800ms
	Path            string        // path for normal requests; default "/"
	Timeout         time.Duration // per request; default 10s + Slow
	MaxInFlight     int           // default 2048; a request that finds no slot counts as failure kind "overload"
	Samples         bool          // keep one Sample per request in the Result
}

// Result is the outcome of a run.
type Result struct {
	Requests int64            `json:"requests"`
	OK       int64            `json:"ok"`
	Failed   int64            `json:"failed"`
	Failures map[string]int64 `json:"failures"`   // kind -> count: dial, write, read, status, timeout, overload
	Errors   []string         `json:"errors"`     // first 20 failure messages, with time and kind
	Latency  Percentiles      `json:"latency_ms"` // of OK requests
	PIDs     []PIDStat        `json:"pids"`       // one per Handoff-Pid seen, in order of first response
	Samples  []Sample         `json:"samples,omitempty"`
	Elapsed  time.Duration    `json:"elapsed_ns"`
}

// Percentiles of request latency, in milliseconds.
type Percentiles struct {
	P50 float64 `json:"p50"`
	P90 float64 `json:"p90"`
	P99 float64 `json:"p99"`
	Max float64 `json:"max"`
}

// PIDStat counts the complete responses (any status) that carried one
// Handoff-Pid. PID 0 stands for responses without that header.
type PIDStat struct {
	PID     int    `json:"pid"`
	Version string `json:"version"`  // Handoff-Version of the first response
	Count   int64  `json:"count"`    // complete responses, any status
	First   int64  `json:"first_ns"` // unix ns when the first response completed
	Last    int64  `json:"last_ns"`  // unix ns when the last response completed
}

// Sample describes one request.
type Sample struct {
	Start     int64  `json:"start_ns"`   // unix ns
	LatencyUS int64  `json:"latency_us"` // until the response completed or the request failed
	PID       int    `json:"pid"`        // 0 when no response came or it had no Handoff-Pid
	OK        bool   `json:"ok"`
	Fresh     bool   `json:"fresh,omitempty"` // sent on a connection of its own (NewConnFraction)
	Conn      uint32 `json:"conn,omitempty"`  // the connection it went on (numbered from 1 as dialed); 0 if none
}

const maxErrors = 20

// Run sends requests as cfg describes until cfg.Duration has passed or ctx is
// cancelled. It then waits for the requests still in flight (each is bounded
// by cfg.Timeout) and closes its connections. It returns an error only when
// cfg is invalid. Failed requests are counted in the Result.
func Run(ctx context.Context, cfg Config) (*Result, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	r := newRunner(cfg)
	start := time.Now()
	var wg sync.WaitGroup
	sem := make(chan struct{}, cfg.MaxInFlight)
	r.schedule(ctx, start, func(i int64) {
		select {
		case sem <- struct{}{}:
			wg.Go(func() {
				defer func() { <-sem }()
				r.record(r.exchange(i))
			})
		default:
			now := time.Now()
			r.record(outcome{start: now, end: now, kind: "overload",
				err: fmt.Errorf("%d requests already in flight", cfg.MaxInFlight)})
		}
	})
	wg.Wait()
	r.pool.closeAll()
	return r.result(time.Since(start)), nil
}

func (c Config) withDefaults() (Config, error) {
	switch c.Network {
	case "":
		c.Network = "tcp"
	case "tcp", "tcp4", "tcp6", "unix":
	default:
		return c, fmt.Errorf("loadgen: unsupported network %q", c.Network)
	}
	if c.Addr == "" {
		return c, errors.New("loadgen: empty address")
	}
	for _, v := range []struct {
		name string
		n    int64
	}{{"rate", int64(c.Rate)}, {"duration", int64(c.Duration)}, {"conns", int64(c.Conns)},
		{"slow", int64(c.Slow)}, {"timeout", int64(c.Timeout)}, {"max in-flight", int64(c.MaxInFlight)}} {
		if v.n < 0 {
			return c, fmt.Errorf("loadgen: negative %s %d", v.name, v.n)
		}
	}
	for name, f := range map[string]float64{"new-conn": c.NewConnFraction, "slow": c.SlowFraction} {
		if !(f >= 0 && f <= 1) { // also rejects NaN
			return c, fmt.Errorf("loadgen: %s fraction %v outside [0,1]", name, f)
		}
	}
	if c.Path == "" {
		c.Path = "/"
	}
	if !strings.HasPrefix(c.Path, "/") || strings.ContainsFunc(c.Path, func(r rune) bool { return r <= ' ' || r == 0x7f }) {
		return c, fmt.Errorf("loadgen: invalid path %q", c.Path)
	}
	c.Rate = cmp.Or(c.Rate, 1000)
	c.Duration = cmp.Or(c.Duration, 10*time.Second)
	c.Conns = cmp.Or(c.Conns, 16)
	c.Slow = cmp.Or(c.Slow, 800*time.Millisecond)
	c.Timeout = cmp.Or(c.Timeout, 10*time.Second+c.Slow)
	c.MaxInFlight = cmp.Or(c.MaxInFlight, 2048)
	return c, nil
}

// schedule calls send(i) for request i at start + i/Rate, open loop: it never
// waits for responses. A coarse 1ms ticker wakes it up, and each tick sends
// every request that is due by then, which keeps CPU use low at high rates.
// It returns when the last request of the run has been sent or ctx is done.
func (r *runner) schedule(ctx context.Context, start time.Time, send func(i int64)) {
	rate := int64(r.cfg.Rate)
	// upTo returns how many requests i have i/rate <= d (or < d when strict).
	upTo := func(d time.Duration, strict bool) int64 {
		whole, frac := int64(d/time.Second)*rate, int64(d%time.Second)*rate
		if strict {
			return whole + (frac+int64(time.Second)-1)/int64(time.Second)
		}
		return whole + frac/int64(time.Second) + 1
	}
	total := upTo(r.cfg.Duration, true)
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for sent := int64(0); sent < total; {
		if ctx.Err() != nil {
			return
		}
		for due := min(total, upTo(time.Since(start), false)); sent < due; sent++ {
			send(sent)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// pick spreads a share f of requests evenly and reproducibly over the request
// indexes: request i is picked when floor((i+1)f+phase) > floor(i*f+phase).
// Different phases keep the slow and new-connection requests apart.
func pick(i int64, f, phase float64) bool {
	return math.Floor(float64(i+1)*f+phase) > math.Floor(float64(i)*f+phase)
}

// outcome is what happened to one request. kind is "" when it was OK.
type outcome struct {
	start, end time.Time
	kind       string
	err        error
	responded  bool // a complete response arrived (OK or kind "status")
	pid        int
	version    string
	conn       uint32
	fresh      bool
}

type runner struct {
	cfg    Config
	pool   pool
	reqs   [2][2][]byte // [slow][fresh] request bytes
	dialed atomic.Uint32

	mu      sync.Mutex
	res     Result
	lat     []time.Duration
	pids    map[int]*PIDStat
	samples []Sample
}

func newRunner(cfg Config) *runner {
	r := &runner{cfg: cfg, pool: pool{max: cfg.Conns}, pids: map[int]*PIDStat{}}
	r.res.Failures = map[string]int64{}
	r.res.Errors = []string{}
	host := cfg.Addr
	if cfg.Network == "unix" {
		host = "localhost"
	}
	for s, path := range []string{cfg.Path, fmt.Sprintf("/slow?ms=%d", cfg.Slow.Milliseconds())} {
		for f, extra := range []string{"", "Connection: close\r\n"} {
			r.reqs[s][f] = fmt.Appendf(nil, "GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: handoff-loadgen\r\n%s\r\n", path, host, extra)
		}
	}
	return r
}

func (r *runner) record(o outcome) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.res.Requests++
	if o.kind == "" {
		r.res.OK++
		r.lat = append(r.lat, o.end.Sub(o.start))
	} else {
		r.res.Failed++
		r.res.Failures[o.kind]++
		if len(r.res.Errors) < maxErrors {
			r.res.Errors = append(r.res.Errors, fmt.Sprintf("%s %s: %v", o.end.Format(time.RFC3339Nano), o.kind, o.err))
		}
	}
	if o.responded {
		st := r.pids[o.pid]
		if st == nil {
			st = &PIDStat{PID: o.pid, Version: o.version, First: o.end.UnixNano()}
			r.pids[o.pid] = st
		}
		st.Count++
		st.First = min(st.First, o.end.UnixNano())
		st.Last = max(st.Last, o.end.UnixNano())
	}
	if r.cfg.Samples {
		r.samples = append(r.samples, Sample{Start: o.start.UnixNano(),
			LatencyUS: o.end.Sub(o.start).Microseconds(), PID: o.pid, OK: o.kind == "",
			Conn: o.conn, Fresh: o.fresh})
	}
}

func (r *runner) result(elapsed time.Duration) *Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	res := r.res
	res.Elapsed = elapsed
	slices.Sort(r.lat)
	at := func(p float64) float64 {
		if len(r.lat) == 0 {
			return 0
		}
		i := max(int(math.Ceil(p*float64(len(r.lat))))-1, 0) // nearest rank
		return float64(r.lat[i]) / float64(time.Millisecond)
	}
	res.Latency = Percentiles{P50: at(0.50), P90: at(0.90), P99: at(0.99), Max: at(1)}
	res.PIDs = []PIDStat{}
	for _, st := range r.pids {
		res.PIDs = append(res.PIDs, *st)
	}
	sort.Slice(res.PIDs, func(i, j int) bool { return res.PIDs[i].First < res.PIDs[j].First })
	if r.cfg.Samples {
		res.Samples = slices.Clone(r.samples)
		sort.SliceStable(res.Samples, func(i, j int) bool { return res.Samples[i].Start < res.Samples[j].Start })
	}
	return &res
}

// Summary returns a short human-readable report of the result.
func (r *Result) Summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "requests %d, ok %d, failed %d in %s\n", r.Requests, r.OK, r.Failed, r.Elapsed.Round(time.Millisecond))
	if len(r.Failures) > 0 {
		kinds := make([]string, 0, len(r.Failures))
		for k, n := range r.Failures {
			kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
		}
		sort.Strings(kinds)
		fmt.Fprintf(&b, "failures: %s\n", strings.Join(kinds, " "))
	}
	l := r.Latency
	fmt.Fprintf(&b, "latency ms: p50 %.3f, p90 %.3f, p99 %.3f, max %.3f\n", l.P50, l.P90, l.P99, l.Max)
	for _, p := range r.PIDs {
		fmt.Fprintf(&b, "pid %d (version %q): %d responses\n", p.PID, p.Version, p.Count)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(&b, "error: %s\n", e)
	}
	return b.String()
}
