package main_test

// Integration tests of the move of idle keep-alive connections at a handoff
// (server.DrainTo, upgrader's Mover and Moved): the old generation passes
// every connection that waits for a request, with nothing of it read, to the
// new one over SCM_RIGHTS, and clients that never check a connection before
// reusing it see nothing. Each test drives the real binary through the
// harness of internal/itest (see helpers_test.go); the log assertions on the
// server run once its output reached EOF (every generation exited).
//
// TLS connections cannot move (their keys live in the old process), but
// handoff serve has no TLS yet: nothing to test here until it has.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
)

// 1. A client that never checks its idle connections (Python's http.client)
// across 5 upgrades: no request fails, and every connection is answered by
// several generations on the same TCP connection.
func TestMigrateNonPollingClient(t *testing.T) {
	const conns, upgrades = 50, 5
	s := itest.StartServer(t, itest.ServerOpts{})
	gens := []int{s.LivePID()}
	c := startPyClient(t, s.Addr, conns)
	c.waitAllAnsweredBy(t, 0, gens[0], 15*time.Second)
	for i := 1; i <= upgrades; i++ {
		mark := c.p.Logs.Mark()
		p := s.GoodUpgrade(t, itest.NextVersion(s.Version), i+1, "--wait")
		gens = append(gens, p)
		// Every connection asks the new generation before the next upgrade.
		c.waitAllAnsweredBy(t, mark, p, 15*time.Second)
	}
	sum := c.stop(t)
	stopServerToEOF(t, s)

	t.Logf("client: %d requests, %d ok, %d failed %v, %d answers with Connection: close (then a new connection)",
		sum.Requests, sum.OK, sum.Failed, sum.Failures, sum.Reconnects)
	if sum.Failed != 0 || sum.OK != sum.Requests {
		t.Errorf("%d of %d requests failed (%v):\n%s", sum.Requests-sum.OK, sum.Requests, sum.Failures, c.failures())
	}
	// A connection that raced a move got Connection: close and went on on a
	// new port (a new segment); it is still counted when one of its ports
	// was answered by two generations.
	multi := 0
	for _, cn := range sum.Conns {
		if slices.ContainsFunc(cn.Segments, func(g pySegment) bool { return len(g.PIDs) >= 2 }) {
			multi++
		} else {
			t.Errorf("connection %d: no client port answered by two generations: %s", cn.Conn, itest.JSON(cn.Segments))
		}
	}
	if multi != conns {
		t.Errorf("%d of %d connections answered by >= 2 generations on the same port", multi, conns)
	}
	checkMoves(t, s, gens, func(handoff int, moved int64) error {
		// The clients' connections, and perhaps an idle one of the harness's
		// own health checks.
		if moved <= 0 || moved > conns+3 {
			return fmt.Errorf("moved=%d, want 1..%d", moved, conns+3)
		}
		return nil
	})
}

// 2. Requests sent at random moments around each of 10 handoffs, on 100
// keep-alive connections: each is answered exactly once, by either
// generation; no answer is lost, none is duplicated.
func TestMigrateRequestsAroundHandoffAnsweredOnce(t *testing.T) {
	const conns, upgrades = 100, 10
	s := itest.StartServer(t, itest.ServerOpts{})
	first := s.LivePID()
	clients := dialRaw(t, s.Addr, conns, first)
	gens := []int{first}
	// est is the last handoff's duration (SIGHUP to the new PID in the PID
	// file); requests are spread over twice that, so that they straddle the
	// moment the old generation drains and moves the connections.
	est := 30 * time.Millisecond
	var tot struct{ old, oldClose, newMoved, stranded int }
	for round := 1; round <= upgrades; round++ {
		old := s.LivePID()
		v := itest.NextVersion(s.Version)
		s.Deploy(v)
		window := 2*est + 10*time.Millisecond
		answers, errs := make([]rawAnswer, conns), make([]error, conns)
		var wg sync.WaitGroup
		start := time.Now()
		s.Signal(old, syscall.SIGHUP)
		for i, c := range clients {
			delay := rand.N(window)
			wg.Go(func() {
				time.Sleep(time.Until(start.Add(delay))) // when to send, not a synchronisation
				answers[i], errs[i] = c.roundTrip(10 * time.Second)
			})
		}
		p := s.WaitNewPID(old, 20*time.Second)
		took := time.Since(start)
		wg.Wait()

		var r struct{ old, oldClose, newMoved, stranded int }
		for i, a := range answers {
			switch {
			case errs[i] != nil:
				t.Errorf("round %d, connection %d: %v", round, i, errs[i])
			case a.pid == old && a.close:
				r.oldClose++
			case a.pid == old:
				r.old++
			case a.pid == p && !a.redialed:
				r.newMoved++
			case a.pid != p:
				t.Errorf("round %d, connection %d: answered by pid %d, neither the old %d nor the new %d", round, i, a.pid, old, p)
			}
		}
		r.stranded = settle(t, old, clients)
		// One more request on every connection, answered by the new
		// generation: a duplicate answer of the round would be read here
		// instead of this request's own.
		if err := askEveryConn(clients, p); err != nil {
			t.Errorf("round %d, after the handoff: %v", round, err)
		}
		s.Version = v
		gens = append(gens, p)
		t.Logf("round %d: handoff %v, window %v: old generation %d (+%d with Connection: close), new one %d on moved connections; %d not moved (the old generation kept them: see settle)",
			round, took.Round(time.Millisecond), window.Round(time.Millisecond), r.old, r.oldClose, r.newMoved, r.stranded)
		tot.old, tot.oldClose, tot.newMoved, tot.stranded = tot.old+r.old, tot.oldClose+r.oldClose, tot.newMoved+r.newMoved, tot.stranded+r.stranded
		est = took
		if t.Failed() {
			break
		}
	}
	// Every connection is now the last generation's, and nothing arrives
	// after the last answers.
	last := gens[len(gens)-1]
	var wg sync.WaitGroup
	errs := make([]error, conns)
	for i, c := range clients {
		wg.Go(func() {
			if a, err := c.roundTrip(10 * time.Second); err != nil {
				errs[i] = err
			} else if a.pid != last || a.close {
				errs[i] = fmt.Errorf("last request: %+v, want a keep-alive answer from %d", a, last)
			} else {
				errs[i] = c.checkQuiet(200 * time.Millisecond)
			}
			c.close()
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("connection %d: %v", i, err)
		}
	}
	t.Logf("all rounds: old generation %d (+%d with Connection: close), new one %d on moved connections; %d not moved (the old generation kept them: see settle)",
		tot.old, tot.oldClose, tot.newMoved, tot.stranded)
	if tot.old+tot.oldClose == 0 || tot.newMoved == 0 {
		t.Errorf("the requests did not straddle the handoffs (old %d, new on moved connections %d): the test tested nothing", tot.old+tot.oldClose, tot.newMoved)
	}
	stopServerToEOF(t, s)
	checkMoves(t, s, gens, func(handoff int, moved int64) error {
		if moved <= 0 {
			return fmt.Errorf("moved=%d, want > 0", moved)
		}
		return nil
	})
}

// 3. A new binary that takes no moved connections (an older one, built with
// -tags handoff_nomoves): the old generation falls back, keeping its idle
// connections until they ask again (each answer then says Connection: close);
// the non-polling client sees no failure.
func TestMigrateFallbackToOlderBinary(t *testing.T) {
	const conns = 50
	nomovesBinary(t)
	s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "5s"})
	p1 := s.LivePID()
	c := startPyClient(t, s.Addr, conns)
	c.waitAllAnsweredBy(t, 0, p1, 15*time.Second)
	mark := c.p.Logs.Mark()
	p2 := s.GoodUpgrade(t, "nomoves", 2, "--wait")
	c.waitAllAnsweredBy(t, mark, p2, 15*time.Second)
	s.WaitGone(p1, 15*time.Second)
	sum := c.stop(t)
	stopServerToEOF(t, s)

	t.Logf("client: %d requests, %d ok, %d failed %v, %d answers with Connection: close (then a new connection)",
		sum.Requests, sum.OK, sum.Failed, sum.Failures, sum.Reconnects)
	if sum.Failed != 0 || sum.OK != sum.Requests {
		t.Errorf("%d of %d requests failed (%v):\n%s", sum.Requests-sum.OK, sum.Requests, sum.Failures, c.failures())
	}
	d := drainedLineOf(t, s, p1)
	t.Logf("old generation: %s", d.Raw)
	if n, _ := d.Num("moved"); n != 0 {
		t.Errorf("old generation %d moved %d connections to a binary that takes none: %s", p1, n, d.Raw)
	}
	if n, _ := d.Num("cut"); n != 0 {
		t.Errorf("old generation %d cut %d connections at the drain deadline: %s", p1, n, d.Raw)
	}
	if n, _ := d.Num("closed_idle"); n != 0 {
		t.Errorf("old generation %d closed %d idle connections under a client that sends every 0.7 s at most: %s", p1, n, d.Raw)
	}
	if l, _, ok := s.Logs.First(0, "connections moved from the previous generation", nil); ok {
		t.Errorf("a generation received moved connections: %s", l.Raw)
	}
}

// 4. 200 upgrades, each moving the same 200 idle keep-alive connections:
// the serving generation's descriptors stay flat, and every connection is
// answered by every generation on the same TCP connection.
//
// Each connection sends one request after each upgrade, between the
// handoffs: a connection moved in and never used since does not move again
// (see TestMigrateMovedConnectionMovesAgain).
func TestMigrateFDsFlat(t *testing.T) {
	const conns, upgrades = 200, 200
	s := itest.StartServer(t, itest.ServerOpts{})
	first := s.LivePID()
	clients := dialRaw(t, s.Addr, conns, first)
	ports := make([]int, conns)
	for i, c := range clients {
		ports[i] = c.port()
	}
	gens := []int{first}
	samples := map[int][]string{}
	kept := map[int]int{} // by handoff: connections not moved (see settle)
	stranded := 0
	start := time.Now()
	for i := 1; i <= upgrades; i++ {
		old := gens[len(gens)-1]
		s.Signal(old, syscall.SIGHUP)
		p := s.WaitNewPID(old, 20*time.Second)
		kept[i] = settle(t, old, clients)
		stranded += kept[i]
		gens = append(gens, p)
		if err := askEveryConn(clients, p); err != nil {
			t.Fatalf("after upgrade %d: %v", i, err)
		}
		if i == 10 || i == upgrades {
			// Compare like with like: the previous generation is gone and
			// the new one has taken note (its moves channel is closed).
			s.Logs.Wait(t, 0, "previous generation exited", itest.PIDIs(p), 10*time.Second)
			fds, err := itest.FDTargets(p)
			if err != nil {
				t.Fatalf("upgrade %d: descriptors of %d: %v", i, p, err)
			}
			samples[i] = fds
		}
	}
	took := time.Since(start)
	// Every connection is the one it was (but those the old generation kept
	// and closed after answering: see settle).
	same := 0
	for i, c := range clients {
		if c.port() == ports[i] {
			same++
		}
		c.close()
	}
	t.Logf("%d of %d connections on their original client port after %d upgrades; %d times a connection was not moved (see settle)", same, conns, upgrades, stranded)
	if conns-same > stranded {
		t.Errorf("%d connections changed port, but only %d were not moved", conns-same, stranded)
	}
	f10, fN := samples[10], samples[upgrades]
	t.Logf("%d upgrades in %v (%v each, with a request on every connection); descriptors of the serving generation after upgrade 10: %d, after upgrade %d: %d",
		upgrades, took.Round(time.Millisecond), (took / upgrades).Round(time.Millisecond), len(f10), upgrades, len(fN))
	if len(f10) < conns {
		t.Errorf("the serving generation holds %d descriptors after upgrade 10, fewer than the %d connections", len(f10), conns)
	}
	if d := len(fN) - len(f10); d > 5 || d < -5 {
		t.Errorf("descriptors after upgrade %d: %d, after upgrade 10: %d (difference %d, want at most 5)\nafter 10:\n%s\nafter %d:\n%s",
			upgrades, len(fN), len(f10), d, strings.Join(f10, "\n"), upgrades, strings.Join(fN, "\n"))
	}
	stopServerToEOF(t, s)
	checkMoves(t, s, gens, func(handoff int, moved int64) error {
		if want := conns - kept[handoff]; moved != int64(want) {
			return fmt.Errorf("moved=%d, want %d (%d connections, %d kept)", moved, want, conns, kept[handoff])
		}
		return nil
	})
}

// Bugs found in the first version of moving connections, each reproduced by a
// test that failed before its fix.

// A connection moved in and not used since moves again at the next handoff.
// With h2c on (handoff serve's plaintext default), net/http's first read on a
// new connection is the 14-byte peek for the HTTP/2 preface, and the steal
// (server/move.go, conn.Read) refuses reads shorter than net/http's buffer:
// the connection stays in the old generation until the drain deadline, where
// it is cut.
func TestMigrateMovedConnectionMovesAgain(t *testing.T) {
	const conns = 20
	s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "3s"})
	p1 := s.LivePID()
	clients := dialRaw(t, s.Addr, conns, p1)
	gens := []int{p1}
	for range 2 {
		old := gens[len(gens)-1]
		s.Signal(old, syscall.SIGHUP)
		p := s.WaitNewPID(old, 20*time.Second)
		s.WaitGone(old, 20*time.Second)
		gens = append(gens, p)
	}
	if err := askEveryConn(clients, gens[2]); err != nil {
		t.Errorf("after two handoffs in a row: %v", err)
	}
	for _, c := range clients {
		c.close()
	}
	stopServerToEOF(t, s)
	checkMoves(t, s, gens, func(handoff int, moved int64) error {
		if moved != conns {
			return fmt.Errorf("moved=%d, want all %d", moved, conns)
		}
		return nil
	})
}

// A moved idle connection is kept by the new generation as long as steady
// state would keep it: IdleTimeout (120 s) after its last request. net/http
// takes it for a new connection and gives it ReadHeaderTimeout (10 s) for
// its first request instead, so a client quiet for 10 s loses its next one.
func TestMigrateMovedConnectionKeepsIdleTimeout(t *testing.T) {
	const conns = 10
	s := itest.StartServer(t, itest.ServerOpts{})
	p1 := s.LivePID()
	clients := dialRaw(t, s.Addr, conns, p1)
	s.Signal(p1, syscall.SIGHUP)
	p2 := s.WaitNewPID(p1, 20*time.Second)
	s.WaitGone(p1, 20*time.Second)
	moved := time.Now()
	// Watch the clients' sockets for a FIN from the server (CLOSE_WAIT) for
	// 12 s: longer than ReadHeaderTimeout, far shorter than IdleTimeout.
	ports := map[int]bool{}
	for _, c := range clients {
		ports[c.c.LocalAddr().(*net.TCPAddr).Port] = true
	}
	closedByServer := func() int {
		n := 0
		for _, e := range itest.ReadTCP() {
			if ports[e.LocalPort] && e.RemPort == s.Port && e.State == itest.TCPCloseWait {
				n++
			}
		}
		return n
	}
	if itest.Poll(12*time.Second, func() bool { return closedByServer() > 0 }) {
		after := time.Since(moved)
		itest.Poll(2*time.Second, func() bool { return closedByServer() == conns })
		t.Errorf("%d of %d moved idle connections closed by the new generation %d, the first %v after the move",
			closedByServer(), conns, p2, after.Round(100*time.Millisecond))
	}
	if err := askEveryConn(clients, p2); err != nil {
		t.Errorf("after 12 s idle: %v", err)
	}
}

// A connection whose keep-alive answer is still being written when the drain
// begins turns idle after the one pass that offers idle connections a move:
// it is never offered again, and stays in the old generation until its next
// request (answered with Connection: close) or the drain deadline, where it
// is cut: the old generation lingers, and a client quiet that long loses
// its next request.
func TestMigrateConnectionIdleAfterTheDrainBeganMoves(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "20s"})
	p1 := s.LivePID()
	// A small receive buffer, small segments (which keep the server's send
	// buffer small) and an answer of 300 KB that we do not read yet: its
	// handler blocks in Write, the header (keep-alive) already sent.
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, rc syscall.RawConn) error {
		var err error
		if cerr := rc.Control(func(fd uintptr) {
			err = errors.Join(syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096),
				syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536))
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	nc, err := d.Dial("tcp", s.Addr)
	if err != nil {
		t.Fatal(err)
	}
	rc := &rawClient{addr: s.Addr, c: nc, br: bufio.NewReader(nc)}
	t.Cleanup(rc.close)
	port := nc.LocalAddr().(*net.TCPAddr).Port
	name := strings.Repeat("a", 300_000)
	if _, err := io.WriteString(nc, "GET /hello/"+name+" HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	// Wait until the socket buffers are full and stay so.
	var buffered, prev int64
	itest.Eventually(t, 10*time.Second, func() bool {
		var n int64
		for _, e := range itest.ReadTCP() {
			switch {
			case e.State != itest.TCPEstablished:
			case e.LocalPort == s.Port && e.RemPort == port:
				n += e.TxQueue
			case e.LocalPort == port && e.RemPort == s.Port:
				n += e.RxQueue
			}
		}
		full := n > 0 && n == prev
		prev = n
		buffered = n
		return full
	}, "the answer to fill the socket buffers")

	s.Signal(p1, syscall.SIGHUP)
	p2 := s.WaitNewPID(p1, 20*time.Second)
	s.Logs.Wait(t, 0, "draining", itest.PIDIs(p1), 10*time.Second)
	// It closed its listener: the pass over its idle connections follows at once.
	itest.Eventually(t, 10*time.Second, func() bool { return !itest.HasSocketInode(p1, s.Inode) }, "pid %d to close its listener", p1)
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	cr := &byteCounter{r: nc}
	rc.br = bufio.NewReader(cr)
	resp, err := http.ReadResponse(rc.br, nil)
	if err != nil {
		t.Fatalf("reading the big answer: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || len(body) != len("Hello "+name+"!!!") {
		t.Fatalf("big answer: %d bytes, %v", len(body), err)
	}
	nc.SetReadDeadline(time.Time{})
	if cr.n <= buffered {
		t.Skipf("precondition: the whole answer (%d bytes) fit in the socket buffers (%d bytes): its handler was not writing when the drain began", cr.n, buffered)
	}
	t.Logf("answer: %d bytes, %d of them buffered when the drain began; Connection: close %v", cr.n, buffered, resp.Close)
	if resp.Close {
		return // closed after the answer: nothing to move
	}
	// The connection is idle now; the old generation should move it.
	if !itest.Poll(3*time.Second, func() bool { return !itest.Alive(p1) }) {
		a, err := rc.roundTrip(10 * time.Second)
		t.Errorf("old generation %d still draining 3 s after the idle connection's answer ended; a request on it: %+v %v (the new generation is %d)", p1, a, err, p2)
	}
}

// byteCounter counts the bytes read through it.
type byteCounter struct {
	r io.Reader
	n int64
}

func (c *byteCounter) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n += int64(n)
	return n, err
}

// ---------------------------------------------------------------------------
// Helpers of the migration tests and benchmarks.

var (
	nomovesOnce sync.Once
	nomovesErr  error
)

// nomovesBinary builds, once per test process, handoff with -tags
// handoff_nomoves and -X main.version=nomoves as handoff-nomoves beside the
// harness's binaries (removed with them by itest.Main), so that
// Server.Deploy("nomoves") installs it. It returns its path.
func nomovesBinary(tb testing.TB) string {
	tb.Helper()
	out := itest.Binary(tb, "handoff-nomoves")
	nomovesOnce.Do(func() {
		root, err := itest.ModuleRoot()
		if err != nil {
			nomovesErr = err
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(ctx, "go", "build", "-tags", "handoff_nomoves", "-ldflags", "-X main.version=nomoves", "-o", out, ".")
		cmd.Dir = root
		if b, err := cmd.CombinedOutput(); err != nil {
			nomovesErr = fmt.Errorf("go build -tags handoff_nomoves: %w\n%s", err, b)
		}
	})
	if nomovesErr != nil {
		tb.Fatal(nomovesErr)
	}
	return out
}

// stopServer SIGTERMs the serving generation and waits until every
// generation has exited and the output reached EOF: then s.Logs holds all of
// it. The first generation (the group's leader) must have exited 0.
func stopServerToEOF(tb testing.TB, s *itest.Server) {
	tb.Helper()
	if p, err := s.ReadPID(); err == nil {
		s.Signal(p, syscall.SIGTERM)
	}
	if st := s.Proc.Wait(tb, 60*time.Second); st.ExitCode() != 0 {
		tb.Errorf("first generation exited %v, want 0", st)
	}
}

// drainedLine returns the drained line of generation pid (the output must
// have reached EOF: see stopServer).
func drainedLineOf(tb testing.TB, s *itest.Server, pid int) itest.Line {
	tb.Helper()
	l, _, ok := s.Logs.First(0, "drained", itest.PIDIs(pid))
	if !ok {
		tb.Fatalf("generation %d logged no drained line", pid)
	}
	return l
}

// checkMoves checks, once the output reached EOF, every handoff of gens (in
// order): the old generation's drained line, its moved count (with check),
// nothing cut, and the new generation's count of connections received,
// which must equal it.
func checkMoves(tb testing.TB, s *itest.Server, gens []int, check func(handoff int, moved int64) error) {
	tb.Helper()
	var counts []int64
	for i, old := range gens[:len(gens)-1] {
		d := drainedLineOf(tb, s, old)
		moved, ok := d.Num("moved")
		if !ok {
			tb.Errorf("handoff %d: drained line of %d has no moved count: %s", i+1, old, d.Raw)
			continue
		}
		counts = append(counts, moved)
		if err := check(i+1, moved); err != nil {
			tb.Errorf("handoff %d: generation %d: %v: %s", i+1, old, err, d.Raw)
		}
		if cut, _ := d.Num("cut"); cut != 0 {
			tb.Errorf("handoff %d: generation %d cut %d connections: %s", i+1, old, cut, d.Raw)
		}
		if moved > 0 {
			// handoff serve's default reaches the draining generation:
			// --move-gc-percent 400 (unless GOGC is set).
			l, _, ok := s.Logs.First(0, "moving idle connections to the new generation", itest.PIDIs(old))
			percent, _ := l.Num("gc_percent")
			switch {
			case !ok:
				tb.Errorf("handoff %d: generation %d moved %d connections but logged no \"moving idle connections\" line", i+1, old, moved)
			case os.Getenv("GOGC") == "" && percent != 400:
				tb.Errorf("handoff %d: generation %d moved connections with GC percent %d, want 400: %s", i+1, old, percent, l.Raw)
			}
		}
		var got int64
		if l, _, ok := s.Logs.First(0, "connections moved from the previous generation", itest.PIDIs(gens[i+1])); ok {
			got, _ = l.Num("count")
		}
		if got != moved {
			tb.Errorf("handoff %d: generation %d moved %d connections, generation %d logged %d received", i+1, old, moved, gens[i+1], got)
		}
	}
	if len(counts) <= 20 {
		tb.Logf("connections moved at each handoff: %v", counts)
	}
}

// pyClient is testdata/clients/nonpolling.py running against a server, with
// --events: a JSON line per response in its Logs.
type pyClient struct {
	p *itest.Proc
	n int
}

// pySummary is the client's last line.
type pySummary struct {
	Requests   int            `json:"requests"`
	OK         int            `json:"ok"`
	Failed     int            `json:"failed"`
	Failures   map[string]int `json:"failures"`
	Reconnects int            `json:"reconnects"`
	Conns      []struct {
		Conn     int         `json:"conn"`
		Segments []pySegment `json:"segments"`
	} `json:"conns"`
}

// pySegment is a connection's life on one client port.
type pySegment struct {
	Port     int   `json:"port"`
	PIDs     []int `json:"pids"`
	Requests int   `json:"requests"`
}

// startPyClient starts the non-polling client with conns connections (more
// flags in extra) in its own process group and waits until every connection
// got its first answer. Without python3 the test is skipped (CI installs it).
func startPyClient(tb testing.TB, addr string, conns int, extra ...string) *pyClient {
	tb.Helper()
	py, err := exec.LookPath("python3")
	if err != nil {
		tb.Skip("python3 not found: the non-polling client is testdata/clients/nonpolling.py")
	}
	root, err := itest.ModuleRoot()
	if err != nil {
		tb.Fatal(err)
	}
	args := append([]string{"-u", filepath.Join(root, "testdata", "clients", "nonpolling.py"),
		"--addr", addr, "--conns", strconv.Itoa(conns), "--events"}, extra...)
	cmd := exec.Command(py, args...)
	cmd.Env = itest.CleanEnv(nil)
	c := &pyClient{p: itest.StartCmd(tb, cmd), n: conns}
	c.p.WaitLog(tb, 0, "ready", nil, 30*time.Second)
	return c
}

// waitAllAnsweredBy waits until every connection got an answer from pid in
// a line from index mark on (the client must run with --events).
func (c *pyClient) waitAllAnsweredBy(tb testing.TB, mark, pid int, timeout time.Duration) {
	tb.Helper()
	var seen map[int64]bool
	itest.Eventually(tb, timeout, func() bool {
		ls, _ := c.p.Logs.Find(mark, "response", itest.PIDIs(pid))
		seen = map[int64]bool{}
		for _, l := range ls {
			n, _ := l.Num("conn")
			seen[n] = true
		}
		return len(seen) == c.n
	}, "all %d connections of the client to be answered by pid %d (so far %d)", c.n, pid, len(seen))
}

// stop interrupts the client, waits for it to exit 0 with its output read to
// the end, and returns its summary.
func (c *pyClient) stop(tb testing.TB) pySummary {
	tb.Helper()
	if err := syscall.Kill(c.p.PID, syscall.SIGINT); err != nil {
		tb.Fatalf("SIGINT the client (pid %d): %v", c.p.PID, err)
	}
	if code := c.p.ExitCode(tb, 30*time.Second); code != 0 {
		tb.Errorf("client exited %d, want 0", code)
	}
	l, _, ok := c.p.Logs.First(0, "summary", nil)
	if !ok {
		tb.Fatalf("the client printed no summary")
	}
	var sum pySummary
	if err := json.Unmarshal([]byte(l.Raw), &sum); err != nil {
		tb.Fatalf("client summary: %v: %s", err, l.Raw)
	}
	if len(sum.Conns) != c.n {
		tb.Fatalf("client summary has %d connections, want %d", len(sum.Conns), c.n)
	}
	return sum
}

// failures returns the client's failure lines (at most 20), for a message.
func (c *pyClient) failures() string {
	ls, _ := c.p.Logs.Find(0, "failure", nil)
	var b strings.Builder
	for i, l := range ls {
		if i == 20 {
			fmt.Fprintf(&b, "... %d more\n", len(ls)-i)
			break
		}
		b.WriteString(l.Raw + "\n")
	}
	return b.String()
}

// dialRaw opens n raw keep-alive connections to addr, each answered once by
// pid; it fails tb otherwise.
func dialRaw(tb testing.TB, addr string, n, pid int) []*rawClient {
	tb.Helper()
	clients := make([]*rawClient, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range clients {
		clients[i] = &rawClient{addr: addr, id: i}
		tb.Cleanup(clients[i].close)
		wg.Go(func() {
			a, err := clients[i].roundTrip(10 * time.Second)
			if err == nil && (a.pid != pid || a.close) {
				err = fmt.Errorf("%+v, want a keep-alive answer from %d", a, pid)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			tb.Fatalf("connection %d, first request: %v", i, err)
		}
	}
	return clients
}

// askAll sends one request on every connection at once; each must be
// answered by pid, keep-alive, on the connection it had.
func askEveryConn(clients []*rawClient, pid int) error {
	errs := make([]error, len(clients))
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() {
			a, err := c.roundTrip(10 * time.Second)
			switch {
			case err != nil:
				errs[i] = fmt.Errorf("connection %d: %w", i, err)
			case a.pid != pid || a.close:
				errs[i] = fmt.Errorf("connection %d: %+v, want a keep-alive answer from %d", i, a, pid)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// settle waits (20 s at most) for the old generation to exit after a
// handoff, and returns how many connections it kept. A connection whose
// answer was still being sent when the drain began is not moved (a known bug:
// TestMigrateConnectionIdleAfterTheDrainBeganMoves): the old generation keeps
// it until its next request, which it answers with Connection: close, or
// until the drain deadline, where it cuts it. So when the old generation is
// still there 2 s after the handoff (its drain takes milliseconds otherwise),
// every connection is asked once: those it kept get their answer, and close.
func settle(tb testing.TB, old int, clients []*rawClient) (kept int) {
	tb.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !itest.Poll(2*time.Second, func() bool { return !itest.Alive(old) }) {
		if time.Now().After(deadline) {
			tb.Fatalf("old generation %d still alive 20 s after the handoff", old)
		}
		answers, errs := make([]rawAnswer, len(clients)), make([]error, len(clients))
		var wg sync.WaitGroup
		for i, c := range clients {
			wg.Go(func() { answers[i], errs[i] = c.roundTrip(10 * time.Second) })
		}
		wg.Wait()
		for i, a := range answers {
			switch {
			case errs[i] != nil:
				tb.Errorf("connection %d, asked while the old generation %d lingers: %v", i, old, errs[i])
			case a.pid == old && a.close:
				kept++
			}
		}
		tb.Logf("the old generation %d was still there 2 s after the handoff: it had kept %d connections (known bug)", old, kept)
	}
	return kept
}

// rawClient is one HTTP/1.1 keep-alive connection written by hand, so that
// every byte the server sends is seen: each request names itself in its path
// (/hello/cID-SEQ) and the body of its answer must name it back.
type rawClient struct {
	addr string
	id   int
	seq  int
	c    net.Conn
	br   *bufio.Reader
}

// rawAnswer is what roundTrip saw of an answer.
type rawAnswer struct {
	pid      int
	close    bool // Connection: close; the connection is closed since
	port     int  // the client's port
	redialed bool // the request went on a new connection
}

// roundTrip sends one request and reads exactly one answer within timeout,
// on the open connection or, after a Connection: close, on a new one. An
// answer with Connection: close must be followed by the end of the
// connection, nothing else.
func (r *rawClient) roundTrip(timeout time.Duration) (rawAnswer, error) {
	var a rawAnswer
	if r.c == nil {
		c, err := net.DialTimeout("tcp", r.addr, timeout)
		if err != nil {
			return a, fmt.Errorf("dial: %w", err)
		}
		r.c, r.br, a.redialed = c, bufio.NewReader(c), r.seq > 0
	}
	a.port = r.c.LocalAddr().(*net.TCPAddr).Port
	r.seq++
	name := fmt.Sprintf("c%d-%d", r.id, r.seq)
	if err := r.c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return a, err
	}
	defer r.c.SetDeadline(time.Time{})
	if _, err := io.WriteString(r.c, "GET /hello/"+name+" HTTP/1.1\r\nHost: "+r.addr+"\r\n\r\n"); err != nil {
		return a, fmt.Errorf("request %s on port %d: write: %w (lost)", name, a.port, err)
	}
	resp, err := http.ReadResponse(r.br, nil)
	if err != nil {
		return a, fmt.Errorf("request %s on port %d: no answer: %w (lost)", name, a.port, err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return a, fmt.Errorf("request %s on port %d: body: %w (lost)", name, a.port, err)
	}
	a.pid, _ = strconv.Atoi(resp.Header.Get("Handoff-Pid"))
	a.close = resp.Close
	if want := "Hello " + name + "!!!"; resp.StatusCode != 200 || string(body) != want {
		return a, fmt.Errorf("request %s on port %d: answer %d %q from pid %d, want 200 %q (a duplicate or misplaced answer)",
			name, a.port, resp.StatusCode, body, a.pid, want)
	}
	if a.close {
		var extra [512]byte
		n, err := r.br.Read(extra[:])
		r.close()
		if n > 0 {
			return a, fmt.Errorf("request %s on port %d: %d bytes after its answer with Connection: close: %q (duplicate)", name, a.port, n, extra[:n])
		}
		if !errors.Is(err, io.EOF) {
			return a, fmt.Errorf("request %s on port %d: after its answer with Connection: close: %v, want the end of the connection", name, a.port, err)
		}
	}
	return a, nil
}

// checkQuiet checks that nothing arrives on the open connection within d
// (an answer nobody asked for would) and that the server has not closed it.
func (r *rawClient) checkQuiet(d time.Duration) error {
	if r.c == nil {
		return nil
	}
	if n := r.br.Buffered(); n > 0 {
		return fmt.Errorf("%d unrequested bytes buffered", n)
	}
	r.c.SetReadDeadline(time.Now().Add(d))
	defer r.c.SetReadDeadline(time.Time{})
	var b [512]byte
	n, err := r.br.Read(b[:])
	var ne net.Error
	switch {
	case n > 0:
		return fmt.Errorf("%d unrequested bytes: %q", n, b[:n])
	case errors.As(err, &ne) && ne.Timeout():
		return nil
	default:
		return fmt.Errorf("idle connection ended: %v", err)
	}
}

// port is the client port of the open connection (0 when closed).
func (r *rawClient) port() int {
	if r.c == nil {
		return 0
	}
	return r.c.LocalAddr().(*net.TCPAddr).Port
}

func (r *rawClient) close() {
	if r.c != nil {
		r.c.Close()
		r.c, r.br = nil, nil
	}
}
