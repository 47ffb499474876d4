package server

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// conn is a connection the server tracks from Accept to Close.
type conn struct {
	net.Conn
	s *Server

	lastRead atomic.Int64 // unix nanoseconds of the last read that returned bytes

	mu     sync.Mutex
	st     http.ConnState
	since  time.Time // when st began
	closed bool

	// Moving to the next generation (move.go).
	movable         bool                  // a plain connection whose bytes net/http alone reads
	stealing        atomic.Pointer[steal] // a move is asked for: the read deadline is held back
	offering        bool                  // its Read is answering the move right now
	closeAfterOffer bool                  // Close came while offering: answer closes it
	moved           bool                  // it moved: its close here shuts nothing down
	http2           bool                  // it speaks HTTP/2: it drains with GOAWAY
	closedIdle      bool                  // the drain closed it, idle
	fromMove        bool                  // moved here from the previous generation (see SetReadDeadline)
	http2At         time.Time             // when it became HTTP/2
	toldAway        bool                  // sent GOAWAY
	calledOff       atomic.Bool           // a move was called off from the drain's side
	readDeadline    time.Time             // the one net/http asked for

	// Parked outside net/http until its first bytes (park.go): Conn is nil
	// until then.
	park     parkState
	parking  *parking // while parked (or moving from the parker)
	parkWoke bool     // its bytes came during a move (endParkedMove)
}

// ReadFrom keeps sendfile(2) for net/http's file responses.
func (c *conn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

// CloseWrite lets net/http half-close, as it does on a plain *net.TCPConn.
func (c *conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// Close is called by net/http, or by the application for a hijacked
// connection, or by the http.Server's Close from outside. While the
// connection is offered to a move its descriptor may be on its way to the
// next generation: answer closes it once the move is decided, so that its
// number is not reused meanwhile (and another file sent).
func (c *conn) Close() error {
	c.mu.Lock()
	c.closed = true
	if c.offering {
		c.closeAfterOffer = true
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	err := c.Conn.Close()
	c.s.forget(c)
	return err
}

func (c *conn) isHTTP2() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.http2
}

// NetConn returns the connection accepted from the listener, as *tls.Conn and
// other wrappers do, for libraries that reach for it (hijacked connections).
// For a connection moved in from the previous generation (see DrainTo) it is
// not a *net.TCPConn but a net.Conn on the descriptor received, with the
// socket options the connection was accepted with.
func (c *conn) NetConn() net.Conn { return c.Conn }

// SyscallConn gives the descriptor, as *net.TCPConn does.
func (c *conn) SyscallConn() (syscall.RawConn, error) {
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return nil, errors.New("server: connection has no descriptor")
	}
	return sc.SyscallConn()
}

func (c *conn) hasMoved() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.moved
}

func (c *conn) setState(st http.ConnState) {
	var now time.Time
	if st == http.StateIdle || st == http.StateNew {
		now = time.Now() // only waiting for a request is timed (closeIfQuiet)
	}
	c.mu.Lock()
	c.st = st
	if !now.IsZero() {
		c.since = now
	}
	c.mu.Unlock()
}

func (c *conn) state() http.ConnState {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.st
}

// closeIfQuiet closes the connection if it waits for a request (idle, or new),
// has been quiet for grace since max(its last state change, drainStart) (with
// a negative grace: for idleTimeout since its last state change, as steady
// state would), and no request bytes have arrived: neither read by net/http nor
// waiting in the socket.
func (c *conn) closeIfQuiet(now, drainStart time.Time, grace, idleTimeout time.Duration) (closed, wasParked bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.moved || c.park == parkMoving {
		return false, false // closing on its own (forget removes it), moved, or moving
	}
	if c.st != http.StateIdle && c.st != http.StateNew {
		return false, false
	}
	quiet := c.since
	if grace < 0 {
		grace = idleTimeout
	} else if drainStart.After(quiet) {
		quiet = drainStart
	}
	if now.Sub(quiet) < grace || c.lastRead.Load() >= c.since.UnixNano() || c.pendingLocked() {
		return false, false
	}
	c.closedIdle = true
	return true, c.closeLocked()
}

// pendingLocked reports whether request bytes wait in c's socket, parked or
// not; c.mu is held.
func (c *conn) pendingLocked() bool {
	if c.park == parked {
		return pendingFD(c.parking.fd)
	}
	return pending(c.Conn)
}

// closeLocked closes c, parked or not; c.mu is held. It reports whether c was
// parked (the caller counts it out of parking).
func (c *conn) closeLocked() (wasParked bool) {
	if c.park == parked {
		c.s.closeParkedLocked(c)
		return true
	}
	c.closed = true
	if c.Conn != nil {
		c.Conn.Close()
	}
	return false
}

func (c *conn) wasClosedIdle() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closedIdle
}

// cut closes the connection at the drain deadline, whatever it is doing; it
// reports whether it was parked (the caller counts it out), had moved (its
// Read had yet to close this copy: the move counted it), or was closed
// already (by net/http, or from outside during its move: forget had yet to
// count it).
func (c *conn) cut() (wasParked, wasMoved, wasClosed bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	wasClosed = c.closed
	if c.closeLocked() {
		return true, false, false
	}
	return false, c.moved, wasClosed
}

// pending reports whether bytes wait to be read on nc's socket, without taking
// them and without blocking.
func pending(nc net.Conn) bool {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	p := false
	// Control, not Read: net/http's reader holds the read lock while it waits.
	raw.Control(func(fd uintptr) { p = pendingFD(int(fd)) })
	return p
}

// pendingFD is pending for a bare descriptor.
func pendingFD(fd int) bool {
	var buf [1]byte
	n, _, _ := unix.Recvfrom(fd, buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
	return n > 0
}

// responseWriter adds "Connection: close" to answers given while draining.
type responseWriter struct {
	http.ResponseWriter
	s           *Server
	h1          bool // HTTP/1.x: "Connection: close" applies (HTTP/2 drains with GOAWAY)
	wroteHeader bool
	hijacked    bool
}

func (w *responseWriter) beforeHeader() {
	if w.wroteHeader {
		return
	}
	w.wroteHeader = true
	if w.h1 && w.s.draining.Load() {
		w.Header().Set("Connection", "close")
	}
}

func (w *responseWriter) WriteHeader(code int) {
	switch {
	case code == http.StatusSwitchingProtocols:
		w.wroteHeader = true // the connection is handed over, not closed
	case code >= 200:
		w.beforeHeader()
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(b []byte) (int, error) {
	w.beforeHeader()
	return w.ResponseWriter.Write(b)
}

// Flush, Hijack and Unwrap keep the optional interfaces of the writer net/http
// gave us reachable, directly and through http.ResponseController.
func (w *responseWriter) Flush() {
	w.beforeHeader()
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// FlushError is Flush with its error, for http.ResponseController.
func (w *responseWriter) FlushError() error {
	w.beforeHeader()
	return http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *responseWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := w.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, errors.New("server: response writer cannot hijack")
	}
	c, rw, err := h.Hijack()
	if err == nil {
		w.wroteHeader, w.hijacked = true, true
	}
	return c, rw, err
}

// ReadFrom keeps net/http's sendfile path for io.Copy into the response.
func (w *responseWriter) ReadFrom(r io.Reader) (int64, error) {
	w.beforeHeader()
	if rf, ok := w.ResponseWriter.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{w.ResponseWriter}, r)
}

func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
