package server

import (
	"net"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A connection moved in from the previous generation is idle: its client has
// sent nothing since its last answer, and may send nothing for minutes. Rather
// than hand it to net/http at once (a goroutine that grows its stack, 8 KiB of
// buffers, a context: 24 µs of CPU and 11 KiB a connection with 10,000 of
// them), the server parks it: a small goroutine waits in the runtime's poller
// for its first bytes, or its end, and only then gives it to net/http, through
// the unpark listener that this server serves. While parked, a connection moves
// on to the next generation without waking net/http (moveIdle), and closes at
// IdleTimeout from its move, as steady state would close it; a drain closes it
// when quiet (closeQuiet) or cuts it (closeAll) like any idle connection.

// parkState says who owns a parked connection.
type parkState uint8

const (
	notParked  parkState = iota // net/http serves it, or it is gone
	parked                      // its park goroutine waits for its first bytes
	parkMoving                  // moveIdle is sending it to the next generation
)

// park parks c, just accepted from a moved-connections listener. It reports
// false when c cannot wait in the poller, or unparked connections are no
// longer served (the server stopped with none parked): the caller then gives
// it to net/http.
func (s *Server) park(c *conn) bool {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return false
	}
	rc, err := sc.SyscallConn()
	if err != nil || c.Conn.SetReadDeadline(time.Now().Add(s.srv.IdleTimeout)) != nil {
		return false
	}
	s.mu.Lock()
	if s.unparkOver {
		s.mu.Unlock()
		return false
	}
	if s.unparked == nil {
		// Served from the first park, so that the http.Server's Close and
		// Shutdown reach it (see unparkListener.Close).
		s.unparked = &unparkListener{s: s, c: make(chan net.Conn, 64), done: make(chan struct{}), addr: c.LocalAddr()}
		go s.srv.Serve(s.unparked)
	}
	s.parkedN++
	c.mu.Lock()
	c.park = parked // in the same hold as the count: closeParked sees it
	c.mu.Unlock()
	s.mu.Unlock()
	go s.waitParked(c, rc)
	return true
}

// leftPark counts a connection out of parking: net/http took it, it moved on,
// or it closed. The last one out of a server that has stopped accepting ends
// the serving of unparked connections.
func (s *Server) leftPark() {
	s.mu.Lock()
	s.parkedN--
	var l *unparkListener
	if s.parkedN == 0 && s.stopped.Load() {
		l = s.unparkOverLocked() // in the same hold as the count: no park slips in
	}
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
}

// unparkOverLocked ends the serving of unparked connections (nothing parks
// from now on) and returns the listener to close once s.mu is released.
func (s *Server) unparkOverLocked() *unparkListener {
	s.unparkOver = true
	return s.unparked
}

// waitParked waits until c has bytes to read (a request, or its end), then
// gives it to net/http; at IdleTimeout it closes it. A move or a close meanwhile
// takes it from here.
func (s *Server) waitParked(c *conn, rc syscall.RawConn) {
	err := rc.Read(func(fd uintptr) bool {
		return readable(int(fd)) // if not, wait for the poller to say so; read nothing
	})
	c.mu.Lock()
	switch {
	case c.park == parkMoving:
		c.parkWoke = true // the move decides (endParkedMove)
		c.mu.Unlock()
		return
	case c.park != parked:
		c.mu.Unlock() // moved on (endParkedMove counted it out)
		return
	case c.closed:
		c.park = notParked // closed by the drain, or net/http's Close
		c.mu.Unlock()
		s.leftPark()
		return
	}
	c.park = notParked
	if err != nil {
		// Its idle timeout: closed as net/http would close an idle
		// connection (or the descriptor failed).
		c.closed, c.closedIdle = true, true
		c.mu.Unlock()
		c.Conn.Close()
		s.forget(c)
		s.leftPark()
		return
	}
	c.mu.Unlock()
	s.unpark(c)
}

// closeParked closes every parked connection, as net/http's Close and
// Shutdown close idle ones: for a Server whose http.Server is closed from
// outside (see listener.Close).
func (s *Server) closeParked() {
	s.mu.Lock()
	var closed []*conn
	for c := range s.conns {
		c.mu.Lock()
		if c.park == parked && !c.closed {
			c.closed = true
			c.Conn.Close() // its park goroutine wakes, and counts it out
			closed = append(closed, c)
		}
		c.mu.Unlock()
	}
	s.mu.Unlock()
	for _, c := range closed {
		s.forget(c)
	}
}

// readable reports whether a read of fd would not block: bytes, their end, or
// an error wait there. It takes nothing.
func readable(fd int) bool {
	var b [1]byte
	for {
		_, _, err := unix.Recvfrom(fd, b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		if err != unix.EINTR {
			return err != unix.EAGAIN
		}
	}
}

// takeParked claims a parked connection for a move: its descriptor, or -1 if
// it is not parked. endParkedMove gives the outcome.
func (c *conn) takeParked() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.park != parked || c.closed {
		return -1
	}
	fd := c.fd()
	if fd >= 0 {
		c.park = parkMoving
	}
	return fd
}

// endParkedMove ends a move that takeParked began: moved, the connection is
// closed here (which sends no FIN) and forgotten; otherwise it is parked again,
// with a new park goroutine if the old one woke meanwhile (bytes came).
func (s *Server) endParkedMove(c *conn, moved bool) {
	c.mu.Lock()
	if moved {
		c.park, c.moved, c.closed, c.movable = notParked, true, true, false
		c.mu.Unlock()
		c.Conn.Close() // its park goroutine wakes and leaves
		s.forget(c)
		s.leftPark()
		return
	}
	c.park = parked
	woke := c.parkWoke
	c.parkWoke = false
	c.mu.Unlock()
	if woke {
		rc, _ := c.Conn.(syscall.Conn).SyscallConn() // parked: it has one
		go s.waitParked(c, rc)                       // readable: it unparks at once
	}
}

// unpark gives c to net/http through the unpark listener, served from the
// first park until no connection is parked in a server that has stopped
// accepting, or the end of its drain, or the http.Server's Close.
func (s *Server) unpark(c *conn) {
	s.mu.Lock()
	l := s.unparked // set at the first park
	s.mu.Unlock()
	select {
	case l.c <- c:
		select {
		case <-l.done:
			l.closeQueued() // Close ran meanwhile
		default:
		}
	case <-l.done:
		c.Close() // the http.Server was closed: nobody answers it
		s.leftPark()
	}
}

// closeUnparked stops serving unparked connections, if none is parked when
// ifNone (a server that stops accepting parks nothing more); nothing parks
// from then on.
func (s *Server) closeUnparked(ifNone bool) {
	s.mu.Lock()
	var l *unparkListener
	if !ifNone || s.parkedN == 0 {
		l = s.unparkOverLocked() // in the same hold as the count: no park slips in
	}
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
}

// unparkListener yields the connections unparked to net/http.
type unparkListener struct {
	s    *Server
	c    chan net.Conn
	done chan struct{}
	once sync.Once
	addr net.Addr
}

func (l *unparkListener) Accept() (net.Conn, error) {
	select {
	case <-l.done: // closed: refuse for certain, not as one of two ready cases
		return nil, net.ErrClosed
	default:
	}
	select {
	case c := <-l.c:
		l.s.leftPark() // net/http has it
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

// Close stops Accept; a connection still queued is closed. Closed by the
// http.Server (its Close or Shutdown), not by this package, it also closes
// every parked connection, as net/http closes its idle ones: none could be
// served any more.
func (l *unparkListener) Close() error {
	first := false
	l.once.Do(func() {
		close(l.done)
		first = true
	})
	if !first {
		return nil
	}
	l.s.mu.Lock()
	fromOutside := !l.s.unparkOver
	l.s.unparkOver = true
	l.s.mu.Unlock()
	l.closeQueued() // outside the Once: a last leftPark here may close it again
	if fromOutside {
		l.s.closeParked()
	}
	return nil
}

func (l *unparkListener) closeQueued() {
	for {
		select {
		case c := <-l.c:
			c.Close()
			l.s.leftPark()
		default:
			return
		}
	}
}

func (l *unparkListener) Addr() net.Addr { return l.addr }
