package moved

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is a moved connection, served on the descriptor it was sent with, as
// it is: it keeps the socket options it was accepted with (TCP_NODELAY,
// keepalive). net.FileConn would serve it too, but it sets TCP keepalive again,
// and on a socket idle longer than the keepalive time (most idle keep-alive
// connections) the kernel answers that with a probe at once
// (tcp_sock_set_keepidle): a round trip per connection moved, on top of a dup
// and nine more system calls. Its errors are net.Conn's (*net.OpError, with
// net.ErrClosed once closed), which net/http tells apart.
type Conn struct {
	f            *os.File
	network      string // "tcp" or "unix", for errors
	laddr, raddr net.Addr
}

// newConn makes f, a connected stream socket in non-blocking mode, a Conn. It
// fails, leaving f open, when f is not a socket, or the runtime's poller cannot
// wait on it (then its deadlines would not work).
func newConn(f *os.File) (*Conn, error) {
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		return nil, err // not pollable (os.ErrNoDeadline)
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var lsa, rsa unix.Sockaddr
	var lerr, rerr error
	if err := raw.Control(func(fd uintptr) {
		lsa, lerr = unix.Getsockname(int(fd))
		rsa, rerr = unix.Getpeername(int(fd))
	}); err != nil {
		return nil, err
	}
	if err := errors.Join(lerr, rerr); err != nil {
		return nil, err
	}
	c := &Conn{f: f, laddr: sockaddr(lsa), raddr: sockaddr(rsa)}
	switch c.laddr.(type) {
	case *net.TCPAddr:
		c.network = "tcp"
		if _, ok := c.raddr.(*net.TCPAddr); !ok {
			c.raddr = &net.TCPAddr{}
		}
	case *net.UnixAddr:
		c.network = "unix"
		if _, ok := c.raddr.(*net.UnixAddr); !ok {
			c.raddr = &net.UnixAddr{Net: "unix"}
		}
	default:
		return nil, syscall.EINVAL
	}
	return c, nil
}

// sockaddr is sa as a net.Addr; nil when it is neither TCP nor Unix.
func sockaddr(sa unix.Sockaddr) net.Addr {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: append(net.IP(nil), sa.Addr[:]...), Port: sa.Port}
	case *unix.SockaddrInet6:
		a := &net.TCPAddr{IP: append(net.IP(nil), sa.Addr[:]...), Port: sa.Port}
		if sa.ZoneId != 0 {
			if ifi, err := net.InterfaceByIndex(int(sa.ZoneId)); err == nil {
				a.Zone = ifi.Name
			}
		}
		return a
	case *unix.SockaddrUnix:
		return &net.UnixAddr{Name: sa.Name, Net: "unix"}
	}
	return nil
}

// opError gives err, from the file's method op, the form a net.Conn gives it.
func (c *Conn) opError(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	if errors.Is(err, os.ErrClosed) {
		err = net.ErrClosed
	}
	return &net.OpError{Op: op, Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
}

func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	return n, c.opError("read", err)
}

func (c *Conn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	return n, c.opError("write", err)
}

// Close closes the descriptor.
func (c *Conn) Close() error { return c.opError("close", c.f.Close()) }

// CloseWrite shuts down the writing side, as *net.TCPConn's does.
func (c *Conn) CloseWrite() error {
	raw, err := c.f.SyscallConn()
	if err != nil {
		return c.opError("close", err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.Shutdown(int(fd), unix.SHUT_WR) }); err != nil {
		return c.opError("close", err)
	}
	return c.opError("close", serr)
}

func (c *Conn) LocalAddr() net.Addr                { return c.laddr }
func (c *Conn) RemoteAddr() net.Addr               { return c.raddr }
func (c *Conn) SetDeadline(t time.Time) error      { return c.opError("set", c.f.SetDeadline(t)) }
func (c *Conn) SetReadDeadline(t time.Time) error  { return c.opError("set", c.f.SetReadDeadline(t)) }
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.opError("set", c.f.SetWriteDeadline(t)) }

// SyscallConn gives the descriptor, as *net.TCPConn's does.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return c.f.SyscallConn() }
