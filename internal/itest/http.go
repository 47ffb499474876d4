package itest

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"
)

var httpClient = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

// Response is what the tests check of an HTTP response: the handoff servers
// and the examples name their PID and version in headers.
type Response struct {
	Status  int
	PID     int    // Handoff-Pid
	Version string // Handoff-Version
	Body    string
}

// Get does GET http://addr+path on a fresh connection (10s at most).
func Get(addr, path string) (Response, error) {
	resp, err := httpClient.Get("http://" + addr + path)
	if err != nil {
		return Response{}, err
	}
	return ReadResponse(resp)
}

// ReadResponse reads resp's body to its end, closes it, and returns the
// Response.
func ReadResponse(resp *http.Response) (Response, error) {
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return Response{}, err
	}
	pid, _ := strconv.Atoi(resp.Header.Get("Handoff-Pid"))
	return Response{Status: resp.StatusCode, PID: pid, Version: resp.Header.Get("Handoff-Version"), Body: string(body)}, nil
}

// Inflight is a request started by [StartRequest]. Resp and Err are set once
// Done is closed.
type Inflight struct {
	Done chan struct{}
	Resp Response
	Err  error
}

func (r *Inflight) String() string {
	if r.Err != nil {
		return "error: " + r.Err.Error()
	}
	return fmt.Sprintf("status %d pid %d version %q body %q", r.Resp.Status, r.Resp.PID, r.Resp.Version, r.Resp.Body)
}

// StartRequest sends GET path on a new connection to addr and returns once
// the server (listening on serverPort) has read the request (the server side
// of the connection has an empty receive queue in /proc/net/tcp), so it is
// surely being handled by the process that accepted it. The response is read
// in the background, within timeout; the connection is closed at cleanup.
func StartRequest(tb testing.TB, addr string, serverPort int, path string, timeout time.Duration) *Inflight {
	tb.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { conn.Close() })
	clientPort := conn.LocalAddr().(*net.TCPAddr).Port
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		tb.Fatal(err)
	}
	req := "GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		tb.Fatalf("write request: %v", err)
	}
	Eventually(tb, 10*time.Second, func() bool {
		for _, e := range ReadTCP() {
			if e.LocalPort == serverPort && e.RemPort == clientPort && e.State == TCPEstablished {
				return e.RxQueue == 0
			}
		}
		return false
	}, "the server to read the request %s (client port %d)", path, clientPort)
	return ReadInflight(conn)
}

// ReadInflight reads the response to the request sent on conn in the
// background; its Done closes once it is read or failed.
func ReadInflight(conn net.Conn) *Inflight {
	r := &Inflight{Done: make(chan struct{})}
	go func() {
		defer close(r.Done)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err == nil {
			r.Resp, err = ReadResponse(resp)
		}
		r.Err = err
	}()
	return r
}
