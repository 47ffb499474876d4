// Package control is the control socket of `handoff serve` and `handoff run`:
// its wire format (one JSON line each way, ProtocolVersion), the client (Ask),
// the server (Serve, Listen, with a peer-credential check), and the outcomes it
// reports (the errors of an upgrade attempt and their kinds).
package control

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/handoff-dev/handoff/internal/sockaddr"
)

// ProtocolVersion is the version of the control socket's JSON documents.
const ProtocolVersion = 1

// MaxMessage bounds a control request or answer, newline included.
const MaxMessage = 64 << 10

// controlTimeout bounds reading a request and writing an answer.
const controlTimeout = 5 * time.Second

// Request is what a client sends on the control socket: one JSON document on
// one line, one request per connection.
type Request struct {
	V    int  `json:"v"`
	Cmd  Cmd  `json:"cmd"`
	Wait bool `json:"wait,omitempty"` // upgrade: wait for a draining previous generation
}

// Cmd is a control command.
type Cmd string

// The commands.
const (
	CmdStatus  Cmd = "status"
	CmdUpgrade Cmd = "upgrade"
	CmdStop    Cmd = "stop" // a graceful stop; the answer comes once the drain is over
)

// Answer is the server's reply, one JSON document on one line.
type Answer struct {
	V       int      `json:"v"`
	PID     int      `json:"pid"` // the process that answered
	OK      bool     `json:"ok"`
	Error   string   `json:"error,omitempty"`
	Kind    Kind     `json:"kind,omitempty"` // KindOf the error
	Upgrade *Outcome `json:"upgrade,omitempty"`
	Status  *Status  `json:"status,omitempty"`
	Stop    *Drain   `json:"stop,omitempty"`
}

// Outcome is an upgrade's result as the control socket reports it.
type Outcome struct {
	At         time.Time `json:"at"`
	OK         bool      `json:"ok"`
	PID        int       `json:"pid,omitempty"` // the new process (also when it failed, if it started)
	Version    string    `json:"version,omitempty"`
	Generation int       `json:"generation,omitempty"`
	DurationMS float64   `json:"duration_ms"`
	Error      string    `json:"error,omitempty"`
	Kind       Kind      `json:"kind,omitempty"`
	ExitStatus string    `json:"exit_status,omitempty"`
	Stderr     []string  `json:"stderr,omitempty"` // last lines of the new process's stderr, when it failed
}

// Result describes the generation that took over after a successful upgrade.
type Result struct {
	PID        int
	Version    string
	Generation int
	Duration   time.Duration // from the start of the upgrade to the new generation's ready
}

// Status describes a generation.
type Status struct {
	PID         int            `json:"pid"`
	Generation  int            `json:"generation"`
	Version     string         `json:"version"`
	Started     time.Time      `json:"started"`
	Phase       gate.Phase     `json:"phase"`
	Listeners   []ListenerInfo `json:"listeners"`
	InFlight    int64          `json:"in_flight"`
	PreviousPID int            `json:"previous_pid,omitempty"` // while the previous generation drains
	LastUpgrade *Outcome       `json:"last_upgrade,omitempty"`
	Children    []ChildStatus  `json:"children,omitempty"` // handoff run: the supervised processes
}

// ChildStatus is one process that handoff run supervises.
type ChildStatus struct {
	PID        int        `json:"pid"`
	Instance   int        `json:"instance"`
	Generation int        `json:"generation"` // the rollout that started it (a failed --max-surge rollout leaves a mixed set)
	Phase      ChildPhase `json:"phase"`
	Since      time.Time  `json:"since"` // when it entered Phase
	Started    time.Time  `json:"started"`
	Ready      time.Time  `json:"ready,omitzero"`     // when it became ready
	Restarts   int        `json:"restarts,omitempty"` // of its instance before it (crashes)
}

// ChildPhase is where a child of handoff run is in its life.
type ChildPhase string

// The phases of a child.
const (
	ChildStarting ChildPhase = "starting"
	ChildServing  ChildPhase = "serving"
	ChildDraining ChildPhase = "draining"
)

// ListenerInfo names one listener.
type ListenerInfo struct {
	Network string `json:"network"`
	Addr    string `json:"addr"`
}

// ErrNoAnswer: nothing answers on the control socket.
var ErrNoAnswer = errors.New("no answer on control socket")

// decodeRequest reads one request line of at most MaxMessage bytes.
func decodeRequest(r io.Reader) (Request, error) {
	var req Request
	line, err := bufio.NewReaderSize(io.LimitReader(r, MaxMessage+1), MaxMessage+1).ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) || len(line) > MaxMessage {
		return req, fmt.Errorf("request longer than %d bytes", MaxMessage)
	}
	if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
		return req, fmt.Errorf("read request: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return req, fmt.Errorf("decode request: %w", err)
	}
	if dec.More() {
		return req, errors.New("decode request: more than one document")
	}
	if req.V != ProtocolVersion {
		return req, fmt.Errorf("unsupported protocol version %d (this server speaks %d)", req.V, ProtocolVersion)
	}
	switch req.Cmd {
	case CmdStatus, CmdUpgrade, CmdStop:
	default:
		return req, fmt.Errorf("unknown command %q (status, upgrade, stop)", req.Cmd)
	}
	return req, nil
}

// Controller is what a control socket drives: an upgrader's generation, or the
// supervisor of another program.
type Controller interface {
	Status() Status
	// Upgrade blocks until the upgrade's outcome is known; wait says whether to
	// wait for a draining previous generation instead of failing.
	Upgrade(ctx context.Context, wait bool) (Result, error)
	// Stop stops gracefully and blocks until the drain is over; it returns
	// what the drain did.
	Stop(ctx context.Context) (Drain, error)
}

// Drain says what a graceful stop's drain did.
type Drain struct {
	Requests   int64   `json:"requests"`          // answered while draining
	Closed     int     `json:"closed"`            // connections closed between requests (idle, after an answer, hijacked, HTTP/2)
	Moved      int     `json:"moved,omitempty"`   // connections handed to a new generation
	Cut        int     `json:"cut"`               // connections closed at the deadline, requests in flight or not
	Running    int64   `json:"running,omitempty"` // handlers still running at the end
	DurationMS float64 `json:"duration_ms"`
	Error      string  `json:"error,omitempty"`    // why the drain ended early (the deadline, a second signal)
	Children   int     `json:"children,omitempty"` // handoff run: children stopped
	Killed     int     `json:"killed,omitempty"`   // handoff run: children killed at the deadline
}

// Clean reports whether the drain finished without cutting anything.
func (d Drain) Clean() bool { return d.Cut == 0 && d.Killed == 0 && d.Error == "" }

// Listen opens a control socket at path, mode 0600, removing a stale socket
// file first.
func Listen(path string) (*net.UnixListener, error) {
	sockaddr.RemoveStale(path)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("open control socket: %w", err)
	}
	return Chmod(ln, path)
}

// Chmod gives an inherited control socket its mode, 0600.
func Chmod(ln *net.UnixListener, path string) (*net.UnixListener, error) {
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("chmod control socket: %w", err)
	}
	return ln, nil
}

// Serve answers control requests on ln for ctl. It blocks until ln is
// closed and every request accepted has been answered (each within a few
// seconds: reads and writes have deadlines; an upgrade's verdict is awaited).
func Serve(ln *net.UnixListener, ctl Controller, log *slog.Logger) {
	var answering sync.WaitGroup
	idle := &idleConns{conns: map[*net.UnixConn]bool{}}
	defer func() {
		idle.closeAll()
		answering.Wait()
	}()
	var delay time.Duration // after a failed accept, as net/http's Serve does
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) &&
				!errors.Is(err, syscall.ENOBUFS) && !errors.Is(err, syscall.ENOMEM) {
				return // closed, or broken for good
			}
			// Out of descriptors or memory for a while: the socket stays, and
			// so do we.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			if log != nil {
				log.Warn("control socket: accept failed: retrying", "error", err, "in", delay)
			}
			time.Sleep(delay)
			continue
		}
		delay = 0
		idle.add(c)
		answering.Add(1)
		go func() {
			defer answering.Done()
			answer(c, ctl, log, idle)
		}()
	}
}

// idleConns are the connections that only read: waiting for a request, or
// discarding the rest of a bad one. Once the listener is closed, they are not
// waited for: the generation is going away.
type idleConns struct {
	mu     sync.Mutex
	conns  map[*net.UnixConn]bool
	closed bool
}

func (ic *idleConns) add(c *net.UnixConn) {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	ic.conns[c] = true
	if ic.closed {
		c.SetReadDeadline(time.Now())
	}
}

// busy takes c off the list; it reports whether the server is closing.
func (ic *idleConns) busy(c *net.UnixConn) (closing bool) {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	delete(ic.conns, c)
	return ic.closed
}

func (ic *idleConns) closeAll() {
	ic.mu.Lock()
	defer ic.mu.Unlock()
	ic.closed = true
	for c := range ic.conns {
		c.SetReadDeadline(time.Now())
	}
}

// answer answers one connection.
func answer(c *net.UnixConn, ctl Controller, log *slog.Logger, idle *idleConns) {
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(controlTimeout))
	ans := Answer{V: ProtocolVersion, PID: os.Getpid()}
	// The request is read first, even from a peer that is then refused, so that
	// the peer's write succeeds and it reads the refusal.
	req, err := decodeRequest(c)
	if perr := checkPeer(c); perr != nil {
		log.Warn("control request refused", "error", perr)
		ans.Error, ans.Kind = perr.Error(), KindRefused
		writeAnswer(c, ans)
		discardRest(c, idle)
		return
	}
	if err != nil {
		if idle.busy(c) {
			return // an idle connection cut by the close
		}
		ans.Error, ans.Kind = err.Error(), KindBadRequest
		writeAnswer(c, ans)
		discardRest(c, idle)
		return
	}
	idle.busy(c)
	c.SetReadDeadline(time.Time{})
	switch req.Cmd {
	case CmdStatus:
		st := ctl.Status()
		ans.OK, ans.Status = true, &st
	case CmdStop:
		d, err := ctl.Stop(context.Background())
		ans.OK, ans.Stop = err == nil, &d
		if err != nil {
			ans.Error, ans.Kind = err.Error(), KindOf(err)
		}
	case CmdUpgrade:
		// The client's closing the connection does not cancel the upgrade; it
		// only stops waiting.
		res, err := ctl.Upgrade(context.Background(), req.Wait)
		o := NewOutcome(res, err)
		ans.OK, ans.Upgrade = err == nil, &o
		if err != nil {
			ans.Error, ans.Kind = err.Error(), KindOf(err)
		}
	}
	writeAnswer(c, ans)
}

// discardRest reads what the client is still sending (an oversized request,
// say) until it stops, for a bounded moment, so that its write completes and it
// reads the answer: closing a Unix socket with unread data resets the peer.
func discardRest(c *net.UnixConn, idle *idleConns) {
	c.CloseWrite()
	c.SetReadDeadline(time.Now().Add(controlTimeout))
	idle.add(c) // cut at once if the server is closing
	defer idle.busy(c)
	io.Copy(io.Discard, io.LimitReader(c, 64<<20))
}

func writeAnswer(c net.Conn, ans Answer) {
	c.SetWriteDeadline(time.Now().Add(controlTimeout))
	b, _ := json.Marshal(ans)
	c.Write(append(b, '\n'))
}

// checkPeer admits the same user and root.
func checkPeer(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return err
	}
	if credErr != nil {
		return fmt.Errorf("read peer credentials: %w", credErr)
	}
	if me := uint32(os.Getuid()); cred.Uid != 0 && cred.Uid != me {
		return fmt.Errorf("permission denied: uid %d may not use this control socket (only uid %d and root)", cred.Uid, me)
	}
	return nil
}

// NewOutcome describes an upgrade's result for the control socket.
func NewOutcome(res Result, err error) Outcome {
	o := Outcome{At: time.Now().UTC(), OK: err == nil, PID: res.PID, Version: res.Version,
		Generation: res.Generation, DurationMS: float64(res.Duration.Microseconds()) / 1000}
	if err == nil {
		return o
	}
	o.Error, o.Kind = err.Error(), KindOf(err)
	var exit *ExitError
	if errors.As(err, &exit) {
		o.PID, o.ExitStatus, o.Stderr = exit.PID, exit.Status, exit.Stderr
	}
	var timeout *TimeoutError
	if errors.As(err, &timeout) {
		o.PID, o.Stderr = timeout.PID, timeout.Stderr
	}
	var pre *PreflightError
	if errors.As(err, &pre) {
		o.ExitStatus, o.Stderr = pre.Status, pre.Output
	}
	return o
}

// Ask sends one request to the control socket at path and returns the answer.
// It fails with ErrNoAnswer when nothing listens there; ctx bounds the wait.
func Ask(ctx context.Context, path string, req Request) (Answer, error) {
	var ans Answer
	req.V = ProtocolVersion
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return ans, fmt.Errorf("%w %s: %w", ErrNoAnswer, path, err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	b, _ := json.Marshal(req)
	_, werr := c.Write(append(b, '\n'))
	// Even when the write failed, an answer (a refusal) may be waiting.
	line, err := bufio.NewReaderSize(io.LimitReader(c, MaxMessage), MaxMessage).ReadBytes('\n')
	if err != nil && werr != nil {
		return ans, fmt.Errorf("%w %s: %w", ErrNoAnswer, path, werr)
	}
	if err != nil {
		if ctx.Err() != nil {
			return ans, context.Cause(ctx)
		}
		return ans, fmt.Errorf("%w %s: connection closed before an answer: %w", ErrNoAnswer, path, err)
	}
	if err := json.Unmarshal(line, &ans); err != nil {
		return ans, fmt.Errorf("decode answer: %w", err)
	}
	if !ans.OK && ans.Upgrade == nil && ans.Status == nil && ans.Error == "" {
		return ans, errors.New("empty answer")
	}
	if ans.Kind == KindRefused || ans.Kind == KindBadRequest {
		return ans, errors.New(strings.TrimSpace(ans.Error))
	}
	return ans, nil
}
