package server

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/handoff-dev/handoff/internal/moved"
)

// parkedCount is how many of s's connections wait parked.
func parkedCount(s *Server) int {
	s.init()
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		c.mu.Lock()
		if c.park == parked {
			n++
		}
		c.mu.Unlock()
	}
	return n
}

// movedServer is startMoved with a server of one's own making: s serves a
// moved-connections listener that the returned Mover feeds.
func movedServer(t *testing.T, s *Server) *pairMover {
	t.Helper()
	m, done := serveMoved(s)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Drain(ctx)
		served(t, done)
	})
	return m
}

// served waits, 10 s at most, for Serve to return, and gives its error.
func served(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
		return nil
	}
}

// serveMoved serves s on a new moved-connections listener that the returned
// Mover feeds; done has Serve's result. The test ends s itself.
func serveMoved(s *Server) (m *pairMover, done <-chan error) {
	ml := moved.New(&net.TCPAddr{})
	d := make(chan error, 1)
	go func() { d <- s.Serve(ml) }()
	return &pairMover{to: ml}, d
}

// countNew counts the connections net/http took (ConnState new).
func countNew(n *atomic.Int64) func(net.Conn, http.ConnState) {
	return func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			n.Add(1)
		}
	}
}

// moveTo opens n used connections to a new server "old" and drains it into m:
// they are then idle in the next generation.
func moveTo(t *testing.T, m Mover, n int) []*rawConn {
	t.Helper()
	a, addr := start(t, whoHandler("old"), time.Hour)
	clients := dialUsed(t, addr, n)
	eventually(t, func() bool { return idleCount(a) == n }, "idle connections")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := a.DrainTo(ctx, m)
	require.NoError(t, err)
	require.Equal(t, n, rep.Moved)
	return clients
}

// Idle connections moved in wait parked, without net/http, until their
// clients send; then net/http serves them.
func TestMovedIdleConnectionsWaitParked(t *testing.T) {
	var taken atomic.Int64
	b := &Server{HTTP: &http.Server{Handler: whoHandler("new"), ConnState: countNew(&taken)}}
	clients := moveTo(t, movedServer(t, b), 20)
	eventually(t, func() bool { return parkedCount(b) == 20 }, "20 parked connections")
	assert.Zero(t, taken.Load(), "connections net/http took before any request")
	for i, c := range clients {
		body, closing := c.get(t)
		assert.Equal(t, "new", body, "client %d", i)
		assert.False(t, closing, "client %d", i)
	}
	assert.Zero(t, parkedCount(b))
	assert.EqualValues(t, 20, taken.Load())
	eventually(t, func() bool { return idleCount(b) == 20 }, "20 idle connections, served")
}

// Parked connections move on to the next generation without net/http ever
// taking them here.
func TestParkedConnectionsMoveOn(t *testing.T) {
	var taken atomic.Int64
	b := &Server{HTTP: &http.Server{Handler: whoHandler("b"), ConnState: countNew(&taken)}}
	clients := moveTo(t, movedServer(t, b), 20)
	eventually(t, func() bool { return parkedCount(b) == 20 }, "20 parked connections")
	_, toC := startMoved(t, "c")

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rep, err := b.DrainTo(ctx, toC)
	require.NoError(t, err)
	assert.Equal(t, 20, rep.Moved)
	assert.Zero(t, rep.ClosedIdle+rep.ClosedAfterResponse+rep.Cut, "report %+v", rep)
	assert.Zero(t, taken.Load(), "connections net/http took in the middle generation")
	for i, c := range clients {
		body, _ := c.get(t)
		assert.Equal(t, "c", body, "client %d", i)
	}
}

// Parked connections hold no goroutine each: one watches them all.
func TestParkedConnectionsHoldNoGoroutine(t *testing.T) {
	b := &Server{Handler: whoHandler("new")}
	clients := moveTo(t, movedServer(t, b), 200)
	eventually(t, func() bool { return parkedCount(b) == 200 }, "200 parked connections")
	// The old generation's goroutines end once its drain has returned.
	eventually(t, func() bool { return runtime.NumGoroutine() < 100 }, "fewer goroutines than parked connections")
	body, _ := clients[0].get(t)
	assert.Equal(t, "new", body)
}

// openFDs is how many descriptors this process has open.
func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	return len(es)
}

// A parked connection whose client resets it, or closes it, leaves nothing
// behind: neither its descriptor nor its tracking; the others stay parked.
func TestParkedConnectionsWhoseClientsLeave(t *testing.T) {
	b := &Server{Handler: whoHandler("new")}
	clients := moveTo(t, movedServer(t, b), 3)
	eventually(t, func() bool { return parkedCount(b) == 3 }, "3 parked connections")
	before := openFDs(t)
	require.NoError(t, clients[0].Conn.(*net.TCPConn).SetLinger(0))
	clients[0].Close() // a reset
	clients[1].Close() // a FIN
	// Each client's descriptor and the server's copy of each.
	eventually(t, func() bool { return openFDs(t) <= before-4 }, "the server's descriptors of both closed")
	eventually(t, func() bool { return tracked(b) == 1 }, "both forgotten")
	assert.Equal(t, 1, parkedCount(b))
	body, _ := clients[2].get(t)
	assert.Equal(t, "new", body)
}

// A parked connection closes at IdleTimeout from its move, as steady state
// would close an idle one.
func TestParkedConnectionClosesAtIdleTimeout(t *testing.T) {
	b := &Server{Handler: whoHandler("new"), IdleTimeout: 200 * time.Millisecond}
	clients := moveTo(t, movedServer(t, b), 1)
	_, err := clients[0].br.ReadByte() // bounded by rawDial's deadline
	assert.ErrorIs(t, err, io.EOF, "the server closed it")
	eventually(t, func() bool { return tracked(b) == 0 }, "forgotten")
}

// A stop (Drain, no next generation): parked connections that stay quiet
// close after IdleGrace; a request on one is answered, with Connection: close.
func TestDrainWithParkedConnections(t *testing.T) {
	t.Run("quiet", func(t *testing.T) {
		b := &Server{Handler: whoHandler("new")}
		moveTo(t, movedServer(t, b), 5)
		eventually(t, func() bool { return parkedCount(b) == 5 }, "5 parked connections")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		rep, err := b.Drain(ctx)
		require.NoError(t, err)
		assert.Equal(t, 5, rep.ClosedIdle, "report %+v", rep)
	})
	t.Run("a request", func(t *testing.T) {
		b := &Server{Handler: whoHandler("new"), IdleGrace: time.Hour}
		clients := moveTo(t, movedServer(t, b), 1)
		eventually(t, func() bool { return parkedCount(b) == 1 }, "parked")
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		drained := drainAsync(b, ctx)
		eventually(t, func() bool { return b.Draining() }, "draining")
		body, closing := clients[0].get(t)
		assert.Equal(t, "new", body)
		assert.True(t, closing, "answered with Connection: close")
		rep := waitReport(t, drained)
		assert.Equal(t, 1, rep.ClosedAfterResponse, "report %+v", rep)
	})
}

// heldMover holds every Move until released, then fails it or moves on.
type heldMover struct {
	next     Mover // nil: fail
	entered  chan struct{}
	release  chan struct{}
	entering atomic.Bool
}

func (h *heldMover) Move(fds []int) error {
	if h.entering.CompareAndSwap(false, true) {
		close(h.entered)
	}
	select {
	case <-h.release:
	case <-time.After(10 * time.Second): // the test failed before releasing it
	}
	if h.next == nil {
		return errors.New("refused")
	}
	return h.next.Move(fds)
}

// parkWoke reports whether a parked connection of s woke during its move.
func parkWoke(s *Server) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.mu.Lock()
		w := c.parkWoke
		c.mu.Unlock()
		if w {
			return true
		}
	}
	return false
}

// sendDuringMove waits for h's first Move, then has c send: its request
// comes while its parked connection is being moved, and the parker sees it.
func sendDuringMove(t *testing.T, b *Server, h *heldMover, c *rawConn) {
	t.Helper()
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no move began")
	}
	c.send(t)
	eventually(t, func() bool { return parkWoke(b) }, "the parker to see the request")
}

// A request that arrives while its parked connection is being moved is
// answered once: by the next generation if the move succeeds (the bytes went
// with it, unread), by this one if it fails.
func TestRequestDuringAParkedMove(t *testing.T) {
	for _, moves := range []bool{true, false} {
		name, want := "fails", "b"
		if moves {
			name, want = "moves", "c"
		}
		t.Run(name, func(t *testing.T) {
			b := &Server{Handler: whoHandler("b"), IdleGrace: time.Hour}
			clients := moveTo(t, movedServer(t, b), 1)
			eventually(t, func() bool { return parkedCount(b) == 1 }, "parked")
			h := &heldMover{entered: make(chan struct{}), release: make(chan struct{})}
			if moves {
				_, h.next = startMoved(t, "c")
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			drained := drainToAsync(b, ctx, h)
			sendDuringMove(t, b, h, clients[0])
			close(h.release)
			body, _ := clients[0].read(t)
			assert.Equal(t, want, body)
			cancel() // a failed move leaves the connection until the deadline
			waitReport(t, drained)
		})
	}
}

// unparkServing reports whether s still serves unparked connections.
func unparkServing(s *Server) bool {
	s.mu.Lock()
	l := s.unparked
	s.mu.Unlock()
	if l == nil {
		return false
	}
	select {
	case <-l.done:
		return false
	default:
		return true
	}
}

// A server that stops accepting and is never drained stops serving unparked
// connections once none is parked: nothing is left running (goleak, at the
// end of the package, checks the goroutine too).
func TestUnparkedServingEndsWithoutADrain(t *testing.T) {
	b := &Server{Handler: whoHandler("new")}
	m, done := serveMoved(b)
	clients := moveTo(t, m, 2)
	eventually(t, func() bool { return parkedCount(b) == 2 }, "2 parked connections")
	body, _ := clients[0].get(t) // unparked: net/http serves it
	require.Equal(t, "new", body)
	b.StopAccepting()
	require.ErrorIs(t, served(t, done), ErrDraining)
	assert.True(t, unparkServing(b), "one connection is still parked: its request must find net/http")
	body, _ = clients[1].get(t)
	assert.Equal(t, "new", body)
	eventually(t, func() bool { return !unparkServing(b) }, "the unpark listener closed once none is parked")
	for _, c := range clients {
		c.Close()
	}
	eventually(t, func() bool { return tracked(b) == 0 }, "no connection left")
}

// Closing the http.Server from outside closes the parked connections, as it
// closes net/http's idle ones.
func TestHTTPServerCloseClosesParkedConnections(t *testing.T) {
	hs := &http.Server{Handler: whoHandler("new")}
	b := &Server{HTTP: hs}
	m, done := serveMoved(b)
	clients := moveTo(t, m, 1)
	eventually(t, func() bool { return parkedCount(b) == 1 }, "parked")
	require.NoError(t, hs.Close())
	served(t, done)
	_, err := clients[0].br.ReadByte() // bounded by rawDial's deadline
	assert.ErrorIs(t, err, io.EOF, "closed by the server")
	eventually(t, func() bool { return tracked(b) == 0 }, "forgotten")
	assert.False(t, unparkServing(b))
}

// queuedUnparked is how many unparked connections wait for net/http.
func queuedUnparked(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unparked == nil {
		return 0
	}
	return len(s.unparked.c)
}

func unparkOver(s *Server) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unparkOver
}

// oneQueued parks two connections in a server over hs, whose stalled accept
// loop takes the first when it sends; the second then waits in the queue.
func oneQueued(t *testing.T, hs *http.Server, entered <-chan struct{}) (*Server, <-chan error) {
	t.Helper()
	b := &Server{HTTP: hs}
	m, done := serveMoved(b)
	clients := moveTo(t, m, 2)
	eventually(t, func() bool { return parkedCount(b) == 2 }, "2 parked")
	queueUnparked(t, b, clients, entered)
	return b, done
}

// The end of serving unparked connections, with one still queued for
// net/http: the drain that cut it returns (its close once re-entered the
// listener's Close and hung), and so does the http.Server's Close after
// StopAccepting.
func TestUnparkedQueueAtTheEnd(t *testing.T) {
	t.Run("drain cut", func(t *testing.T) {
		hs, entered, open := stalledAt(t, 0)
		b, done := oneQueued(t, hs, entered)
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		drained := drainAsync(b, ctx)
		eventually(t, func() bool { return unparkOver(b) }, "the drain to end the unparked connections")
		open() // the http.Server's Close at the end of the drain waits for its accept loops
		waitReport(t, drained)
		served(t, done)
	})
	t.Run("http.Server Close", func(t *testing.T) {
		hs, entered, open := stalledAt(t, 0)
		b, done := oneQueued(t, hs, entered)
		b.StopAccepting()
		served(t, done)
		closed := make(chan struct{})
		go func() { hs.Close(); close(closed) }()
		eventually(t, func() bool { return unparkOver(b) }, "Close to reach the unpark listener")
		open()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Fatal("the http.Server's Close hung")
		}
	})
}

// The http.Server's Shutdown after StopAccepting closes parked connections
// too: nothing could answer them any more.
func TestHTTPServerShutdownAfterStopAcceptingClosesParked(t *testing.T) {
	hs := &http.Server{Handler: whoHandler("new")}
	b := &Server{HTTP: hs}
	m, done := serveMoved(b)
	clients := moveTo(t, m, 2)
	eventually(t, func() bool { return parkedCount(b) == 2 }, "2 parked")
	body, _ := clients[0].get(t)
	require.Equal(t, "new", body)
	b.StopAccepting()
	served(t, done)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, hs.Shutdown(ctx))
	_, err := clients[1].br.ReadByte() // bounded by rawDial's deadline
	assert.ErrorIs(t, err, io.EOF, "the parked connection closed, as net/http's idle ones")
	eventually(t, func() bool { return tracked(b) == 0 }, "forgotten")
}

// stalledAt is an http.Server whose accept loop stalls in ConnContext on the
// first connection it takes, until open is called (30 s at most); entered
// says when it stalls.
func stalledAt(t *testing.T, idle time.Duration) (hs *http.Server, entered <-chan struct{}, open func()) {
	t.Helper()
	gate := make(chan struct{})
	ent := make(chan struct{}, 1)
	var once sync.Once
	open = func() { once.Do(func() { close(gate) }) }
	t.Cleanup(open)
	hs = &http.Server{Handler: whoHandler("new"), IdleTimeout: idle, ConnContext: func(ctx context.Context, _ net.Conn) context.Context {
		select {
		case ent <- struct{}{}:
		default:
		}
		select {
		case <-gate:
		case <-time.After(30 * time.Second):
		}
		return ctx
	}}
	return hs, ent, open
}

// queueUnparked has clients send: the first stalls net/http's accept loop
// (a server over stalledAt), the others wait in the unpark listener's queue.
func queueUnparked(t *testing.T, b *Server, clients []*rawConn, entered <-chan struct{}) {
	t.Helper()
	clients[0].send(t)
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("net/http never took the first")
	}
	for _, c := range clients[1:] {
		c.send(t)
	}
	eventually(t, func() bool { return queuedUnparked(b) == len(clients)-1 }, "the others queued for net/http")
}

// With net/http's accept loop behind (its queue full), the parker goes on:
// a request sent well before its connection's idle deadline is answered,
// however late net/http takes it, and not closed at the deadline (the
// parker once waited for room in the queue, and then closed the connection
// as idle). Found by a review.
func TestParkedRequestWhileNetHTTPLags(t *testing.T) {
	const idle = 2 * time.Second
	hs, entered, open := stalledAt(t, idle)
	b := &Server{HTTP: hs}
	m := movedServer(t, b)
	const n = 1 + 64 + 1 + 1
	clients := moveTo(t, m, n)
	deadline := time.Now().Add(idle) // no parking's is later
	eventually(t, func() bool { return parkedCount(b) == n }, "all parked")
	queueUnparked(t, b, clients[:65], entered) // the queue (64) full
	// A third party's request: the queue has no room for it.
	clients[65].send(t)
	eventually(t, func() bool { return parkedCount(b) == 1 }, "only the victim parked")
	if time.Until(deadline) < idle/2 {
		t.Skip("too slow: the request would not be well before its idle deadline")
	}
	victim := clients[66]
	victim.send(t)
	eventually(t, func() bool { return parkedCount(b) == 0 }, "the victim unparked")
	<-time.After(time.Until(deadline) + 200*time.Millisecond) // past the idle deadline
	open()
	for i, c := range append(clients[:1:1], clients[65:]...) {
		body, _ := c.read(t)
		assert.Equal(t, "new", body, "client %d", i)
	}
}

// A request that comes during a failed move, with net/http's accept loop
// behind, does not hold the drain: its deadline still cuts what is left
// (the drain once waited for room in the queue). Found by a review.
func TestDrainCutsAtItsDeadlineWhileNetHTTPLags(t *testing.T) {
	hs, entered, open := stalledAt(t, 0)
	b := &Server{HTTP: hs, IdleGrace: time.Hour, MoveRate: -1}
	m := movedServer(t, b)
	const n = 1 + 64 + 1
	clients := moveTo(t, m, n)
	eventually(t, func() bool { return parkedCount(b) == n }, "all parked")
	queueUnparked(t, b, clients[:65], entered) // the queue (64) full
	// A Move that fails.
	h := &heldMover{entered: make(chan struct{}), release: make(chan struct{})}
	// Past the pass's wait for the queued connections to answer their move
	// (stealWait): nobody reads them.
	ctx, cancel := context.WithTimeout(context.Background(), stealWait+2*time.Second)
	defer cancel()
	drained := drainToAsync(b, ctx, h)
	sendDuringMove(t, b, h, clients[65])
	close(h.release)
	eventually(t, func() bool { return tracked(b) == 0 }, "every connection cut at the deadline")
	open()
	waitReport(t, drained)
}
