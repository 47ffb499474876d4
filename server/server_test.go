package server

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// start serves h on a loopback listener and returns the server and its address.
func start(t *testing.T, h http.Handler, grace time.Duration) (*Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &Server{Handler: h, IdleGrace: grace}
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Drain(ctx) // a no-op error when the test drained already
		select {
		case err := <-done:
			assert.ErrorIs(t, err, ErrDraining)
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after Drain")
		}
	})
	return s, ln.Addr().String()
}

// client is one keep-alive connection that sends requests by hand: no retries.
type client struct {
	t    *testing.T
	conn net.Conn
	br   *bufio.Reader
}

func dial(t *testing.T, addr string) *client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(10*time.Second)))
	return &client{t: t, conn: c, br: bufio.NewReader(c)}
}

func (c *client) send(path string) {
	c.t.Helper()
	_, err := io.WriteString(c.conn, "GET "+path+" HTTP/1.1\r\nHost: test\r\n\r\n")
	require.NoError(c.t, err)
}

func (c *client) read() *http.Response {
	c.t.Helper()
	resp, err := http.ReadResponse(c.br, nil)
	require.NoError(c.t, err)
	_, err = io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	resp.Body.Close()
	return resp
}

func (c *client) get(path string) *http.Response {
	c.t.Helper()
	c.send(path)
	return c.read()
}

// closedByServer reports whether the server has closed the connection.
func (c *client) closedByServer() bool {
	_, err := c.br.ReadByte()
	return errors.Is(err, io.EOF)
}

func eventually(t *testing.T, cond func() bool, msg string) {
	t.Helper()
	require.Eventually(t, cond, 5*time.Second, time.Millisecond, msg)
}

// tracked is how many connections s has accepted and not yet forgotten.
func tracked(s *Server) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func drainAsync(s *Server, ctx context.Context) <-chan Report { return drainToAsync(s, ctx, nil) }

// drainToAsync runs DrainTo(ctx, m) and delivers its report.
func drainToAsync(s *Server, ctx context.Context, m Mover) <-chan Report {
	c := make(chan Report, 1)
	go func() {
		rep, _ := s.DrainTo(ctx, m)
		c <- rep
	}()
	return c
}

func waitReport(t *testing.T, c <-chan Report) Report {
	t.Helper()
	select {
	case rep := <-c:
		return rep
	case <-time.After(10 * time.Second):
		t.Fatal("drain did not return")
	}
	return Report{}
}

func TestDrainAnswersInFlightRequestAndClosesAfterIt(t *testing.T) {
	release := make(chan struct{})
	s, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-release
		io.WriteString(w, "done")
	}), time.Hour)
	c := dial(t, addr)
	c.send("/")
	eventually(t, func() bool { return s.InFlight() == 1 }, "request in flight")

	reports := drainAsync(s, context.Background())
	eventually(t, s.Draining, "drain begun")
	close(release)

	resp := c.read()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.True(t, resp.Close, "an answer given while draining says Connection: close")
	assert.True(t, c.closedByServer())
	rep := waitReport(t, reports)
	assert.Equal(t, Report{Requests: 1, ClosedAfterResponse: 1}, withoutDuration(rep))
}

func TestDrainClosesIdleConnectionAfterGrace(t *testing.T) {
	s, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), 20*time.Millisecond)
	c := dial(t, addr)
	resp := c.get("/")
	assert.False(t, resp.Close, "keep-alive while serving")
	silent := dial(t, addr) // accepted, never sends a request
	// Dial returns once the kernel has the connection; the drain counts it
	// only once Serve has accepted it (one still queued is reset instead).
	eventually(t, func() bool { return tracked(s) == 2 }, "both connections accepted")

	rep, err := s.Drain(context.Background())
	require.NoError(t, err)
	assert.Equal(t, Report{ClosedIdle: 2}, withoutDuration(rep))
	assert.GreaterOrEqual(t, rep.Duration, 20*time.Millisecond)
	assert.True(t, c.closedByServer())
	assert.True(t, silent.closedByServer())
}

// The trap in net/http's Shutdown: a request sent on an idle keep-alive connection
// just as the drain begins. Here it is answered.
func TestDrainAnswersRequestSentOnIdleConnection(t *testing.T) {
	s, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	}), 200*time.Millisecond)
	c := dial(t, addr)
	c.get("/")

	reports := drainAsync(s, context.Background())
	eventually(t, s.Draining, "drain begun")
	resp := c.get("/")
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.True(t, resp.Close)
	assert.True(t, c.closedByServer())
	rep := waitReport(t, reports)
	assert.Equal(t, Report{Requests: 1, ClosedAfterResponse: 1}, withoutDuration(rep))
}

func TestDrainWaitsForHijackedConnectionToLeave(t *testing.T) {
	leave := make(chan struct{})
	s, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		bw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: test\r\nConnection: Upgrade\r\n\r\n")
		bw.Flush()
		<-leave
		bw.WriteString("bye")
		bw.Flush()
	}), time.Hour)
	s.RegisterOnDrain(func() { close(leave) })
	c := dial(t, addr)
	resp := c.get("/ws")
	require.Equal(t, http.StatusSwitchingProtocols, resp.StatusCode)

	rep, err := s.Drain(context.Background())
	require.NoError(t, err)
	assert.Equal(t, Report{Requests: 0, Hijacked: 1}, withoutDuration(rep))
	msg, err := io.ReadAll(c.br)
	require.NoError(t, err)
	assert.Equal(t, "bye", string(msg))
}

func TestDrainCutsWhatRemainsAtTheDeadline(t *testing.T) {
	hijacked := make(chan struct{})
	s, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/ws" {
			conn, _, err := http.NewResponseController(w).Hijack()
			close(hijacked)
			if err == nil {
				go func() {
					io.Copy(io.Discard, conn) // ignores the drain; ends when cut
					conn.Close()
				}()
			}
			return
		}
		<-r.Context().Done() // never answers on its own
	}), time.Hour)
	slow := dial(t, addr)
	slow.send("/stuck")
	ws := dial(t, addr)
	ws.send("/ws")
	select {
	case <-hijacked:
	case <-time.After(5 * time.Second):
		t.Fatal("not hijacked")
	}
	eventually(t, func() bool { return s.InFlight() == 1 }, "the stuck request in flight")

	ctx, cancel := context.WithTimeoutCause(context.Background(), 50*time.Millisecond, errors.New("deadline"))
	defer cancel()
	rep, err := s.Drain(ctx)
	assert.EqualError(t, err, "deadline")
	assert.Equal(t, 2, rep.Cut)
	_, err = http.ReadResponse(slow.br, nil)
	assert.Error(t, err, "the stuck request got no answer: it was cut")
}

func TestServeAfterDrainIsRefused(t *testing.T) {
	s, _ := start(t, http.NotFoundHandler(), time.Millisecond)
	_, err := s.Drain(context.Background())
	require.NoError(t, err)
	_, err = s.Drain(context.Background())
	assert.ErrorIs(t, err, ErrDraining)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	assert.ErrorIs(t, s.Serve(ln), ErrDraining)
	_, err = net.Dial("tcp", ln.Addr().String())
	assert.Error(t, err, "the refused listener is closed")
}

func TestPendingSeesUnreadBytes(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	sc, err := ln.Accept()
	require.NoError(t, err)
	defer sc.Close()

	assert.False(t, pending(sc))
	_, err = c.Write([]byte("GET"))
	require.NoError(t, err)
	eventually(t, func() bool { return pending(sc) }, "bytes seen without reading them")
	buf := make([]byte, 3)
	_, err = io.ReadFull(sc, buf)
	require.NoError(t, err)
	assert.Equal(t, "GET", string(buf), "peeking took nothing")
}

func withoutDuration(r Report) Report {
	r.Duration = 0
	return r
}

// Drain returns only once the handlers of the requests it cut have returned,
// or reports those that still run after AfterCut.
func TestDrainWaitsForCutHandlers(t *testing.T) {
	var finished atomic.Bool
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	s, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/stubborn" {
			<-release // ignores its context
			return
		}
		<-r.Context().Done()
		time.Sleep(100 * time.Millisecond) // cleanup after the cut: what Drain must wait for
		finished.Store(true)
	}), time.Hour)
	s.AfterCut = 10 * time.Second // a bound, not a wait: Drain returns as soon as the handler does
	dial(t, addr).send("/cleanup")
	eventually(t, func() bool { return s.InFlight() == 1 }, "the request in flight")

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	rep, err := s.Drain(ctx)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	assert.Equal(t, 1, rep.Cut)
	assert.True(t, finished.Load(), "Drain returned while a cut request's handler still ran")
	assert.Zero(t, rep.Running)

	s2, addr2 := start(t, s.Handler, time.Hour)
	s2.AfterCut = 50 * time.Millisecond
	dial(t, addr2).send("/stubborn")
	eventually(t, func() bool { return s2.InFlight() == 1 }, "the stubborn request in flight")
	ctx2, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	rep, _ = s2.Drain(ctx2)
	assert.Equal(t, int64(1), rep.Running, "a handler that ignores its context is reported")
}

// StopAccepting closes the listeners at once, and Serve returns ErrDraining,
// but the connections already accepted are served as in steady state (no
// Connection: close) until the drain, which then finds them.
func TestStopAcceptingKeepsAcceptedConnectionsServing(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), IdleGrace: time.Millisecond}
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	c := dial(t, ln.Addr().String())
	assert.False(t, c.get("/").Close)

	s.StopAccepting()
	select {
	case err := <-served:
		assert.ErrorIs(t, err, ErrDraining, "Serve says it stopped for a drain, not that it failed")
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return after StopAccepting")
	}
	_, err = net.Dial("tcp", ln.Addr().String())
	assert.Error(t, err, "the listener is closed")
	assert.False(t, s.Draining())
	assert.False(t, c.get("/").Close, "an accepted connection is served as before: no drain yet")

	ln2, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	assert.ErrorIs(t, s.Serve(ln2), ErrDraining, "no Serve once it stopped accepting")
	s.StopAccepting() // again: nothing more to do

	rep := waitReport(t, drainAsync(s, context.Background()))
	assert.Equal(t, 1, rep.ClosedIdle, "the drain found the connection accepted before")
	assert.True(t, c.closedByServer())
}
