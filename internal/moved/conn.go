package moved

import (
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Conn is a moved connection, served on the descriptor it was sent with, as
// it is: it keeps the socket options it was accepted with (TCP_NODELAY,
// keepalive). net.FileConn would serve it too, but it sets TCP keepalive again,
// and on a socket idle longer than the keepalive time (most idle keep-alive
// connections) the kernel answers that with a probe at once
// (tcp_sock_set_keepidle): a round trip per connection moved, and 13 system
// calls where newConn makes 3. Its errors are net.Conn's (*net.OpError, with
// net.ErrClosed once closed), which net/http tells apart.
type Conn struct {
	f            *os.File
	network      string // "tcp" or "unix", for errors
	laddr, raddr net.Addr
	closed       atomic.Bool // Close was called: what fails from then on fails for that
}

// newConn makes f, a connected stream socket in non-blocking mode, a Conn. It
// fails, leaving f open, when the runtime's poller cannot wait on f (then its
// deadlines would not work), or f is not a connected TCP or Unix stream socket
// (a peer that reset meanwhile is no longer connected).
func newConn(f *os.File) (*Conn, error) {
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		return nil, err // not pollable (os.ErrNoDeadline)
	}
	raw, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	// package syscall's Getsockname and Getpeername, not x/sys's, which add
	// a getsockopt each.
	var lsa, rsa syscall.Sockaddr
	var lerr, rerr error
	var typ int
	var terr error
	if err := raw.Control(func(fd uintptr) {
		typ, terr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TYPE)
		lsa, lerr = syscall.Getsockname(int(fd))
		rsa, rerr = syscall.Getpeername(int(fd))
	}); err != nil {
		return nil, err
	}
	if err := errors.Join(terr, lerr, rerr); err != nil {
		return nil, err
	}
	if typ != syscall.SOCK_STREAM {
		return nil, syscall.EPROTOTYPE
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
func sockaddr(sa syscall.Sockaddr) net.Addr {
	switch sa := sa.(type) {
	case *syscall.SockaddrInet4:
		return &net.TCPAddr{IP: append(net.IP(nil), sa.Addr[:]...), Port: sa.Port}
	case *syscall.SockaddrInet6:
		a := &net.TCPAddr{IP: append(net.IP(nil), sa.Addr[:]...), Port: sa.Port}
		if sa.ZoneId != 0 { // a link-local peer: named as package net names it
			a.Zone = strconv.Itoa(int(sa.ZoneId))
			if ifi, err := net.InterfaceByIndex(int(sa.ZoneId)); err == nil {
				a.Zone = ifi.Name
			}
		}
		return a
	case *syscall.SockaddrUnix:
		return &net.UnixAddr{Name: sa.Name, Net: "unix"}
	}
	return nil
}

// opError gives err, from the file's method op, the form a net.Conn gives it:
// a system call's error in an *os.SyscallError, net.ErrClosed once closed
// (os.File says "file already closed", or for deadlines "use of closed file").
func (c *Conn) opError(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
		if errno, ok := err.(syscall.Errno); ok {
			err = os.NewSyscallError(pe.Op, errno)
		}
	}
	if c.closed.Load() || errors.Is(err, os.ErrClosed) {
		err = net.ErrClosed
	}
	return &net.OpError{Op: op, Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
}

// Read reads from the connection, as net.Conn's Read does.
func (c *Conn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	return n, c.opError("read", err)
}

// Write writes to the connection, as net.Conn's Write does.
func (c *Conn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	return n, c.opError("write", err)
}

// Close closes the descriptor.
func (c *Conn) Close() error {
	if c.closed.Swap(true) {
		return c.opError("close", os.ErrClosed)
	}
	err := c.f.Close()
	if err != nil {
		return &net.OpError{Op: "close", Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
	}
	return nil
}

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

// LocalAddr is the address the connection was accepted on.
func (c *Conn) LocalAddr() net.Addr { return c.laddr }

// RemoteAddr is the client's address.
func (c *Conn) RemoteAddr() net.Addr { return c.raddr }

// SetDeadline sets the read and write deadlines, as net.Conn's does.
func (c *Conn) SetDeadline(t time.Time) error { return c.opError("set", c.f.SetDeadline(t)) }

// SetReadDeadline sets the read deadline, as net.Conn's does.
func (c *Conn) SetReadDeadline(t time.Time) error { return c.opError("set", c.f.SetReadDeadline(t)) }

// SetWriteDeadline sets the write deadline, as net.Conn's does.
func (c *Conn) SetWriteDeadline(t time.Time) error { return c.opError("set", c.f.SetWriteDeadline(t)) }

// ReadFrom sends a file with sendfile(2), as *net.TCPConn's does for
// net/http's file responses (r an *os.File, or one in an *io.LimitedReader);
// anything else, or a file sendfile cannot send, is copied.
func (c *Conn) ReadFrom(r io.Reader) (int64, error) {
	remain := int64(1<<63 - 1)
	lr, limited := r.(*io.LimitedReader)
	if limited {
		remain, r = lr.N, lr.R
		if remain <= 0 {
			return 0, nil
		}
	}
	written, sent, err := c.sendFile(r, remain)
	if limited {
		lr.N -= written
	}
	if sent {
		return written, c.opError("readfrom", err)
	}
	if limited {
		r = lr
	}
	n, err := io.Copy(writerOnly{c}, r)
	if err != nil { // as package net wraps what its copy returns
		err = &net.OpError{Op: "readfrom", Net: c.network, Source: c.laddr, Addr: c.raddr, Err: err}
	}
	return written + n, err
}

// writerOnly hides Conn's ReadFrom from io.Copy.
type writerOnly struct{ io.Writer }

// sendFile sends up to remain bytes of r from its offset, if r is a file; sent
// is false when nothing was sent and a copy should (then r is intact).
func (c *Conn) sendFile(r io.Reader, remain int64) (written int64, sent bool, err error) {
	f, ok := r.(*os.File)
	if !ok {
		return 0, false, nil
	}
	src, err := f.SyscallConn()
	if err != nil {
		return 0, false, nil
	}
	dst, err := c.f.SyscallConn()
	if err != nil {
		return 0, false, err
	}
	var werr, serr error // the wait for the socket's; sendfile's
	cerr := src.Control(func(sfd uintptr) {
		werr = dst.Write(func(dfd uintptr) bool {
			for remain > 0 {
				n, errno := unix.Sendfile(int(dfd), int(sfd), nil, int(min(remain, 1<<30)))
				if n > 0 {
					written += int64(n)
					remain -= int64(n)
				}
				switch {
				case errno == unix.EINTR:
					continue
				case errno == unix.EAGAIN:
					return false // wait until the socket takes more (or the write deadline)
				case errno != nil:
					serr = os.NewSyscallError("sendfile", errno)
					return true
				case n == 0:
					return true // the end of the file
				}
			}
			return true
		})
	})
	switch {
	case cerr != nil:
		return written, written > 0, cerr
	case werr != nil:
		return written, true, werr
	case written == 0 && (errors.Is(serr, unix.EINVAL) || errors.Is(serr, unix.ENOSYS)):
		return 0, false, nil // not a file sendfile takes: copy it
	}
	return written, true, serr
}

// SyscallConn gives the descriptor, as *net.TCPConn's does; its methods fail
// with os.File's errors once the connection is closed.
func (c *Conn) SyscallConn() (syscall.RawConn, error) { return c.f.SyscallConn() }
