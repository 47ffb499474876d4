package server

import (
	"net"
	"net/http"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/moved"
)

// A connection moved in from the previous generation is idle: its client has
// sent nothing since its last answer, and may send nothing for minutes. Rather
// than hand it to net/http at once (a goroutine that grows its stack, 8 KiB of
// buffers, a context: 24 µs of CPU and 11 KiB a connection with 10,000 of
// them), the server parks it: its bare descriptor waits in an epoll set of the
// server's own (the parker), which one goroutine watches for every parked
// connection, and only when its first bytes (or its end) come is it made a
// net.Conn and given to net/http, through the unpark listener that this server
// serves. A parked connection costs no goroutine, no timer and no registration
// in the runtime's poller: taking one is a single epoll_ctl, and moving it on
// to the next generation (moveIdle) wakes nothing. It closes at IdleTimeout from
// its move, as steady state would close it; a drain closes it when quiet
// (closeQuiet) or cuts it (closeAll) like any idle connection.
//
// Locks: s.mu, then c.mu, then the parker's mu, in that order only.

// parkState says who owns a parked connection.
type parkState uint8

const (
	notParked  parkState = iota // net/http serves it, or it is gone
	parked                      // its descriptor waits in the parker for its first bytes
	parkMoving                  // moveIdle is sending it to the next generation
)

// parking is a parked connection's place in the parker. It is the parker's
// (under its mu) once added; a connection that is parked has one (c.parking,
// under c.mu) until it leaves the parker.
type parking struct {
	p     *parker
	c     *conn
	fd    int
	seq   uint32    // tells this parking's events from those of an earlier user of fd
	until time.Time // IdleTimeout from the park
	gone  bool      // left the parker (removed from the epoll set)
}

// parker watches parked descriptors: an epoll set (EPOLLONESHOT: one event a
// parking, which then leaves the parker), an eventfd that wakes its goroutine,
// and the parkings in the order they came, which is the order of their idle
// deadlines.
type parker struct {
	s    *Server
	epfd int
	wake int // eventfd

	mu     sync.Mutex
	seq    uint32
	byFD   map[int32]*parking
	queue  []*parking // by until; those gone are dropped when reached
	head   int        // queue[head:] is the queue
	over   bool       // nothing parks any more: run returns once byFD is empty
	exited bool       // run returned: the descriptors are closed
}

func newParker(s *Server) (*parker, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, err
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(wake)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, err
	}
	return &parker{s: s, epfd: epfd, wake: wake, byFD: make(map[int32]*parking)}, nil
}

// add registers c's descriptor fd, until IdleTimeout from now; c.mu is held.
func (p *parker) add(c *conn, fd int, idle time.Duration) (*parking, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.exited {
		return nil, net.ErrClosed
	}
	p.seq++
	pk := &parking{p: p, c: c, fd: fd, seq: p.seq, until: time.Now().Add(idle)}
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT, Fd: int32(fd), Pad: int32(pk.seq)}
	if err := unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return nil, err
	}
	if p.head == len(p.queue) {
		p.signal() // the queue was empty: run waits without a deadline
	}
	p.byFD[int32(fd)] = pk
	p.queue = append(p.queue, pk)
	return pk, nil
}

// remove takes pk out of the epoll set, before its descriptor is closed or
// made a net.Conn; c.mu is held. Removing is required even before a close:
// a descriptor moved on stays open in the next generation, and the epoll set
// would go on watching it.
func (p *parker) remove(pk *parking) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pk.gone {
		return
	}
	pk.gone = true
	delete(p.byFD, int32(pk.fd))
	unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, pk.fd, nil)
	if p.over && len(p.byFD) == 0 {
		p.signal()
	}
}

// end says that nothing parks any more; run returns once none is left.
func (p *parker) end() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.over = true
	p.signal()
}

// signal wakes run; p.mu is held.
func (p *parker) signal() {
	if !p.exited {
		unix.Write(p.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	}
}

// run waits for parked connections' bytes and idle deadlines, until end has
// been called and no connection is left.
func (p *parker) run() {
	events := make([]unix.EpollEvent, 128)
	var buf [8]byte
	for {
		timeout, done := p.next()
		if done {
			return
		}
		n, err := unix.EpollWait(p.epfd, events, timeout)
		if err != nil {
			n = 0 // EINTR
		}
		for _, ev := range events[:n] {
			if ev.Fd == int32(p.wake) {
				unix.Read(p.wake, buf[:])
				continue
			}
			p.mu.Lock()
			pk := p.byFD[ev.Fd]
			p.mu.Unlock()
			if pk != nil && pk.seq == uint32(ev.Pad) {
				p.s.parkedReady(pk)
			}
		}
		p.expire()
	}
}

// next is run's epoll timeout in milliseconds: until the first idle deadline,
// -1 without one. done: nothing parks any more and none is parked; the
// descriptors are closed.
func (p *parker) next() (timeout int, done bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.over && len(p.byFD) == 0 {
		p.exited = true
		unix.Close(p.epfd)
		unix.Close(p.wake)
		return 0, true
	}
	p.drop()
	if p.head == len(p.queue) {
		return -1, false
	}
	d := time.Until(p.queue[p.head].until)
	if d <= 0 {
		// Due, but still there: moving right now (see expire). Not before
		// the move is over.
		return int(pollInterval / time.Millisecond), false
	}
	// At most an hour: epoll's timeout is milliseconds in 32 bits.
	return int((min(d, time.Hour) + time.Millisecond - 1) / time.Millisecond), false
}

// drop drops the parkings gone from the front of the queue; p.mu is held.
func (p *parker) drop() {
	for p.head < len(p.queue) && p.queue[p.head].gone {
		p.queue[p.head] = nil
		p.head++
	}
	if p.head > 64 && p.head > len(p.queue)/2 {
		n := copy(p.queue, p.queue[p.head:])
		clear(p.queue[n:])
		p.queue, p.head = p.queue[:n], 0
	}
}

// expire closes the parked connections whose idle deadline has passed, as
// net/http would close an idle connection.
func (p *parker) expire() {
	now := time.Now()
	var due []*parking
	p.mu.Lock()
	p.drop()
	for _, pk := range p.queue[p.head:] {
		if pk.until.After(now) {
			break
		}
		if !pk.gone {
			due = append(due, pk)
		}
	}
	p.mu.Unlock()
	for _, pk := range due {
		p.s.closeParkedIdle(pk)
	}
}

// park parks fd, a connection just accepted from a moved-connections
// listener, and tracks it. It reports false, leaving fd open, when unparked
// connections are no longer served (the server stopped with none parked) or
// the parker fails: the caller then gives it to net/http.
func (s *Server) park(fd int, addr net.Addr) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unparkOver {
		return false
	}
	if s.parker == nil {
		p, err := newParker(s)
		if err != nil {
			return false
		}
		s.parker = p
		go p.run()
		// Served from the first park, so that the http.Server's Close and
		// Shutdown reach it (see unparkListener.Close).
		s.unparked = &unparkListener{s: s, c: make(chan net.Conn, 64), done: make(chan struct{}), addr: addr}
		go s.srv.Serve(s.unparked)
	}
	c := &conn{s: s, movable: true, fromMove: true, st: http.StateNew, since: time.Now()}
	c.mu.Lock()
	defer c.mu.Unlock()
	pk, err := s.parker.add(c, fd, s.srv.IdleTimeout)
	if err != nil {
		return false
	}
	// In one hold of s.mu with the count: closeParked and closeAll see it.
	c.park, c.parking = parked, pk
	s.conns[c] = struct{}{}
	s.parkedN++
	return true
}

// leftPark counts a connection out of parking: net/http took it, it moved on,
// or it closed. The last one out of a server that has stopped accepting ends
// the serving of unparked connections.
func (s *Server) leftPark() {
	s.mu.Lock()
	l := s.leftParkLocked(1)
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
}

// leftParkLocked counts n connections out of parking; s.mu is held. It
// returns the unpark listener to close once s.mu is released, if any.
func (s *Server) leftParkLocked(n int) *unparkListener {
	s.parkedN -= n
	if n > 0 && s.parkedN == 0 && s.stopped.Load() {
		return s.unparkOverLocked() // in the same hold as the count: no park slips in
	}
	return nil
}

// unparkOverLocked ends the serving of unparked connections (nothing parks
// from now on) and returns the listener to close once s.mu is released.
func (s *Server) unparkOverLocked() *unparkListener {
	s.unparkOver = true
	if s.parker != nil {
		s.parker.end()
	}
	return s.unparked
}

// parkedReady gives a parked connection whose bytes (or end) came to
// net/http; one being moved is left to the move (endParkedMove).
func (s *Server) parkedReady(pk *parking) {
	c := pk.c
	c.mu.Lock()
	if c.parking != pk {
		c.mu.Unlock() // it left the parker meanwhile
		return
	}
	if c.park == parkMoving {
		c.parkWoke = true // the move decides (endParkedMove)
		c.mu.Unlock()
		return
	}
	pk.p.remove(pk)
	c.park, c.parking = notParked, nil
	// Under c.mu: nothing else closes the descriptor meanwhile.
	nc, err := moved.NewConn(pk.fd)
	if err != nil {
		c.closed = true // its peer reset meanwhile, say: nothing to serve
		c.mu.Unlock()
		s.forget(c)
		s.leftPark()
		return
	}
	c.Conn = nc
	c.mu.Unlock()
	s.unpark(c)
}

// closeParkedLocked closes c's descriptor and takes it out of the parker;
// c.mu is held and c is parked. The caller forgets it and counts it out.
func (s *Server) closeParkedLocked(c *conn) {
	c.parking.p.remove(c.parking)
	unix.Close(c.parking.fd)
	c.park, c.parking, c.closed = notParked, nil, true
}

// closeParkedIdle closes pk's connection at its idle deadline, if it is still
// parked (not moving).
func (s *Server) closeParkedIdle(pk *parking) {
	c := pk.c
	c.mu.Lock()
	if c.parking != pk || c.park != parked {
		c.mu.Unlock()
		return
	}
	if pendingFD(pk.fd) {
		// Its request came (its event not collected yet): it is served, as
		// net/http serves a request that beats its idle timeout.
		c.mu.Unlock()
		s.parkedReady(pk)
		return
	}
	s.closeParkedLocked(c)
	c.closedIdle = true
	c.mu.Unlock()
	s.forget(c)
	s.leftPark()
}

// closeParked closes every parked connection, as net/http's Close and
// Shutdown close idle ones: for a Server whose http.Server is closed from
// outside (see listener.Close).
func (s *Server) closeParked() {
	s.mu.Lock()
	n := 0
	for c := range s.conns {
		c.mu.Lock()
		was := c.park == parked
		if was {
			s.closeParkedLocked(c)
		}
		c.mu.Unlock()
		if was {
			s.forgetLocked(c)
			n++
		}
	}
	l := s.leftParkLocked(n)
	s.mu.Unlock()
	if l != nil {
		l.Close()
	}
}

// takeParked claims a parked connection for a move: its descriptor, or -1 if
// it is not parked. endParkedMove gives the outcome. It stays in the parker
// meanwhile: bytes that come are noted (parkWoke).
func (c *conn) takeParked() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.park != parked {
		return -1
	}
	c.park = parkMoving
	return c.parking.fd
}

// endParkedMove ends a move that takeParked began: moved, the connection's
// descriptor is closed here (which sends no FIN) and it is forgotten;
// otherwise it is parked again, or given to net/http if its bytes came
// meanwhile.
func (s *Server) endParkedMove(c *conn, moved bool) {
	c.mu.Lock()
	if moved {
		s.closeParkedLocked(c)
		c.moved, c.movable = true, false
		c.mu.Unlock()
		s.forget(c)
		s.leftPark()
		return
	}
	c.park = parked
	woke := c.parkWoke
	c.parkWoke = false
	pk := c.parking
	c.mu.Unlock()
	if woke {
		s.parkedReady(pk) // its one event came: it unparks now
	}
}

// unpark gives c to net/http through the unpark listener, served from the
// first park until no connection is parked in a server that has stopped
// accepting, or the end of its drain, or the http.Server's Close. It does not
// wait (the parker's goroutine and the drain's must go on): when net/http's
// accept loop is behind, the listener's queue full, a goroutine of its own
// waits to hand c over.
func (s *Server) unpark(c *conn) {
	s.mu.Lock()
	l := s.unparked // set at the first park
	s.mu.Unlock()
	select {
	case l.c <- c:
		l.queued()
	default:
		go func() {
			select {
			case l.c <- c:
				l.queued()
			case <-l.done:
				c.Close() // the http.Server was closed: nobody answers it
				s.leftPark()
			}
		}()
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
	l.s.unparkOverLocked()
	l.s.mu.Unlock()
	l.closeQueued() // outside the Once: a last leftPark here may close it again
	if fromOutside {
		l.s.closeParked()
	}
	return nil
}

// queued follows a send on l.c: if Close ran meanwhile, nobody will accept
// what is queued.
func (l *unparkListener) queued() {
	select {
	case <-l.done:
		l.closeQueued()
	default:
	}
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
