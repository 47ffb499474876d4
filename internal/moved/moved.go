// Package moved is the listener through which a new generation serves the
// connections its previous generation moved to it (server.Server.DrainTo).
package moved

import (
	"errors"
	"net"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Listener yields moved connections: pass it to Serve like any listener, and
// Add each descriptor received. It holds the descriptors as they came: package
// server takes them with AcceptFD and keeps an idle one out of the runtime's
// poller until its client sends (server/park.go); Accept makes each a net.Conn.
type Listener struct {
	addr net.Addr
	c    chan int
	done chan struct{}
	once sync.Once
}

// New returns a Listener that reports addr as its address.
func New(addr net.Addr) *Listener {
	return &Listener{addr: addr, c: make(chan int, 256), done: make(chan struct{})}
}

// ErrClosed is returned by Add once the listener is closed.
var ErrClosed = errors.New("moved-connections listener closed")

// Add takes fd, a connected socket received from the previous generation: it
// is the listener's, or closed, whatever Add returns. Once Close has returned
// it fails with ErrClosed. It blocks while Accept lags behind by more than a
// few hundred connections.
func (m *Listener) Add(fd int) error {
	select {
	case <-m.done: // closed: refuse for certain, not as one of two ready cases
		unix.Close(fd)
		return ErrClosed
	default:
	}
	select {
	case m.c <- fd:
		select {
		case <-m.done:
			m.closeQueued() // Close ran meanwhile: nobody will accept it
		default:
		}
		return nil
	case <-m.done:
		unix.Close(fd)
		return ErrClosed
	}
}

// AcceptFD returns the next descriptor added, the caller's to close; it
// blocks until there is one or the listener is closed.
func (m *Listener) AcceptFD() (int, error) {
	select {
	case fd := <-m.c:
		return fd, nil
	case <-m.done:
		return -1, net.ErrClosed
	}
}

// Accept returns the next moved connection, made by NewConn; a descriptor
// that cannot be served (its peer reset meanwhile) is closed and skipped. It
// blocks until there is one or the listener is closed.
func (m *Listener) Accept() (net.Conn, error) {
	for {
		fd, err := m.AcceptFD()
		if err != nil {
			return nil, err
		}
		if nc, err := NewConn(fd); err == nil {
			return nc, nil
		}
	}
}

// NewConn takes fd, a connected stream socket received from the previous
// generation, and makes it a net.Conn: a *Conn, or, if the runtime cannot poll
// fd, what net.FileConn makes of it. fd is the connection's, or closed,
// whatever NewConn returns.
func NewConn(fd int) (net.Conn, error) {
	f := os.NewFile(uintptr(fd), "moved")
	if c, err := newConn(f); err == nil {
		return c, nil
	}
	nc, err := net.FileConn(f)
	f.Close()
	return nc, err
}

// Close stops Accept and closes the descriptors not accepted yet.
func (m *Listener) Close() error {
	m.once.Do(func() {
		close(m.done)
		m.closeQueued()
	})
	return nil
}

func (m *Listener) closeQueued() {
	for {
		select {
		case fd := <-m.c:
			unix.Close(fd)
		default:
			return
		}
	}
}

// Addr is the address given to New.
func (m *Listener) Addr() net.Addr { return m.addr }
