package loadgen

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// testServer is an httptest server that stamps Handoff-Pid/Handoff-Version
// and counts the connections it accepted.
type testServer struct {
	*httptest.Server
	conns atomic.Int64
}

func newServer(t *testing.T, h http.HandlerFunc) *testServer {
	t.Helper()
	ts := &testServer{}
	ts.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", "4242")
		w.Header().Set("Handoff-Version", "v1")
		h(w, r)
	}))
	ts.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			ts.conns.Add(1)
		}
	}
	ts.Start()
	t.Cleanup(ts.Close)
	return ts
}

func (ts *testServer) addr() string { return ts.Listener.Addr().String() }

// rawServer accepts on 127.0.0.1 and runs handle for each connection in its
// own goroutine. It returns the address and the number of accepted conns.
func rawServer(t *testing.T, handle func(net.Conn)) (string, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var accepted atomic.Int64
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			wg.Go(func() {
				defer c.Close()
				handle(c)
			})
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return ln.Addr().String(), &accepted
}

// readRequest reads one request (headers only: the client sends GETs).
func readRequest(c net.Conn) error {
	_, err := http.ReadRequest(bufio.NewReader(c))
	return err
}

func run(t *testing.T, cfg Config) *Result {
	t.Helper()
	res, err := Run(context.Background(), cfg)
	require.NoError(t, err)
	require.Equal(t, res.Requests, res.OK+res.Failed, "requests = ok + failed")
	return res
}

func TestAllOK(t *testing.T) {
	ts := newServer(t, func(http.ResponseWriter, *http.Request) {})
	res := run(t, Config{Addr: ts.addr(), Rate: 200, Duration: 300 * time.Millisecond, Samples: true})

	assert.EqualValues(t, 60, res.Requests) // at 0, 5ms, ..., 295ms
	assert.EqualValues(t, 60, res.OK)
	assert.Empty(t, res.Failures)
	assert.Empty(t, res.Errors)
	require.Len(t, res.PIDs, 1)
	p := res.PIDs[0]
	assert.Equal(t, PIDStat{PID: 4242, Version: "v1", Count: 60, First: p.First, Last: p.Last}, p)
	assert.Positive(t, p.First)
	assert.LessOrEqual(t, p.First, p.Last)
	l := res.Latency
	assert.Positive(t, l.P50)
	assert.True(t, l.P50 <= l.P90 && l.P90 <= l.P99 && l.P99 <= l.Max, "latency %+v", l)
	require.Len(t, res.Samples, 60)
	for i, s := range res.Samples {
		require.True(t, s.OK && s.PID == 4242 && s.Start > 0, "sample %d = %+v", i, s)
		if i > 0 {
			require.GreaterOrEqual(t, s.Start, res.Samples[i-1].Start, "samples sorted by start")
		}
	}
	assert.GreaterOrEqual(t, res.Elapsed, 290*time.Millisecond)
	assert.LessOrEqual(t, ts.conns.Load(), int64(16), "keep-alive connections")
}

func TestJSONKeys(t *testing.T) {
	b, err := json.Marshal(&Result{PIDs: []PIDStat{{}}, Samples: []Sample{{}}})
	require.NoError(t, err)
	for _, k := range []string{`"requests":0`, `"ok":0`, `"failed":0`, `"failures":`, `"errors":`,
		`"latency_ms":{"p50":0,"p90":0,"p99":0,"max":0}`,
		`"pids":[{"pid":0,"version":"","count":0,"first_ns":0,"last_ns":0}]`,
		`"samples":[{"start_ns":0,"latency_us":0,"pid":0,"ok":false}]`, `"elapsed_ns":0`} {
		assert.Contains(t, string(b), k)
	}
	b, err = json.Marshal(&Result{})
	require.NoError(t, err)
	assert.NotContains(t, string(b), "samples")
}

func TestNewConnections(t *testing.T) {
	for _, tc := range []struct {
		name         string
		serverClose  bool
		newConnFrac  float64
		wantConns    int64 // 0: some, but fewer than the requests
		wantReqClose int64 // requests that carried Connection: close
	}{
		{name: "server says close", serverClose: true, wantConns: 20},
		{name: "new-conn fraction 1", newConnFrac: 1, wantConns: 20, wantReqClose: 20},
		{name: "new-conn fraction 0.5", newConnFrac: 0.5, wantReqClose: 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var reqClose atomic.Int64
			ts := newServer(t, func(w http.ResponseWriter, r *http.Request) {
				if r.Close {
					reqClose.Add(1)
				}
				if tc.serverClose {
					w.Header().Set("Connection", "close")
				}
			})
			res := run(t, Config{Addr: ts.addr(), Rate: 100, Duration: 200 * time.Millisecond, NewConnFraction: tc.newConnFrac})
			assert.EqualValues(t, 20, res.OK)
			assert.Equal(t, tc.wantReqClose, reqClose.Load(), "requests with Connection: close")
			if tc.wantConns > 0 {
				assert.Equal(t, tc.wantConns, ts.conns.Load(), "accepted conns")
			} else {
				assert.Greater(t, ts.conns.Load(), tc.wantReqClose, "accepted conns")
				assert.Less(t, ts.conns.Load(), int64(20), "accepted conns")
			}
		})
	}
}

// A server that closes an idle keep-alive connection without saying so must
// not cause failures: the pre-reuse check drops the closed connection.
func TestIdleCloseBeforeReuse(t *testing.T) {
	addr, accepted := rawServer(t, func(c net.Conn) {
		if readRequest(c) == nil {
			fmt.Fprint(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nHandoff-Pid: 7\r\n\r\nok")
		}
	})
	res := run(t, Config{Addr: addr, Rate: 20, Duration: 300 * time.Millisecond})
	assert.EqualValues(t, 6, res.Requests)
	assert.EqualValues(t, 6, res.OK)
	assert.EqualValues(t, 6, accepted.Load(), "accepted conns")
	require.Len(t, res.PIDs, 1)
	assert.Equal(t, 7, res.PIDs[0].PID)
}

// A request that the server read but did not answer is a failure and is never
// sent again.
func TestNoRetry(t *testing.T) {
	var received atomic.Int64
	addr, accepted := rawServer(t, func(c net.Conn) {
		if readRequest(c) == nil {
			received.Add(1)
		}
	})
	res := run(t, Config{Addr: addr, Rate: 50, Duration: 200 * time.Millisecond})
	assert.EqualValues(t, 10, res.Requests)
	assert.Equal(t, map[string]int64{"read": 10}, res.Failures)
	assert.EqualValues(t, 10, received.Load(), "requests received by the server")
	assert.EqualValues(t, 10, accepted.Load(), "accepted conns")
	assert.Empty(t, res.PIDs)
	require.Len(t, res.Errors, 10)
	assert.Contains(t, res.Errors[0], " read: GET /: ")
	_, err := time.Parse(time.RFC3339Nano, strings.Fields(res.Errors[0])[0])
	assert.NoError(t, err, "error starts with its time")
}

func TestFailureKinds(t *testing.T) {
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedAddr := closed.Addr().String()
	require.NoError(t, closed.Close())

	status := newServer(t, func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusInternalServerError) })
	stuck := newServer(t, func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() }) // until the client gives up
	for _, tc := range []struct {
		kind    string
		cfg     Config
		wantPID bool
	}{
		{kind: "status", cfg: Config{Addr: status.addr()}, wantPID: true},
		{kind: "dial", cfg: Config{Addr: closedAddr}},
		{kind: "timeout", cfg: Config{Addr: stuck.addr(), Timeout: 100 * time.Millisecond}},
	} {
		t.Run(tc.kind, func(t *testing.T) {
			tc.cfg.Rate, tc.cfg.Duration = 50, 100*time.Millisecond
			res := run(t, tc.cfg)
			assert.EqualValues(t, 5, res.Requests)
			assert.Equal(t, map[string]int64{tc.kind: 5}, res.Failures)
			assert.Zero(t, res.Latency, "latency without OK requests")
			if tc.wantPID {
				require.Len(t, res.PIDs, 1)
				assert.EqualValues(t, 5, res.PIDs[0].Count)
			}
			assert.Contains(t, res.Summary(), "failures: "+tc.kind+"=5")
		})
	}
}

func TestOverload(t *testing.T) {
	ts := newServer(t, func(_ http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	// Request 0 holds the only slot until its 300ms timeout; the requests at
	// 10ms..90ms find none.
	res := run(t, Config{Addr: ts.addr(), Rate: 100, Duration: 100 * time.Millisecond,
		Timeout: 300 * time.Millisecond, MaxInFlight: 1})
	assert.EqualValues(t, 10, res.Requests)
	assert.Equal(t, map[string]int64{"overload": 9, "timeout": 1}, res.Failures)
}

func TestSlowFraction(t *testing.T) {
	var mu sync.Mutex
	paths := map[string]int{}
	ts := newServer(t, func(_ http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		paths[r.URL.RequestURI()]++
	})
	res := run(t, Config{Addr: ts.addr(), Rate: 100, Duration: 200 * time.Millisecond,
		SlowFraction: 0.5, Slow: 5 * time.Millisecond, Path: "/hello/x"})
	assert.EqualValues(t, 20, res.OK)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, map[string]int{"/hello/x": 10, "/slow?ms=5": 10}, paths)
}

func TestUnixSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "loadgen") // short: socket paths are limited to ~100 bytes
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "s.sock")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)
	var mu sync.Mutex
	hosts := map[string]int{}
	srv := &http.Server{Handler: http.HandlerFunc(func(_ http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		hosts[r.Host]++
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })

	res := run(t, Config{Network: "unix", Addr: sock, Rate: 100, Duration: 100 * time.Millisecond})
	assert.EqualValues(t, 10, res.OK)
	assert.Equal(t, []PIDStat{{PID: 0, Count: 10, First: res.PIDs[0].First, Last: res.PIDs[0].Last}}, res.PIDs,
		"responses without Handoff-Pid count as pid 0")
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, map[string]int{"localhost": 10}, hosts)
}

func TestCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	var n atomic.Int64
	ts := newServer(t, func(http.ResponseWriter, *http.Request) {
		if n.Add(1) == 5 {
			cancel()
		}
	})
	start := time.Now()
	res, err := Run(ctx, Config{Addr: ts.addr(), Rate: 100, Duration: 10 * time.Second})
	require.NoError(t, err)
	assert.Less(t, time.Since(start), 2*time.Second)
	assert.GreaterOrEqual(t, res.Requests, int64(5))
	assert.LessOrEqual(t, res.Requests, int64(20))
	assert.Zero(t, res.Failed)
}

func TestBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"empty addr", Config{}, "loadgen: empty address"},
		{"network", Config{Addr: "x", Network: "udp"}, "loadgen: unsupported network"},
		{"negative rate", Config{Addr: "x", Rate: -1}, "loadgen: negative rate"},
		{"negative duration", Config{Addr: "x", Duration: -1}, "loadgen: negative duration"},
		{"negative conns", Config{Addr: "x", Conns: -1}, "loadgen: negative conns"},
		{"negative slow", Config{Addr: "x", Slow: -1}, "loadgen: negative slow"},
		{"negative timeout", Config{Addr: "x", Timeout: -1}, "loadgen: negative timeout"},
		{"negative in-flight", Config{Addr: "x", MaxInFlight: -1}, "loadgen: negative max in-flight"},
		{"new-conn fraction", Config{Addr: "x", NewConnFraction: 1.5}, "loadgen: new-conn fraction"},
		{"slow fraction", Config{Addr: "x", SlowFraction: -0.1}, "loadgen: slow fraction"},
		{"path", Config{Addr: "x", Path: "nope"}, "loadgen: invalid path"},
		{"path injection", Config{Addr: "x", Path: "/a\r\nX: y"}, "loadgen: invalid path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := Run(context.Background(), tc.cfg)
			require.Error(t, err)
			assert.Nil(t, res)
			assert.True(t, strings.HasPrefix(err.Error(), tc.want), "error %q, want prefix %q", err, tc.want)
		})
	}
}

func TestDefaults(t *testing.T) {
	c, err := Config{Addr: "x"}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, Config{Network: "tcp", Addr: "x", Rate: 1000, Duration: 10 * time.Second, Conns: 16,
		Slow: 800 * time.Millisecond, Path: "/", Timeout: 10*time.Second + 800*time.Millisecond, MaxInFlight: 2048}, c)
}

func TestPick(t *testing.T) {
	for _, f := range []float64{0, 0.1, 0.25, 0.5, 1} {
		var slow, fresh, both int
		for i := range int64(1000) {
			s, n := pick(i, f, 0), pick(i, f, 0.5)
			slow, fresh, both = slow+b2i(s), fresh+b2i(n), both+b2i(s && n)
		}
		assert.Equal(t, int(f*1000), slow, "slow at f=%v", f)
		assert.Equal(t, int(f*1000), fresh, "fresh at f=%v", f)
		if f <= 0.5 {
			assert.Zero(t, both, "slow and fresh overlap at f=%v", f)
		}
	}
}

func TestSummary(t *testing.T) {
	r := &Result{Requests: 3, OK: 2, Failed: 1, Failures: map[string]int64{"read": 1},
		Errors: []string{"t read: GET /: EOF"}, Latency: Percentiles{P50: 1, P90: 2, P99: 3, Max: 4},
		PIDs: []PIDStat{{PID: 10, Version: "v1", Count: 1}, {PID: 11, Version: "v2", Count: 2}}, Elapsed: time.Second}
	s := r.Summary()
	for _, want := range []string{"requests 3, ok 2, failed 1", "failures: read=1", "p50 1.000", "max 4.000",
		`pid 10 (version "v1"): 1 responses`, `pid 11 (version "v2"): 2 responses`, "error: t read: GET /: EOF"} {
		assert.Contains(t, s, want)
	}
}
