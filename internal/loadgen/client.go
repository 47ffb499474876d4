package loadgen

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// conn is a client connection with its response reader.
type conn struct {
	net.Conn
	br *bufio.Reader
	id uint32 // the runner's count of connections dialed, from 1
}

// alive reports whether an idle pooled connection can still carry a request.
// It peeks at the socket without blocking (MSG_PEEK|MSG_DONTWAIT). EAGAIN
// means the connection is alive. EOF or any error means the server closed it.
// A byte that nobody asked for (an early 408, say) also makes the connection
// unusable. In those cases the caller drops the connection and takes or dials
// another.
//
// The check sends nothing. So dropping the connection is not a retry: no byte
// of the request has been written anywhere yet. A server can still close the
// connection between this check and the write. That race is inherent to
// HTTP/1.1 keep-alive, and such a request fails and is counted.
//
// A Read with an already-expired deadline cannot do this job. Go's poller
// returns the timeout without calling read(2).
func (c *conn) alive() bool {
	if c.br.Buffered() > 0 {
		return false
	}
	sc, ok := c.Conn.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var peekErr error
	var buf [1]byte
	if err := rc.Read(func(fd uintptr) bool {
		_, _, peekErr = unix.Recvfrom(int(fd), buf[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return true // never wait for readiness
	}); err != nil {
		return false
	}
	return errors.Is(peekErr, unix.EAGAIN)
}

// pool keeps up to max idle keep-alive connections. It is LIFO: the most
// recently used connection is reused first. That keeps few connections busy
// at low rates, and the rest may be closed by the server's idle timeout. When
// that happens, the alive check catches it.
type pool struct {
	mu   sync.Mutex
	idle []*conn
	max  int
}

// get returns a live idle connection, or nil when there is none.
func (p *pool) get() *conn {
	for {
		p.mu.Lock()
		n := len(p.idle)
		if n == 0 {
			p.mu.Unlock()
			return nil
		}
		c := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		if c.alive() {
			return c
		}
		c.Close()
	}
}

// put makes c idle, or closes it when the pool is full.
func (p *pool) put(c *conn) {
	c.SetDeadline(time.Time{}) // an expired deadline would defeat the alive check
	p.mu.Lock()
	if len(p.idle) < p.max {
		p.idle = append(p.idle, c)
		c = nil
	}
	p.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

func (p *pool) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.idle {
		c.Close()
	}
	p.idle = nil
}

// exchange sends request i once and reads its response.
func (r *runner) exchange(i int64) (o outcome) {
	slow := pick(i, r.cfg.SlowFraction, 0)
	fresh := pick(i, r.cfg.NewConnFraction, 0.5)
	req := r.reqs[b2i(slow)][b2i(fresh)]
	o.start = time.Now()
	deadline := o.start.Add(r.cfg.Timeout)
	defer func() { o.end = time.Now() }()
	fail := func(kind string, err error) outcome {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			kind = "timeout"
		}
		o.kind, o.err = kind, fmt.Errorf("%s: %w", requestLine(req), err)
		return o
	}

	var c *conn
	if !fresh {
		c = r.pool.get()
	}
	if c == nil {
		nc, err := r.dial(deadline)
		if err != nil {
			o.kind, o.err = "dial", err
			return o
		}
		c = &conn{Conn: nc, br: bufio.NewReader(nc), id: r.dialed.Add(1)}
	}
	o.conn, o.fresh = c.id, fresh
	c.SetDeadline(deadline)
	if _, err := c.Write(req); err != nil {
		c.Close()
		return fail("write", err)
	}
	resp, err := http.ReadResponse(c.br, nil)
	if err == nil {
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if err != nil {
		c.Close()
		return fail("read", err)
	}
	if fresh || resp.Close {
		c.Close()
	} else {
		r.pool.put(c)
	}
	o.responded = true
	o.pid, _ = strconv.Atoi(resp.Header.Get("Handoff-Pid")) // 0 when missing or malformed
	o.version = resp.Header.Get("Handoff-Version")
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fail("status", fmt.Errorf("status %s", resp.Status))
	}
	return o
}

// dial connects to the target, giving up at deadline.
func (r *runner) dial(deadline time.Time) (net.Conn, error) {
	d := net.Dialer{Deadline: deadline}
	return d.Dial(r.cfg.Network, r.cfg.Addr)
}

// requestLine returns "GET /path" from the request bytes, for error messages.
func requestLine(req []byte) string {
	line, _, _ := strings.Cut(string(req), " HTTP/")
	return line
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}
