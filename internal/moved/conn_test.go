package moved

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/itest"
)

// pair returns both ends of a connection on network ("tcp" or "unix"): the
// accepted one as a descriptor of its own (as a move delivers it), and the
// client's.
func pair(t *testing.T, network string) (accepted int, client net.Conn, addr net.Addr) {
	t.Helper()
	addrStr := "127.0.0.1:0"
	if network == "unix" {
		addrStr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := net.Listen(network, addrStr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err = net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close() })
	sc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer sc.Close()
	// A copy of the descriptor, as a move delivers it: the same open file,
	// in the non-blocking mode the sending process's runtime set.
	raw, err := sc.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	nfd, derr := -1, error(nil)
	raw.Control(func(fd uintptr) { nfd, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
	if derr != nil {
		t.Fatal(derr)
	}
	return nfd, client, sc.LocalAddr()
}

// closedFD reports whether fd is no longer open.
func closedFD(fd int) bool {
	_, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	return err == unix.EBADF
}

// through adds fd to a Listener and accepts it.
func through(t *testing.T, fd int) net.Conn {
	t.Helper()
	ln := New(&net.TCPAddr{})
	t.Cleanup(func() { ln.Close() })
	if err := ln.Add(fd); err != nil {
		t.Fatal(err)
	}
	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return nc
}

func TestConnKeepsTheSocketOptions(t *testing.T) {
	f, client, _ := pair(t, "tcp")
	// An option net.FileConn would set again (to 15 s), and with it a
	// keepalive probe at once on a socket idle for longer than that.
	if err := unix.SetsockoptInt(f, unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 77); err != nil {
		t.Fatal(err)
	}
	nc := through(t, f)
	c, ok := nc.(*Conn)
	if !ok {
		t.Fatalf("accepted %T, want *moved.Conn", nc)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var idle int
	var gerr error
	raw.Control(func(fd uintptr) { idle, gerr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_KEEPIDLE) })
	if gerr != nil || idle != 77 {
		t.Errorf("TCP_KEEPIDLE %d (%v) after the move, want the 77 it had", idle, gerr)
	}
	if c.LocalAddr().String() != client.RemoteAddr().String() || c.RemoteAddr().String() != client.LocalAddr().String() {
		t.Errorf("addresses %v <- %v, want %v <- %v", c.LocalAddr(), c.RemoteAddr(), client.RemoteAddr(), client.LocalAddr())
	}
}

func TestConnBehavesLikeANetConn(t *testing.T) {
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			f, client, addr := pair(t, network)
			c := through(t, f)
			if _, ok := c.(*Conn); !ok {
				t.Fatalf("accepted %T, want *moved.Conn", c)
			}
			if c.LocalAddr().Network() != addr.Network() || c.LocalAddr().String() != addr.String() {
				t.Errorf("local address %s %q, want %s %q", c.LocalAddr().Network(), c.LocalAddr(), addr.Network(), addr)
			}
			if c.RemoteAddr() == nil {
				t.Fatal("no remote address")
			}

			// A deadline: a timeout, which net/http takes for one.
			c.SetReadDeadline(time.Now().Add(-time.Second))
			_, err := c.Read(make([]byte, 1))
			var ne net.Error
			var oe *net.OpError
			if !errors.As(err, &ne) || !ne.Timeout() || !errors.As(err, &oe) || oe.Op != "read" {
				t.Fatalf("read past the deadline: %v (%T), want a *net.OpError read timeout", err, err)
			}
			c.SetReadDeadline(time.Time{})

			// Both ways, and a half close.
			if _, err := client.Write([]byte("ping")); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 4)
			if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
				t.Fatalf("read %q, %v", b, err)
			}
			if _, err := c.Write([]byte("pong")); err != nil {
				t.Fatal(err)
			}
			if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			client.SetReadDeadline(time.Now().Add(10 * time.Second))
			if got, err := io.ReadAll(client); err != nil || string(got) != "pong" {
				t.Fatalf("client read %q, %v; want pong then EOF", got, err)
			}
			if _, err := client.Write([]byte("still")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, len("still"))); err != nil {
				t.Fatalf("read after CloseWrite: %v", err)
			}

			// The peer's close is io.EOF, itself.
			client.Close()
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(c, make([]byte, 1)); err != io.EOF && err != io.ErrUnexpectedEOF {
				t.Errorf("read after the peer closed: %v, want io.EOF", err)
			}

			// Closed: net.ErrClosed, as net.Conn says.
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			if _, err := c.Read(b); !errors.Is(err, net.ErrClosed) || !errors.As(err, &oe) {
				t.Errorf("read after Close: %v, want a *net.OpError with net.ErrClosed", err)
			}
			for what, err := range map[string]error{
				"SetReadDeadline": c.SetReadDeadline(time.Now()),
				"CloseWrite":      c.(interface{ CloseWrite() error }).CloseWrite(),
				"Close":           c.Close(),
			} {
				if !errors.Is(err, net.ErrClosed) {
					t.Errorf("%s after Close: %v, want net.ErrClosed", what, err)
				}
			}
		})
	}
}

// A reset is a system call's error, as package net gives it.
func TestConnResetIsASyscallError(t *testing.T) {
	f, client, _ := pair(t, "tcp")
	c := through(t, f)
	client.(*net.TCPConn).SetLinger(0)
	client.Close() // RST
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	var se *os.SyscallError
	if !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &se) {
		t.Errorf("read after a reset: %v (%T), want ECONNRESET in an *os.SyscallError", err, err)
	}
}

// A descriptor the runtime cannot poll (blocking) is served as net.FileConn
// makes it, with working deadlines.
func TestAddTakesABlockingDescriptorThroughFileConn(t *testing.T) {
	fd, _, _ := pair(t, "tcp")
	if err := unix.SetNonblock(fd, false); err != nil {
		t.Fatal(err)
	}
	c := through(t, fd)
	if _, ok := c.(*net.TCPConn); !ok {
		t.Fatalf("accepted %T, want *net.TCPConn", c)
	}
	c.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read past the deadline: %v", err)
	}
	if !closedFD(fd) {
		t.Errorf("the descriptor given to Add is still open: FileConn has its own copy")
	}
}

// BenchmarkAdd is the new generation's cost of taking one moved connection,
// from the descriptor received to the net.Conn accepted: Add and Accept (a
// *Conn) against net.FileConn, which this package used before. Closing is
// not counted.
func BenchmarkAdd(b *testing.B) {
	const batch = 200
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	// batch received descriptors, with their clients.
	prepare := func() (fds []int, closers []io.Closer) {
		for range batch {
			client, err := net.Dial("tcp", ln.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			sc, err := ln.Accept()
			if err != nil {
				b.Fatal(err)
			}
			raw, _ := sc.(syscall.Conn).SyscallConn()
			nfd := -1
			raw.Control(func(fd uintptr) { nfd, err = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0) })
			if err != nil {
				b.Fatal(err)
			}
			fds = append(fds, nfd)
			closers = append(closers, client, sc)
		}
		return fds, closers
	}
	for _, bc := range []struct {
		name string
		take func(int) net.Conn
	}{
		{"Conn", func(fd int) net.Conn {
			ml := New(&net.TCPAddr{})
			if err := ml.Add(fd); err != nil {
				b.Fatal(err)
			}
			nc, err := ml.Accept()
			if err != nil {
				b.Fatal(err)
			}
			return nc
		}},
		{"FileConn", func(fd int) net.Conn {
			f := os.NewFile(uintptr(fd), "moved")
			nc, err := net.FileConn(f)
			f.Close()
			if err != nil {
				b.Fatal(err)
			}
			return nc
		}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.StopTimer()
			for done := 0; done < b.N; {
				fds, closers := prepare()
				n := min(batch, b.N-done)
				conns := make([]net.Conn, 0, n)
				b.StartTimer()
				for _, fd := range fds[:n] {
					conns = append(conns, bc.take(fd))
				}
				b.StopTimer()
				for _, c := range conns {
					c.Close()
				}
				for _, fd := range fds[n:] {
					unix.Close(fd)
				}
				for _, c := range closers {
					c.Close()
				}
				done += n
			}
			// The process's peak so far: the second sub-benchmark's covers the first's.
			if kib, ok := itest.VmHWM(os.Getpid()); ok {
				b.ReportMetric(float64(kib)/1024, "peak-rss-MiB")
			}
		})
	}
}

// ReadFrom sends files (whole, or within an io.LimitedReader) and copies
// anything else, leaving the reader where a copy would.
func TestConnReadFrom(t *testing.T) {
	data := make([]byte, 3<<20) // more than a socket buffer: sendfile waits for the client
	for i := range data {
		data[i] = byte(i * 7)
	}
	path := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	go func() {
		pw.Write(data[:5000])
		pw.Close()
	}()
	for _, tc := range []struct {
		name string
		src  func(t *testing.T) io.Reader
		want []byte
	}{
		{"file", func(t *testing.T) io.Reader { return open(t, path, 0) }, data},
		{"file from its offset", func(t *testing.T) io.Reader { return open(t, path, 1000) }, data[1000:]},
		{"limited file", func(t *testing.T) io.Reader { return &io.LimitedReader{R: open(t, path, 10), N: 70000} }, data[10:70010]},
		{"pipe", func(t *testing.T) io.Reader { return pr }, data[:5000]},
		{"not a file", func(t *testing.T) io.Reader { return bytes.NewReader(data[:100]) }, data[:100]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, client, _ := pair(t, "tcp")
			c := through(t, f).(*Conn)
			src := tc.src(t)
			got := make(chan []byte, 1)
			go func() {
				client.SetReadDeadline(time.Now().Add(20 * time.Second))
				b, _ := io.ReadAll(client)
				got <- b
			}()
			n, err := c.ReadFrom(src)
			if err != nil || n != int64(len(tc.want)) {
				t.Errorf("ReadFrom: %d, %v; want %d", n, err, len(tc.want))
			}
			c.Close()
			if b := <-got; !bytes.Equal(b, tc.want) {
				t.Errorf("the client got %d bytes, not the %d sent", len(b), len(tc.want))
			}
			if lr, ok := src.(*io.LimitedReader); ok && lr.N != 0 {
				t.Errorf("limited reader left at N=%d, want 0", lr.N)
			}
			if of, ok := src.(*os.File); ok && of != pr {
				if at, _ := of.Seek(0, io.SeekCurrent); at != int64(len(data)) {
					t.Errorf("file offset %d after ReadFrom, want its end %d", at, len(data))
				}
			}
		})
	}
}

// sendFile takes a file (sendfile), and leaves a pipe to the copy.
func TestSendFileSendsFilesOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(path, make([]byte, 10000), 0o600); err != nil {
		t.Fatal(err)
	}
	f, client, _ := pair(t, "tcp")
	c := through(t, f).(*Conn)
	go io.Copy(io.Discard, client)
	if n, sent, err := c.sendFile(open(t, path, 0), 4000); n != 4000 || !sent || err != nil {
		t.Errorf("sendFile of a file: %d, %v, %v; want 4000 sent", n, sent, err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	defer pw.Close()
	pw.Write([]byte("data"))
	if n, sent, err := c.sendFile(pr, 4); n != 0 || sent || err != nil {
		t.Errorf("sendFile of a pipe: %d, %v, %v; want nothing sent, to copy", n, sent, err)
	}
}

// Add after Close fails, every time, and closes what it was given.
func TestAddAfterCloseFails(t *testing.T) {
	ln := New(&net.TCPAddr{})
	ln.Close()
	for range 50 {
		fd, _, _ := pair(t, "tcp")
		if err := ln.Add(fd); err != ErrClosed {
			t.Fatalf("Add after Close: %v, want ErrClosed", err)
		}
		if !closedFD(fd) {
			t.Fatal("the descriptor given to Add is still open")
		}
	}
}

// Accept skips a descriptor it cannot serve (not a connected stream socket)
// and closes it; AcceptFD gives descriptors as they came.
func TestAcceptSkipsWhatItCannotServe(t *testing.T) {
	ln := New(&net.TCPAddr{})
	defer ln.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	pfd, err := unix.Dup(int(r.Fd()))
	r.Close()
	if err != nil {
		t.Fatal(err)
	}
	fd, client, _ := pair(t, "tcp")
	if err := ln.Add(pfd); err != nil {
		t.Fatal(err)
	}
	if err := ln.Add(fd); err != nil {
		t.Fatal(err)
	}
	nc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if nc.RemoteAddr().String() != client.LocalAddr().String() {
		t.Errorf("accepted %v, want the connection from %v", nc.RemoteAddr(), client.LocalAddr())
	}
	if !closedFD(pfd) {
		t.Error("the pipe's descriptor was not closed")
	}
	fd2, _, _ := pair(t, "tcp")
	if err := ln.Add(fd2); err != nil {
		t.Fatal(err)
	}
	if got, err := ln.AcceptFD(); err != nil || got != fd2 {
		t.Errorf("AcceptFD: %d, %v; want %d", got, err, fd2)
	}
	unix.Close(fd2)
}

func open(t *testing.T, path string, at int64) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if _, err := f.Seek(at, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	return f
}
