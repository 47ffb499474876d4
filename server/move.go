package server

import (
	"context"
	"io"
	"net"
	"net/http"
	"syscall"
	"time"
)

// A Mover carries connections to the next generation of the server, which
// serves them as if it had accepted them (package upgrader's Upgrader.Mover).
// One that also has a method Moves() bool reporting false moves nothing:
// DrainTo then keeps idle connections as steady state would, and its answers
// close their connections (a next generation that takes none).
type Mover interface {
	// Move passes the descriptors (at most MaxMoveBatch) in one message; on
	// success the receiver owns its own copies of every one of them, and the
	// caller's copies may be closed without shutting the connections down.
	Move(fds []int) error
}

// MaxMoveBatch is the most descriptors a Mover is given at once (the kernel's
// SCM_MAX_FD is 253).
const MaxMoveBatch = 250

// stealWait bounds how long a drain waits for the idle connections it asked to
// move to answer: each is only waiting in a read, which ends at once.
const stealWait = time.Second

// httpReadBuf is net/http's read buffer size (bufio.NewReader's default). A
// read of the next request that asks for all of it finds net/http's buffer
// empty: the connection is at a request boundary with nothing consumed.
const httpReadBuf = 4096

// steal is one drain's request that idle connections move.
type steal struct {
	offers chan offer
	done   chan struct{} // closed when the drain stops waiting for offers
}

// offer is a connection's answer to a steal: fd is -1 when it cannot move.
// A parked connection's has no result channel (see endParkedMove).
type offer struct {
	c      *conn
	fd     int
	result chan bool // true: moved; false: stay (fall back)
}

// requestMove asks c, if it waits for a request and is a plain connection, to
// move: its read is interrupted (a deadline in the past) and its Read answers
// the steal. It reports whether it asked.
func (c *conn) requestMove(st *steal) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.park != notParked || c.stealing.Load() != nil || !c.movable || (c.st != http.StateIdle && c.st != http.StateNew) {
		return false
	}
	c.stealing.Store(st)
	c.Conn.SetReadDeadline(time.Unix(1, 0))
	return true
}

// SetReadDeadline and SetDeadline keep net/http's deadlines, which a move in
// progress holds back until it is over.
func (c *conn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.fromMove && c.lastRead.Load() == 0 && !t.IsZero() {
		// A moved keep-alive connection waits for its next request as long as
		// steady state lets an idle one wait, not ReadHeaderTimeout, which
		// net/http gives a connection it takes for new; the header timeout
		// starts at its first byte (see Read).
		t = time.Now().Add(c.s.srv.IdleTimeout)
	}
	c.readDeadline = t
	if c.stealing.Load() != nil {
		return nil
	}
	return c.Conn.SetReadDeadline(t)
}

func (c *conn) SetDeadline(t time.Time) error {
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.SetReadDeadline(t)
}

// endSteal gives the connection its own read deadline back after its answer
// to st; it stays here. A late answer to an earlier pass's steal ends nothing:
// the next pass's steal waits for its own answer.
func (c *conn) endSteal(st *steal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stealing.Load() == st {
		c.stealing.Store(nil)
		c.movable = false
		c.Conn.SetReadDeadline(c.readDeadline)
	}
}

// cancelSteal is endSteal from the drain's side, for a connection that did not
// answer in time (its goroutine was not scheduled): only if its Read is not
// answering right now. It may be asked again at the next pass.
func (c *conn) cancelSteal(st *steal) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stealing.Load() == st && !c.offering {
		c.stealing.Store(nil)
		c.calledOff.Store(true) // its Read may still see the move's deadline
		c.Conn.SetReadDeadline(c.readDeadline)
	}
}

// Read reads for net/http. While a move is asked for, it decides: bytes that
// arrived first are served here (the move is off); a read interrupted with
// nothing consumed, and net/http's buffer empty, offers the connection; if it
// moved, net/http sees the end of the connection and closes its copy.
func (c *conn) Read(b []byte) (int, error) {
	for {
		n, err := c.Conn.Read(b)
		if n > 0 {
			first := c.fromMove && c.lastRead.Load() == 0
			c.lastRead.Store(time.Now().UnixNano())
			if first {
				c.headerDeadline()
			}
		}
		st := c.stealState()
		if st == nil {
			if n == 0 && err != nil && c.calledOff.Load() && isTimeout(err) && !c.deadlinePassed() {
				continue // the deadline of a move called off meanwhile, not net/http's
			}
			return n, err
		}
		if n > 0 || err == nil || !isTimeout(err) {
			c.answer(st, -1)
			return n, err
		}
		if !c.offerable(len(b)) {
			c.answer(st, -1)
			continue // read again, with net/http's own deadline
		}
		if c.answer(st, c.fd()) {
			return 0, io.EOF
		}
	}
}

// headerDeadline gives a moved connection's first request the header timeout
// from its first byte, as net/http does for an idle keep-alive connection.
func (c *conn) headerDeadline() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.readDeadline = time.Now().Add(c.s.srv.ReadHeaderTimeout)
	if c.stealing.Load() == nil {
		c.Conn.SetReadDeadline(c.readDeadline)
	}
}

// deadlinePassed reports whether net/http's own read deadline has passed.
func (c *conn) deadlinePassed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return !c.readDeadline.IsZero() && !time.Now().Before(c.readDeadline)
}

// stealState is read on every Read: lock-free (written under mu).
func (c *conn) stealState() *steal { return c.stealing.Load() }

// offerable reports whether the connection waits for a request with nothing
// of it read here, for a read of n bytes that found no data. A new connection
// qualifies if nothing was ever read from it (whatever net/http asks for: its
// first read may be a short peek for the HTTP/2 preface); an idle one if the
// read asks for all of net/http's buffer, which is then empty.
func (c *conn) offerable(n int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch c.st {
	case http.StateNew:
		return c.lastRead.Load() == 0
	case http.StateIdle:
		return n >= httpReadBuf
	}
	return false
}

// answer tells the drain whether c can move (fd >= 0) and, if so, waits for
// the outcome. On any outcome but "moved" the connection stays and gets its
// own deadline back.
func (c *conn) answer(st *steal, fd int) bool {
	c.mu.Lock()
	if c.closed {
		fd = -1 // closed since fd was looked up: the number may be another file's now
	}
	c.offering = true
	c.mu.Unlock()
	o := offer{c: c, fd: fd, result: make(chan bool, 1)}
	moved := false
	select {
	case st.offers <- o:
		if fd >= 0 {
			moved = <-o.result
		}
	case <-st.done:
	}
	c.mu.Lock()
	c.offering = false
	c.moved = moved
	closed := c.closeAfterOffer // Close came meanwhile (see Close)
	c.closeAfterOffer = false
	if moved {
		// The new generation has it: this process must never read from it
		// again, whatever net/http tries next (with h2c on, it reads a new
		// connection again after the preface's peek). Closing this copy
		// sends no FIN; with the steal over, a later Read only fails, and
		// answers no offer (which would undo c.moved and count it twice).
		c.Conn.Close()
		c.stealing.Store(nil)
		c.movable = false // and no later pass asks again
	}
	c.mu.Unlock()
	if closed && !moved {
		c.Conn.Close()
	}
	if !moved {
		c.endSteal(st)
	}
	if closed {
		c.s.forget(c)
	}
	return moved
}

// fd is the connection's descriptor, valid until it is closed.
func (c *conn) fd() int {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return -1
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	fd := -1
	raw.Control(func(f uintptr) { fd = int(f) })
	return fd
}

// isTimeout reports a deadline's error (net/http's reads give *net.OpError,
// itself a net.Error: no unwrapping needed).
func isTimeout(err error) bool {
	ne, ok := err.(net.Error)
	return ok && ne.Timeout()
}

// hotChunk is how many connections used lately (s.hot) a pass asks to move at
// least: 64 per 5 ms pass, 10,000 busy keep-alive connections in under a second.
const hotChunk = 64

// moveIdle moves connections waiting for a request to the next generation, in
// batches; those that cannot move stay. First every one used lately (s.hot:
// its client is likely to send again soon, and should send to the next
// generation), then others up to limit. It stops looking at connections once
// it has found limit: a pass costs nothing per connection left. It returns how
// many moved, and whether a move failed.
func (s *Server) moveIdle(ctx context.Context, m Mover, limit int) (moved int, failed bool) {
	st := &steal{offers: make(chan offer), done: make(chan struct{})}
	s.mu.Lock()
	var asked []*conn
	var parkedFds []offer            // parked: no goroutine to ask, the descriptor is at hand
	hotLimit := max(limit, hotChunk) // used lately: faster than MoveRate, but not all in one pass
	for c := range s.hot {
		if len(asked) >= hotLimit {
			break
		}
		if c.requestMove(st) {
			asked = append(asked, c)
		}
	}
	for c := range s.conns {
		if len(asked)+len(parkedFds) >= limit {
			break
		}
		if fd := c.takeParked(); fd >= 0 {
			parkedFds = append(parkedFds, offer{c: c, fd: fd})
		} else if c.requestMove(st) {
			asked = append(asked, c)
		}
	}
	s.mu.Unlock()
	if len(asked)+len(parkedFds) == 0 {
		return 0, false
	}
	var batch []offer
	flush := func() {
		if len(batch) == 0 {
			return
		}
		fds := make([]int, len(batch))
		for i, o := range batch {
			fds[i] = o.fd
		}
		// After a failure, or past the drain's deadline, the rest of the pass
		// stays: a failing Move may take a while each time.
		ok := !failed && ctx.Err() == nil && m.Move(fds) == nil
		if ok {
			moved += len(batch)
		} else {
			failed = true
		}
		for _, o := range batch {
			if o.result == nil {
				s.endParkedMove(o.c, ok)
				continue
			}
			if ok {
				// Counted as moved from now on, not as cut or closed idle
				// if the drain ends before its Read closes it.
				o.c.mu.Lock()
				o.c.moved = true
				o.c.mu.Unlock()
			}
			o.result <- ok
		}
		batch = batch[:0]
	}
	add := func(o offer) {
		batch = append(batch, o)
		if len(batch) == MaxMoveBatch {
			flush()
		}
	}
	for _, o := range parkedFds {
		add(o)
	}
	timeout := time.NewTimer(stealWait)
	defer timeout.Stop()
	for answered := 0; answered < len(asked); {
		select {
		case o := <-st.offers:
			answered++
			if o.fd >= 0 {
				add(o)
			}
			continue
		case <-timeout.C:
		case <-ctx.Done(): // the drain's deadline: it cuts what is left
		}
		break
	}
	flush()
	close(st.done)
	for _, c := range asked {
		c.cancelSteal(st)
	}
	return moved, failed
}
