package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/moved"
)

// pairMover moves descriptors in-process to a second server's Moved
// listener, as package upgrader does across processes.
type pairMover struct {
	to       *moved.Listener
	fail     atomic.Bool
	moves    atomic.Int64
	attempts atomic.Int64
}

func (p *pairMover) Move(fds []int) error {
	p.attempts.Add(1)
	if p.fail.Load() {
		return errors.New("refused")
	}
	for _, fd := range fds {
		nfd, err := unix.Dup(fd)
		if err != nil {
			return err
		}
		if err := p.to.Add(nfd); err != nil {
			return err
		}
	}
	p.moves.Add(int64(len(fds)))
	return nil
}

func whoHandler(name string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, name)
	})
}

// rawConn is a client that never checks its idle connection before reuse
// (like Python's http.client): one request, one answer, in turn.
type rawConn struct {
	net.Conn
	br *bufio.Reader
}

func rawDial(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{Conn: c, br: bufio.NewReader(c)}
}

func (c *rawConn) get(t *testing.T) (body string, closing bool) {
	t.Helper()
	c.send(t)
	return c.read(t)
}

// send sends GET /; read reads one answer.
func (c *rawConn) send(t *testing.T) {
	t.Helper()
	_, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
}

func (c *rawConn) read(t *testing.T) (body string, closing bool) {
	t.Helper()
	resp, err := http.ReadResponse(c.br, nil)
	require.NoError(t, err)
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b), resp.Close
}

// dialUsed opens n connections to addr and sends one request on each, which
// the old generation must answer; they are then idle.
func dialUsed(t *testing.T, addr string, n int) []*rawConn {
	t.Helper()
	var clients []*rawConn
	for range n {
		c := rawDial(t, addr)
		body, _ := c.get(t)
		require.Equal(t, "old", body)
		clients = append(clients, c)
	}
	return clients
}

func startMoved(t *testing.T, name string) (*Server, *pairMover) {
	t.Helper()
	b := &Server{Handler: whoHandler(name)}
	return b, movedServer(t, b)
}

// Idle connections move: the drain ends at once, and each client's next
// request, on the same TCP connection, is answered by the next generation.
func TestDrainToMovesIdleConnections(t *testing.T) {
	a, addr := start(t, whoHandler("old"), time.Hour)
	_, mover := startMoved(t, "new")
	clients := dialUsed(t, addr, 20)
	eventually(t, func() bool { return idleCount(a) == 20 }, "20 idle connections")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := a.DrainTo(ctx, mover)
	require.NoError(t, err)
	assert.Equal(t, 20, rep.Moved)
	assert.Zero(t, rep.ClosedIdle+rep.Cut)
	for i, c := range clients {
		body, closing := c.get(t)
		assert.Equal(t, "new", body, "client %d", i)
		assert.False(t, closing, "the moved connection stays open")
	}
}

// A connection whose next request is arriving is answered by the old
// generation, once, and closed after; nothing is lost or answered twice.
func TestDrainToRacingRequestsAnsweredOnce(t *testing.T) {
	for round := range 20 {
		a, addr := start(t, whoHandler("old"), time.Hour)
		_, mover := startMoved(t, "new")
		var clients []*rawConn
		for range 10 {
			c := rawDial(t, addr)
			c.get(t)
			clients = append(clients, c)
		}
		eventually(t, func() bool { return idleCount(a) == 10 }, "idle")
		results := make(chan string, len(clients))
		for _, c := range clients {
			go func() {
				_, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
				if err != nil {
					results <- "write: " + err.Error()
					return
				}
				resp, err := http.ReadResponse(c.br, nil)
				if err != nil {
					results <- "read: " + err.Error()
					return
				}
				b, _ := io.ReadAll(resp.Body)
				results <- string(b)
				// Exactly one answer: nothing more arrives.
				c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
				if n, _ := c.br.Read(make([]byte, 1)); n > 0 {
					results <- "a second answer"
				}
			}()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := a.DrainTo(ctx, mover)
		cancel()
		require.NoError(t, err)
		for range clients {
			r := <-results
			require.Contains(t, []string{"old", "new"}, r, "round %d", round)
		}
		select {
		case r := <-results:
			t.Fatalf("round %d: %s", round, r)
		default:
		}
	}
}

// Bytes already buffered by net/http (a pipelined request) keep the old path.
func TestDrainToKeepsBufferedBytes(t *testing.T) {
	release := make(chan struct{})
	a, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/wait" {
			<-release
		}
		fmt.Fprint(w, "old")
	}), time.Hour)
	_, mover := startMoved(t, "new")
	c := rawDial(t, addr)
	// One segment: a request and the first bytes of the next.
	_, err := io.WriteString(c, "GET /wait HTTP/1.1\r\nHost: x\r\n\r\nGE")
	require.NoError(t, err)
	eventually(t, func() bool { return a.InFlight() == 1 }, "in flight")
	close(release)
	resp, err := http.ReadResponse(c.br, nil)
	require.NoError(t, err)
	io.ReadAll(resp.Body)
	eventually(t, func() bool { return idleCount(a) == 1 }, "idle with 2 bytes buffered")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	drained := drainToAsync(a, ctx, mover)
	eventually(t, func() bool { return a.Draining() }, "draining")
	_, err = io.WriteString(c, "T / HTTP/1.1\r\nHost: x\r\n\r\n")
	require.NoError(t, err)
	resp, err = http.ReadResponse(c.br, nil)
	require.NoError(t, err)
	b, _ := io.ReadAll(resp.Body)
	assert.Equal(t, "old", string(b), "the old generation read those bytes: it answers")
	assert.True(t, resp.Close)
	rep := <-drained
	assert.Zero(t, rep.Moved)
	assert.Zero(t, mover.moves.Load())
}

// A failed move leaves the connections here; an idle one is not closed sooner
// than steady state would (here: at the deadline), so the client's next
// request is answered.
func TestDrainToFallsBackWhenTheMoveFails(t *testing.T) {
	a, addr := start(t, whoHandler("old"), time.Hour)
	_, mover := startMoved(t, "new")
	mover.fail.Store(true)
	rep := requestDuringDrain(t, a, addr, mover)
	assert.Zero(t, rep.Moved)
	assert.Equal(t, 1, rep.ClosedAfterResponse)
}

func idleCount(s *Server) int { return stateCount(s, http.StateIdle) }

func newCount(s *Server) int { return stateCount(s, http.StateNew) }

func stateCount(s *Server, st http.ConnState) int {
	s.init() // Serve may not have run it yet: the set of connections is made there
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		if c.state() == st {
			n++
		}
	}
	return n
}

// With h2c on, net/http reads a new connection again after the read that
// moved it: the connection still counts once, as moved (it was once counted
// as closed here too, and could answer a second offer).
func TestDrainToCountsMovedNewConnectionsOnceWithH2C(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	a := &Server{HTTP: &http.Server{Handler: whoHandler("old"), Protocols: &p}}
	done := make(chan error, 1)
	go func() { done <- a.Serve(ln) }()
	_, mover := startMoved(t, "new")
	const n = 20
	var clients []*rawConn
	for range n {
		clients = append(clients, rawDial(t, ln.Addr().String()))
	}
	eventually(t, func() bool { return newCount(a) == n }, "20 new connections")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := a.DrainTo(ctx, mover)
	require.NoError(t, err)
	assert.Equal(t, n, rep.Moved)
	assert.Zero(t, rep.ClosedAfterResponse+rep.ClosedIdle+rep.Cut, "report %+v", rep)
	assert.EqualValues(t, n, mover.moves.Load())
	for i, c := range clients {
		body, _ := c.get(t)
		assert.Equal(t, "new", body, "client %d", i)
	}
	assert.ErrorIs(t, <-done, ErrDraining)
}

// batchMover records the size of every batch it moves.
type batchMover struct {
	*pairMover
	calls, largest atomic.Int64
}

func (b *batchMover) Move(fds []int) error {
	b.calls.Add(1)
	for {
		l := b.largest.Load()
		if int64(len(fds)) <= l || b.largest.CompareAndSwap(l, int64(len(fds))) {
			break
		}
	}
	return b.pairMover.Move(fds)
}

// Idle connections move a few at a time (MoveRate), not all at once; a drain
// whose deadline leaves too little time for that rate moves faster, and still
// moves every one.
func TestDrainToPacesMoves(t *testing.T) {
	defer func(w time.Duration) { warmWindow = w }(warmWindow)
	warmWindow = 100 * time.Millisecond // (connections used more lately move at once)
	for _, c := range []struct {
		name       string
		rate       int
		timeout    time.Duration
		wantMax    int64 // the largest batch may be at most this (0: no bound)
		wantBigger bool  // some batch must be larger than the rate allows
	}{
		{"at its rate", 400, 10 * time.Second, 2, false}, // 2 per 5 ms pass
		{"faster for its deadline", 1, 40 * time.Millisecond, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, addr := start(t, whoHandler("old"), time.Hour)
			a.MoveRate = c.rate
			_, pm := startMoved(t, "new")
			mover := &batchMover{pairMover: pm}
			clients := dialUsed(t, addr, 20)
			eventually(t, func() bool { return idleCount(a) == 20 }, "20 idle connections")
			idleSince := time.Now()
			eventually(t, func() bool { return time.Since(idleSince) > warmWindow }, "the connections to go cold")

			ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
			defer cancel()
			rep, err := a.DrainTo(ctx, mover)
			require.NoError(t, err)
			assert.Equal(t, 20, rep.Moved)
			assert.Zero(t, rep.ClosedIdle+rep.Cut)
			if c.wantMax > 0 {
				assert.LessOrEqual(t, mover.largest.Load(), c.wantMax, "the largest batch")
				assert.GreaterOrEqual(t, mover.calls.Load(), int64(10), "batches")
			}
			if c.wantBigger {
				assert.Greater(t, mover.largest.Load(), int64(1), "the largest batch, at a rate of 1 per pass")
			}
			for i, cl := range clients {
				body, _ := cl.get(t)
				assert.Equal(t, "new", body, "client %d", i)
			}
		})
	}
}

// Connections used lately when the drain begins move at once, whatever
// MoveRate: their clients are likely to send again soon. The others, idle
// longer, move at MoveRate.
func TestDrainToMovesRecentlyUsedConnectionsFirst(t *testing.T) {
	defer func(w time.Duration) { warmWindow = w }(warmWindow)
	warmWindow = 2 * time.Second // ample for the warm ones to be dialled and used, on a loaded machine
	a, addr := start(t, whoHandler("old"), time.Hour)
	a.MoveRate = 200 // 1 per pass
	_, pm := startMoved(t, "new")
	mover := &batchMover{pairMover: pm}
	const cold, warm = 10, 30
	clients := dialUsed(t, addr, cold)
	// The first ones go cold: nothing read from them for warmWindow.
	coldSince := time.Now()
	eventually(t, func() bool { return time.Since(coldSince) > warmWindow }, "the first connections to go cold")
	clients = append(clients, dialUsed(t, addr, warm)...)
	eventually(t, func() bool { return idleCount(a) == cold+warm }, "idle connections")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rep, err := a.DrainTo(ctx, mover)
	require.NoError(t, err)
	assert.Equal(t, cold+warm, rep.Moved, "report %+v", rep)
	assert.GreaterOrEqual(t, mover.largest.Load(), int64(warm), "the warm connections move in one batch")
	assert.GreaterOrEqual(t, mover.calls.Load(), int64(cold), "the cold ones one per pass")
	for i, c := range clients {
		body, _ := c.get(t)
		assert.Equal(t, "new", body, "client %d", i)
	}
}

// refusing is a Mover that says up front it moves nothing.
type refusing struct{ *pairMover }

func (refusing) Moves() bool { return false }

// A Mover that moves nothing (Moves false) is never asked to move; answers
// close their connections from the start of the drain.
// requestDuringDrain opens one connection to a (whose handler answers "old"),
// uses it, drains a with m once it is idle, and sends a request on it during
// the drain: a answers it, with Connection: close. It returns the drain's report.
func requestDuringDrain(t *testing.T, a *Server, addr string, m Mover) Report {
	t.Helper()
	c := rawDial(t, addr)
	c.get(t)
	eventually(t, func() bool { return idleCount(a) == 1 }, "idle")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	drained := drainToAsync(a, ctx, m)
	eventually(t, func() bool { return a.Draining() }, "draining")
	body, closing := c.get(t)
	assert.Equal(t, "old", body)
	assert.True(t, closing, "answered with Connection: close")
	return waitReport(t, drained)
}

func TestDrainToWithAMoverThatMovesNothing(t *testing.T) {
	a, addr := start(t, whoHandler("old"), time.Hour)
	_, pm := startMoved(t, "new")
	rep := requestDuringDrain(t, a, addr, refusing{pm})
	assert.Zero(t, rep.Moved)
	assert.Zero(t, pm.attempts.Load(), "moves asked of it")
	assert.Equal(t, 1, rep.ClosedAfterResponse)
}

// slowFailingMover fails every Move after a while, as a next generation that
// does not read its end would.
type slowFailingMover struct{ calls atomic.Int64 }

func (m *slowFailingMover) Move([]int) error {
	m.calls.Add(1)
	time.Sleep(50 * time.Millisecond) // a move that times out (no synchronisation here)
	return errors.New("timed out")
}

// When moves fail, a pass stops calling Move after its first failure (and the
// drain stops moving after three failed passes): what it asked stays, as
// steady state would keep it, and the drain does not spend its time in
// failing moves.
func TestDrainToGivesUpOnFailingMoves(t *testing.T) {
	a, addr := start(t, whoHandler("old"), time.Hour)
	a.MoveRate = -1 // all at once: 600 connections are 3 batches a pass
	mover := &slowFailingMover{}
	for range 600 {
		rawDial(t, addr).get(t)
	}
	eventually(t, func() bool { return idleCount(a) == 600 }, "idle connections")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rep, err := a.DrainTo(ctx, mover)
	assert.Error(t, err, "the idle connections stay until the deadline")
	assert.Zero(t, rep.Moved)
	assert.Equal(t, int64(1), mover.calls.Load(), "Move calls: the first failure ends the pass, and what it asked stays")
}

// A connection asked to move that never answers (net/http has not begun to
// read it: its accept loop stalls) makes each pass wait stealWait, yet the
// drain cuts at its deadline, not passes later (a pass once waited on past
// the deadline, and the drain's loop picked its next tick over the deadline
// at random when both were due).
func TestDrainCutsAtItsDeadlineWhenMovesGoUnanswered(t *testing.T) {
	hs, entered, open := stalledAt(t, 0)
	b := &Server{HTTP: hs, IdleGrace: time.Hour}
	clients := moveTo(t, movedServer(t, b), 1)
	eventually(t, func() bool { return parkedCount(b) == 1 }, "parked")
	clients[0].send(t) // unparked: net/http takes it and stalls before reading
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("net/http never took the connection")
	}
	_, to := startMoved(t, "c")
	const within = 1500 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	began := time.Now()
	drained := drainToAsync(b, ctx, to)
	eventually(t, func() bool { return tracked(b) == 0 }, "the cut")
	took := time.Since(began)
	open() // the http.Server's Close, at the end of the drain, waits for its accept loop
	rep := waitReport(t, drained)
	assert.Equal(t, 1, rep.Cut, "report %+v", rep)
	assert.Less(t, took, within+stealWait/2, "the cut came passes after the deadline")
}

// lateMover holds every Move until ctx ends, then moves on through next: a
// successor that takes the batch just as the drain's deadline passes.
type lateMover struct {
	ctx  context.Context
	next Mover
}

func (m *lateMover) Move(fds []int) error {
	<-m.ctx.Done()
	return m.next.Move(fds)
}

// A batch that moves as the deadline passes is counted moved, and not cut
// too (the deadline's cut found connections whose Read had yet to close
// them). Found by a review.
func TestMovedAtTheDeadlineNotAlsoCut(t *testing.T) {
	a, addr := start(t, whoHandler("old"), time.Hour)
	a.MoveRate = -1 // every one in the first pass
	_, pm := startMoved(t, "new")
	const n = 100
	clients := dialUsed(t, addr, n)
	eventually(t, func() bool { return idleCount(a) == n }, "idle connections")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	rep, _ := a.DrainTo(ctx, &lateMover{ctx: ctx, next: pm})
	assert.Equal(t, n, rep.Moved, "report %+v", rep)
	assert.Zero(t, rep.Cut+rep.ClosedIdle+rep.ClosedAfterResponse, "report %+v", rep)
	for i, c := range clients {
		body, _ := c.get(t)
		assert.Equal(t, "new", body, "client %d", i)
	}
}

// gatedConn stalls one SyscallConn call (the descriptor lookup of conn.fd,
// which Read makes between loading its steal and answering it) until gate
// closes: a Read goroutine descheduled at that point.
type gatedConn struct {
	net.Conn
	armed   atomic.Bool
	entered chan struct{}
	gate    chan struct{}
}

func (g *gatedConn) SyscallConn() (syscall.RawConn, error) {
	if g.armed.CompareAndSwap(true, false) {
		close(g.entered)
		select {
		case <-g.gate:
		case <-time.After(10 * time.Second):
		}
	}
	return g.Conn.(syscall.Conn).SyscallConn()
}

// A Read that answers a pass's steal late (the pass stopped waiting) does not
// end the next pass's: that one gets its answer and the connection moves (the
// late answer once cleared it, and the pass waited stealWait for nothing).
// Found by a review.
func TestALateAnswerLeavesTheNextPassSteal(t *testing.T) {
	_, to := startMoved(t, "new")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	cl, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer cl.Close()
	sc, err := ln.Accept()
	require.NoError(t, err)

	s := &Server{}
	s.init()
	g := &gatedConn{Conn: sc, entered: make(chan struct{}), gate: make(chan struct{})}
	g.armed.Store(true)
	c := &conn{Conn: g, s: s, movable: true, st: http.StateIdle, since: time.Now()}
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	readDone := make(chan error, 1)
	go func() { // net/http's read of the next request
		_, err := c.Read(make([]byte, httpReadBuf))
		readDone <- err
	}()
	defer func() {
		g.Conn.Close()
		select {
		case <-readDone:
		case <-time.After(10 * time.Second):
			t.Error("the Read did not return")
		}
	}()

	// Pass 1: the Read loads its steal, and stalls before answering.
	moved, _ := s.moveIdle(context.Background(), to, 1)
	require.Zero(t, moved)
	select {
	case <-g.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the Read never reached its answer")
	}
	// Pass 2 asks again; then the stalled Read resumes with pass 1's steal.
	pass2 := make(chan int, 1)
	began := time.Now()
	go func() {
		m, _ := s.moveIdle(context.Background(), to, 1)
		pass2 <- m
	}()
	eventually(t, func() bool { return c.stealing.Load() != nil }, "pass 2 to ask")
	close(g.gate)
	var got int
	select {
	case got = <-pass2:
	case <-time.After(10 * time.Second):
		t.Fatal("pass 2 did not return")
	}
	assert.Equal(t, 1, got, "pass 2 moved nothing")
	assert.Less(t, time.Since(began), stealWait/2, "pass 2 waited for an answer that never came")
}

// closeDuringMove serves n used idle connections on a Server over its own
// http.Server, drains them into h for as long as ctx lasts, and closes the
// http.Server from outside once h's Move has begun (h holds it). It returns
// the clients, the drain's report channel and Serve's result.
func closeDuringMove(t *testing.T, ctx context.Context, n int, h *heldMover) ([]*rawConn, <-chan Report, <-chan error) {
	t.Helper()
	hs := &http.Server{Handler: whoHandler("old")}
	a := &Server{HTTP: hs, IdleGrace: time.Hour}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- a.Serve(ln) }()
	clients := dialUsed(t, ln.Addr().String(), n)
	eventually(t, func() bool { return idleCount(a) == n }, "idle")
	t.Cleanup(func() { assert.Zero(t, tracked(a), "connections left") })
	drained := drainToAsync(a, ctx, h)
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no move began")
	}
	require.NoError(t, hs.Close()) // returns at once: the moving ones close once their move is decided
	return clients, drained, done
}

// The http.Server closed from outside while a connection's move is under
// way: its descriptor stays open until the move is decided, so its number is
// not reused and another file sent to the next generation in its place; the
// connection moves. Found by a review.
func TestHTTPServerCloseDuringAMove(t *testing.T) {
	_, next := startMoved(t, "c")
	h := &heldMover{next: next, entered: make(chan struct{}), release: make(chan struct{})}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	clients, drained, done := closeDuringMove(t, ctx, 1, h)
	// Files that take the lowest free descriptor numbers: the connection's,
	// had Close freed it.
	for range 8 {
		f, err := os.Open(os.DevNull)
		require.NoError(t, err)
		defer f.Close()
	}
	close(h.release)
	body, _ := clients[0].get(t)
	assert.Equal(t, "c", body)
	waitReport(t, drained)
	served(t, done)
}

// Connections the http.Server closed from outside during a move that then
// fails at the deadline are reported closed, not cut: the cut found them
// before their Read had counted them. Found by a review.
func TestHTTPServerCloseDuringAFailedMoveIsNotACut(t *testing.T) {
	const n = 10
	h := &heldMover{entered: make(chan struct{}), release: make(chan struct{})} // fails
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, drained, done := closeDuringMove(t, ctx, n, h)
	<-ctx.Done() // bounded by its deadline
	close(h.release)
	rep := waitReport(t, drained)
	served(t, done)
	assert.Zero(t, rep.Cut, "report %+v", rep)
	assert.Equal(t, n, rep.ClosedAfterResponse, "report %+v", rep)
}
