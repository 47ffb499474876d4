// Package moved is the listener through which a new generation serves the
// connections its previous generation moved to it (server.Server.DrainTo).
package moved

import (
	"errors"
	"net"
	"os"
	"sync"
)

// Listener yields moved connections: pass it to Serve like any listener, and
// Add each descriptor received.
type Listener struct {
	addr net.Addr
	c    chan net.Conn
	done chan struct{}
	once sync.Once
}

// New returns a Listener that reports addr as its address.
func New(addr net.Addr) *Listener {
	return &Listener{addr: addr, c: make(chan net.Conn, 256), done: make(chan struct{})}
}

// ErrClosed is returned by Add once the listener is closed.
var ErrClosed = errors.New("moved-connections listener closed")

// Add takes f, a connected socket, and hands it to Accept as a *Conn (or, if
// the runtime cannot poll f, as net.FileConn makes it, and closes f); f is
// the connection's, or closed, whatever Add returns. Once Close has returned
// it fails with ErrClosed. It blocks while Accept lags behind by more than a
// few hundred connections.
func (m *Listener) Add(f *os.File) error {
	select {
	case <-m.done: // closed: refuse for certain, not as one of two ready cases
		f.Close()
		return ErrClosed
	default:
	}
	var nc net.Conn
	c, err := newConn(f)
	if err == nil {
		nc = c
	} else {
		nc, err = net.FileConn(f)
		f.Close()
		if err != nil {
			return err
		}
	}
	select {
	case m.c <- nc:
		select {
		case <-m.done:
			m.closeQueued() // Close ran meanwhile: nobody will accept it
		default:
		}
		return nil
	case <-m.done:
		nc.Close()
		return ErrClosed
	}
}

// Accept returns the next moved connection; it blocks until there is one or
// the listener is closed.
func (m *Listener) Accept() (net.Conn, error) {
	select {
	case nc := <-m.c:
		return nc, nil
	case <-m.done:
		return nil, net.ErrClosed
	}
}

// Close stops Accept and closes the connections not accepted yet.
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
		case nc := <-m.c:
			nc.Close()
		default:
			return
		}
	}
}

// Addr is the address given to New.
func (m *Listener) Addr() net.Addr { return m.addr }
