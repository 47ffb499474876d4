// Package server serves HTTP/1.1 and drains without losing a request.
//
// net/http's Shutdown is not enough for a handoff, where the listening socket
// lives on in the next process: a request read after Shutdown began is dropped
// without an answer (conn.serve returns right after readRequest), and idle
// keep-alive connections are closed at once, racing with a request the client has
// just sent on one. Shutdown also ignores hijacked connections such as WebSockets.
//
// Drain does it differently:
//
//   - it closes this process's listeners, and nothing else: connections already
//     accepted keep being served;
//   - every answer given while draining says "Connection: close", so a connection
//     is closed right after a response, never under a request in flight;
//   - an idle keep-alive connection (or a new one that has sent nothing) is closed
//     only once it has been quiet for IdleGrace since the drain began, and not if
//     request bytes have arrived on it;
//   - hijacked connections are tracked: hooks registered with RegisterOnDrain tell
//     them to leave, and the drain waits for them;
//   - at the deadline (the context's end) whatever remains is closed, and the
//     Report says so.
//
// The one loss HTTP/1.1 cannot rule out: a client that sends a request on an idle
// keep-alive connection at the very moment the server closes it after IdleGrace.
// RFC 9112 section 9.3.1 lets clients retry such a request when it is idempotent.
package server

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/handoff-dev/handoff/internal/moved"
)

// Defaults for the zero values of Server's fields.
const (
	DefaultReadHeaderTimeout = 10 * time.Second
	DefaultIdleTimeout       = 120 * time.Second
	DefaultIdleGrace         = 250 * time.Millisecond
	DefaultAfterCut          = time.Second
	DefaultMoveRate          = 1000
)

// warmWindow: a connection read from this recently when a drain begins is
// moved at once, not at MoveRate (see DrainTo).
var warmWindow = time.Second

// pollInterval is how often Drain looks at the connections it waits for.
const pollInterval = 5 * time.Millisecond

// Server serves HTTP on any number of listeners and drains them. The zero value
// with a Handler set is ready to use; a Server serves one lifetime: after Drain it
// serves no more.
type Server struct {
	// Handler answers requests; nil means http.DefaultServeMux.
	Handler http.Handler
	// ReadHeaderTimeout bounds reading a request's headers. Zero means
	// DefaultReadHeaderTimeout.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes keep-alive connections idle this long while serving.
	// Zero means DefaultIdleTimeout.
	IdleTimeout time.Duration
	// IdleGrace is how long an idle connection must stay quiet during a drain
	// before it is closed: time for a request already on its way to arrive.
	// Zero means DefaultIdleGrace.
	IdleGrace time.Duration
	// AfterCut bounds how long Drain waits, once its context has ended, for the
	// handlers still running (of requests it cut, whose contexts are then
	// cancelled, or of hijacked connections) to return. Zero means
	// DefaultAfterCut. Report.Running counts those that did not.
	AfterCut time.Duration
	// MoveRate is how many idle connections per second DrainTo moves to the
	// next generation, at most: each costs both processes some CPU (about
	// 29 µs in the draining one when net/http held it there, 10 if it waited
	// parked, and a few in the next, which parks it), and moving thousands
	// at once delays the requests being served meanwhile. The drain moves
	// faster when it must, to be done by half of its context's deadline.
	// The next upgrade waits for the drain: 10,000 idle connections at the
	// default rate hold it for 10 s. Zero means DefaultMoveRate; a negative
	// rate moves every idle connection at once.
	MoveRate int
	// Logger receives net/http's own error lines. Nil means none.
	Logger *slog.Logger
	// HTTP, if set, is the http.Server to serve with, and every one of its
	// fields is honoured (TLSConfig, Protocols, WriteTimeout, MaxHeaderBytes,
	// ConnContext, ErrorLog...), except that its Handler is wrapped, its
	// ConnState chained, and a zero ReadHeaderTimeout or IdleTimeout gets the
	// default above. Server takes it over: do not serve with it elsewhere. Nil
	// means one made of the fields above. Handler, ReadHeaderTimeout,
	// IdleTimeout and Logger are ignored when it is set.
	HTTP *http.Server

	initOnce sync.Once
	srv      *http.Server
	h2       *http.Server // holds net/http's HTTP/2 server: its Shutdown sends GOAWAY (see h2.go)

	initErr  error
	draining atomic.Bool
	stopped  atomic.Bool // StopAccepting was called, or a drain began
	inFlight atomic.Int64
	idle     chan struct{} // a token when inFlight drops to zero while draining
	answered atomic.Int64  // requests finished since the drain began

	serving sync.WaitGroup // Serve calls running

	mu           sync.Mutex
	drainStart   time.Time
	listeners    map[*listener]struct{}
	conns        map[*conn]struct{}
	h2conns      map[*conn]struct{} // the HTTP/2 ones not yet sent GOAWAY (goAway)
	hot          map[*conn]struct{} // used lately when the drain began: they move first (moveIdle)
	onDrain      []func()
	closedSelf   int // connections that closed on their own during the drain
	closedIdle   int // idle connections the drain closed
	hijackedLeft int // hijacked connections closed during the drain

	// Parked connections (park.go).
	parkedN    int             // parked, or on their way to net/http
	parker     *parker         // from the first park
	unparked   *unparkListener // from the first park: parked connections whose bytes came, for net/http
	unparkOver bool            // unparked connections are no longer served: nothing parks
}

// Report says what a drain did.
type Report struct {
	Requests            int64         // requests answered while draining
	ClosedIdle          int           // idle connections closed after IdleGrace
	ClosedAfterResponse int           // connections closed after their last answer (Connection: close) or by the client
	Hijacked            int           // hijacked connections (WebSockets...) closed by the application during the drain
	Moved               int           // idle connections handed to the next generation (DrainTo)
	HTTP2               int           // HTTP/2 connections sent GOAWAY; each closes once its streams are answered
	Cut                 int           // connections closed at the deadline, requests in flight or not
	Running             int64         // handlers still running when Drain returned (see AfterCut)
	Duration            time.Duration // from the start of the drain to its end
}

// ErrDraining is returned by Serve and Drain once a drain has begun.
var ErrDraining = errors.New("server is draining")

func (s *Server) init() {
	s.initOnce.Do(func() {
		if s.HTTP != nil {
			s.srv = s.HTTP
		} else {
			s.srv = &http.Server{Handler: s.Handler, ReadHeaderTimeout: s.ReadHeaderTimeout, IdleTimeout: s.IdleTimeout}
			if s.Logger != nil {
				s.srv.ErrorLog = slog.NewLogLogger(s.Logger.Handler(), slog.LevelWarn)
			}
		}
		h := s.srv.Handler
		if h == nil {
			h = http.DefaultServeMux
		}
		s.srv.Handler = s.wrap(h)
		s.srv.ReadHeaderTimeout = orDefault(s.srv.ReadHeaderTimeout, DefaultReadHeaderTimeout)
		s.srv.IdleTimeout = orDefault(s.srv.IdleTimeout, DefaultIdleTimeout)
		chained := s.srv.ConnState
		s.srv.ConnState = func(nc net.Conn, st http.ConnState) {
			s.connState(nc, st)
			if chained != nil {
				chained(nc, st)
			}
		}
		s.initErr = s.setupHTTP2()
		s.idle = make(chan struct{}, 1)
		s.listeners = make(map[*listener]struct{})
		s.conns = make(map[*conn]struct{})
		s.h2conns = make(map[*conn]struct{})
		s.hot = make(map[*conn]struct{})
	})
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Serve accepts connections on ln and serves them until Drain closes it; it then
// returns ErrDraining. Serve may be called for several listeners at once.
//
// On the listener of connections moved in from the previous generation
// (package upgrader's Upgrader.Moved), each connection waits parked, outside
// net/http (its bare descriptor in an epoll set of the Server's own, which one
// goroutine watches for all of them: no goroutine, buffer or timer each), until
// its client sends; net/http then serves it like the others. So net/http's hooks
// see it only from then on (ConnState's StateNew, ConnContext, and a second
// BaseContext call, with a listener of this package's), and not at all if it
// closes or moves on while parked: it moves on to the next generation
// without waking net/http, and closes at IdleTimeout from its move, or when
// the http.Server is closed.
func (s *Server) Serve(ln net.Listener) error {
	return s.serve(ln, false, "", "")
}

// ServeTLS is Serve over TLS, with HTTP/2 (ALPN "h2") unless the HTTP
// template's Protocols leave it out: net/http terminates TLS, so handlers see
// r.TLS. certFile and keyFile are as for http.Server.ServeTLS: they may be
// empty when HTTP.TLSConfig has the certificates (or GetCertificate).
// Connections served over TLS never move (their keys live in this process).
func (s *Server) ServeTLS(ln net.Listener, certFile, keyFile string) error {
	return s.serve(ln, true, certFile, keyFile)
}

func (s *Server) serve(ln net.Listener, tls bool, certFile, keyFile string) error {
	s.init()
	if s.initErr != nil {
		ln.Close()
		return s.initErr
	}
	_, fromMove := ln.(*moved.Listener)
	l := &listener{Listener: ln, s: s, tls: tls, fromMove: fromMove && !tls}
	s.mu.Lock()
	if s.stopped.Load() {
		s.mu.Unlock()
		ln.Close()
		return ErrDraining
	}
	s.listeners[l] = struct{}{}
	s.serving.Add(1)
	s.mu.Unlock()
	defer s.serving.Done()
	var err error
	if tls {
		err = s.srv.ServeTLS(l, certFile, keyFile)
	} else {
		err = s.srv.Serve(l)
	}
	if s.stopped.Load() {
		return ErrDraining
	}
	return err
}

// RegisterOnDrain registers f to be called, in its own goroutine, when a drain
// begins: the place to tell hijacked connections (WebSockets, streams) to leave.
func (s *Server) RegisterOnDrain(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onDrain = append(s.onDrain, f)
}

// InFlight is the number of requests being answered now.
func (s *Server) InFlight() int64 { return s.inFlight.Load() }

// StopAccepting closes the listeners at once, and every Serve returns
// ErrDraining; a Serve called later too. The connections already accepted are
// served as before, until Drain or DrainTo drains them. It is for the moment a
// new generation has taken over (upgrader.Options.StopAccepting): the new one
// then takes every new connection, without waiting for the drain to be set up.
func (s *Server) StopAccepting() {
	s.init()
	s.mu.Lock()
	s.stopAcceptingLocked()
	s.mu.Unlock()
	s.closeUnparked(true)
}

func (s *Server) stopAcceptingLocked() {
	if s.stopped.Swap(true) {
		return
	}
	for l := range s.listeners {
		l.Listener.Close()
	}
}

// Draining reports whether a drain has begun.
func (s *Server) Draining() bool { return s.draining.Load() }

// Drain stops accepting, answers every request on the connections it holds, and
// closes them between requests. It blocks until no connection is left or ctx
// ends; then it closes what remains. Before it returns with the Report (and
// context.Cause(ctx) if ctx ended), it waits for the handlers still running,
// AfterCut at most once ctx has ended; Report.Running counts those that still
// run. Resources the handlers use can be released after it when Running is 0.
func (s *Server) Drain(ctx context.Context) (Report, error) {
	return s.DrainTo(ctx, nil)
}

// DrainTo is Drain when a next generation serves on: every plain connection
// (not TLS, not hijacked) waiting for a request, with nothing of it read here,
// moves to it through m, which serves it as if it had accepted it; the client
// sees nothing. A connection that cannot move (a request arriving, pipelined
// bytes buffered here, a failed move) is served here with "Connection: close"
// or, idle, closed when steady state would close it (IdleTimeout after its last
// request) or at the deadline, whichever comes first, never sooner: a client
// that does not check its idle connections then still gets its next answer.
// With a nil m (or a nil Mover in it) it is Drain.
func (s *Server) DrainTo(ctx context.Context, m Mover) (Report, error) {
	if m != nil {
		if v := reflect.ValueOf(m); v.Kind() == reflect.Pointer && v.IsNil() {
			m = nil
		}
	}
	s.init()
	s.mu.Lock()
	if s.draining.Load() {
		s.mu.Unlock()
		return Report{}, ErrDraining
	}
	moves := m != nil
	if r, ok := m.(interface{ Moves() bool }); ok && !r.Moves() {
		moves = false // the next generation takes none: idle connections stay, as steady state would keep them
	}
	s.draining.Store(true)
	s.stopAcceptingLocked()
	s.drainStart = time.Now()
	if moves {
		// Connections used lately move first, all at once: their clients
		// are likely to send again soon. The others move at MoveRate.
		since := s.drainStart.Add(-warmWindow).UnixNano()
		for c := range s.conns {
			if c.lastRead.Load() >= since {
				s.hot[c] = struct{}{}
			}
		}
	}
	for _, f := range s.onDrain {
		go f()
	}
	s.mu.Unlock()
	// Every Serve returns once its listener is closed; a connection accepted just
	// before that is tracked by then, so none is missed below.
	s.serving.Wait()
	s.closeUnparked(true)

	var rep Report
	grace := orDefault(s.IdleGrace, DefaultIdleGrace)
	if m != nil {
		grace = -1 // steady state's rule: IdleTimeout since the last request
	}
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	var err error
	var lastQuiet, moveBy time.Time
	failures := 0 // passes in a row whose move failed
	if deadline, ok := ctx.Deadline(); ok {
		moveBy = s.drainStart.Add(deadline.Sub(s.drainStart) / 2)
	}
	for {
		rep.HTTP2 += s.goAway()
		if moves {
			// Every pass: a connection that becomes idle later (its answer was
			// still being written when the drain began, or kept open to move)
			// moves too.
			moved, failed := s.moveIdle(ctx, m, s.moveChunk(moveBy))
			rep.Moved += moved
			if !failed {
				failures = 0
			} else if failures++; failures == 3 {
				// The next generation takes none after all: what is left stays,
				// as steady state would keep it.
				moves = false
			}
		}
		// Closing quiet connections looks at every one. While connections
		// move, the rule is steady state's (IdleTimeout, minutes): once a
		// second is often enough, and the passes between cost nothing per
		// connection.
		left := s.count()
		if grace >= 0 || time.Since(lastQuiet) >= time.Second {
			left, lastQuiet = s.closeQuiet(grace, &rep), time.Now()
		}
		if left == 0 {
			break
		}
		select {
		case <-tick.C:
			if ctx.Err() == nil {
				continue
			}
			// Both ready: the deadline wins, whichever select picked.
		case <-ctx.Done():
		}
		err = context.Cause(ctx)
		rep.Cut = s.closeAll()
		break
	}
	rep.Running = s.waitHandlers(ctx)
	s.closeUnparked(false)
	s.srv.Close() // nothing is left; this releases net/http's own state
	s.mu.Lock()
	rep.ClosedAfterResponse = s.closedSelf
	rep.ClosedIdle = s.closedIdle
	rep.Hijacked = s.hijackedLeft
	s.mu.Unlock()
	rep.Requests = s.answered.Load()
	rep.Duration = time.Since(s.drainStart)
	return rep, err
}

// waitHandlers waits until no handler runs: as long as ctx lasts, then
// AfterCut more. It returns how many still run.
func (s *Server) waitHandlers(ctx context.Context) int64 {
	var grace <-chan time.Time
	wait := ctx.Done()
	if ctx.Err() != nil {
		wait, grace = nil, time.After(orDefault(s.AfterCut, DefaultAfterCut))
	}
	for {
		n := s.inFlight.Load()
		if n == 0 {
			return 0
		}
		select {
		case <-s.idle:
		case <-wait:
			wait, grace = nil, time.After(orDefault(s.AfterCut, DefaultAfterCut))
		case <-grace:
			return n
		}
	}
}

// closeQuiet closes the connections that have been idle for grace since the
// drain began and have no request arriving; it returns how many remain. The
// server's lock is held only to copy the set: the checks (a syscall each) run
// without it, so accepts and requests never wait for them.
func (s *Server) closeQuiet(grace time.Duration, rep *Report) int {
	now := time.Now()
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	var closed []*conn
	parkedClosed := 0
	for _, c := range conns {
		if ok, wasParked := c.closeIfQuiet(now, s.drainStart, grace, s.srv.IdleTimeout); ok {
			closed = append(closed, c)
			if wasParked {
				parkedClosed++
			}
		}
	}
	s.mu.Lock()
	for _, c := range closed {
		if _, ok := s.conns[c]; ok {
			delete(s.conns, c)
			delete(s.h2conns, c)
			delete(s.hot, c)
			s.closedIdle++
		}
	}
	left := len(s.conns)
	l := s.leftParkLocked(parkedClosed)
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
	return left
}

// moveChunk is how many connections one pass of DrainTo asks to move:
// MoveRate's share of a pass, or more if that would not move every connection
// by moveBy (half-way from the drain's start to its deadline; zero without
// one).
func (s *Server) moveChunk(moveBy time.Time) int {
	rate := s.MoveRate
	switch {
	case rate < 0:
		return s.count()
	case rate == 0:
		rate = DefaultMoveRate
	}
	n := max(1, int(int64(rate)*int64(pollInterval)/int64(time.Second)))
	if !moveBy.IsZero() {
		passes := int(time.Until(moveBy) / pollInterval)
		if left := s.count(); passes < 1 {
			n = max(n, left)
		} else {
			n = max(n, (left+passes-1)/passes)
		}
	}
	return n
}

// count returns how many connections are tracked.
func (s *Server) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// closeAll closes every remaining connection; it returns how many there were,
// less those that had moved or were closed already (their Read, or forget,
// had yet to count them).
func (s *Server) closeAll() int {
	s.mu.Lock()
	n, parkedCut := 0, 0
	for c := range s.conns {
		wasParked, wasMoved, wasClosed := c.cut()
		if wasParked {
			parkedCut++
		}
		delete(s.conns, c)
		delete(s.h2conns, c)
		delete(s.hot, c)
		switch {
		case wasMoved:
		case wasClosed:
			s.closedSelf++ // as forget would have counted it
		default:
			n++
		}
	}
	l := s.leftParkLocked(parkedCut)
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
	return n
}

func (s *Server) track(nc net.Conn) *conn {
	c := &conn{Conn: nc, s: s}
	switch nc.(type) {
	case *net.TCPConn, *net.UnixConn, *moved.Conn:
		c.movable = true
	}
	c.setState(http.StateNew)
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	return c
}

// forget removes a connection that closed on its own.
func (s *Server) forget(c *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.forgetLocked(c)
}

// forgetLocked is forget with s.mu held (and not c.mu).
func (s *Server) forgetLocked(c *conn) {
	if _, ok := s.conns[c]; !ok {
		return
	}
	delete(s.conns, c)
	delete(s.h2conns, c)
	delete(s.hot, c)
	switch {
	case !s.draining.Load():
	case c.state() == http.StateHijacked:
		s.hijackedLeft++
	case c.hasMoved():
		// counted by moveIdle
	case c.wasClosedIdle():
		s.closedIdle++
	default:
		s.closedSelf++
	}
}

func (s *Server) connState(nc net.Conn, st http.ConnState) {
	c := ours(nc)
	if c == nil {
		return
	}
	switch st {
	case http.StateClosed:
		s.forget(c)
	default:
		c.setState(st)
	}
}

// wrap counts requests and, while draining, says "Connection: close" in every
// answer so that net/http closes the connection after it.
func (s *Server) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rw := &responseWriter{ResponseWriter: w, s: s, h1: r.ProtoMajor == 1}
		s.inFlight.Add(1)
		defer func() {
			left := s.inFlight.Add(-1)
			if s.draining.Load() {
				// Answered: its connection is still there (a request cut at the
				// deadline, or whose client left, has its context cancelled).
				if !rw.hijacked && r.Context().Err() == nil {
					s.answered.Add(1)
				}
				if left == 0 {
					select {
					case s.idle <- struct{}{}:
					default:
					}
				}
			}
		}()
		h.ServeHTTP(rw, r)
		rw.beforeHeader()
	})
}

type listener struct {
	net.Listener
	s        *Server
	tls      bool // served over TLS: its connections never move
	fromMove bool // a *moved.Listener: its connections park (park.go)
}

// Close is net/http's: at the end of Serve, or from the http.Server's Close
// or Shutdown. Unless this Server is stopping (then the drain decides), the
// connections parked here close too, as net/http closes its idle ones.
func (l *listener) Close() error {
	err := l.Listener.Close()
	if l.fromMove && !l.s.stopped.Load() {
		l.s.closeParked()
	}
	return err
}

// Accept tracks each connection; one moved in idle is parked until its
// client sends (park.go), and Accept goes on to the next.
func (l *listener) Accept() (net.Conn, error) {
	if l.fromMove {
		return l.acceptMoved()
	}
	nc, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	c := l.s.track(nc)
	if l.tls {
		c.mu.Lock()
		c.movable = false
		c.mu.Unlock()
	}
	return c, nil
}

// acceptMoved parks the connections of a moved-connections listener; one
// that cannot park goes to net/http at once.
func (l *listener) acceptMoved() (net.Conn, error) {
	ml := l.Listener.(*moved.Listener)
	for {
		fd, err := ml.AcceptFD()
		if err != nil {
			return nil, err
		}
		if l.s.park(fd, l.Addr()) {
			continue
		}
		nc, err := moved.NewConn(fd)
		if err != nil {
			continue // its peer reset meanwhile, say: nothing to serve
		}
		c := l.s.track(nc)
		c.mu.Lock()
		c.fromMove = true
		c.mu.Unlock()
		return c, nil
	}
}
