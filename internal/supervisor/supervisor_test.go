package supervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// shellShim does what handoff's own shim does, in sh: exec keeps the PID.
var shellShim = []string{"/bin/sh", "-c", `LISTEN_PID=$$ exec "$@"`, "shim"}

// childScript behaves as the file DIR/mode says when it starts: "fail" exits 1
// with a line on stderr, "hang" never says ready, "deaf" neither and ignores
// SIGTERM, "daemon" starts a sleep in a session of its own (holding the
// sockets) and serves, anything else serves until
// SIGTERM (exit 0). It writes its PID and LISTEN_PID to DIR/pids.
const childScript = `
mode=$(cat "$DIR/mode" 2>/dev/null)
echo "$$ $LISTEN_PID $LISTEN_FDS" >> "$DIR/pids"
case "$mode" in
fail) echo "boom: config broken" >&2; exit 1 ;;
deaf) trap '' TERM; sleep 600 & wait $! ;;
daemon) setsid sleep 600 & echo $! > "$DIR/orphan" ;;
hang) exec sleep 600 ;;
esac
trap 'exit 0' TERM
eval "echo READY=1 >&$HANDOFF_READY_FD"
echo "serving"
sleep 600 & wait $!
`

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type harness struct {
	t      *testing.T
	dir    string
	sup    *Supervisor
	stdout *syncBuffer
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, ready time.Duration, command ...string) *harness {
	t.Helper()
	return startWith(t, Options{Command: command, ReadyTimeout: ready, DrainTimeout: 5 * time.Second})
}

// startWith runs a Supervisor with opts (childScript when no Command, the shell
// shim, output captured) until it serves; cleanup stops it, bounded.
func startWith(t *testing.T, opts Options) *harness {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("DIR", dir)
	if opts.Command == nil {
		opts.Command = []string{"/bin/sh", "-c", childScript}
	}
	h := &harness{t: t, dir: dir, stdout: &syncBuffer{}, done: make(chan error, 1)}
	opts.Shim, opts.Stdout, opts.Stderr = shellShim, h.stdout, h.stdout
	var err error
	h.sup, err = New(opts)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	go func() { h.done <- h.sup.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-h.done:
		case <-time.After(10 * time.Second):
			t.Error("Run did not return after cancel")
		}
	})
	h.waitPhase(gate.Serving)
	return h
}

func (h *harness) waitPhase(phase gate.Phase) control.Status {
	h.t.Helper()
	var st control.Status
	require.Eventually(h.t, func() bool {
		st = h.sup.Status()
		return st.Phase == phase
	}, 10*time.Second, 5*time.Millisecond, "phase %s; output:\n%s", phase, h.stdout)
	return st
}

func (h *harness) mode(m string) {
	require.NoError(h.t, os.WriteFile(filepath.Join(h.dir, "mode"), []byte(m), 0o644))
}

func (h *harness) upgrade() (control.Result, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return h.sup.Upgrade(ctx, true)
}

func serving(st control.Status) int {
	for _, c := range st.Children {
		if c.Phase == control.ChildServing {
			return c.PID
		}
	}
	return 0
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func TestUpgradeReplacesChildOnceReady(t *testing.T) {
	h := start(t, 5*time.Second)
	first := serving(h.sup.Status())
	require.Positive(t, first)

	res, err := h.upgrade()
	require.NoError(t, err)
	assert.NotEqual(t, first, res.PID)
	assert.Equal(t, 2, res.Generation)
	st := h.waitPhase(gate.Serving)
	assert.Equal(t, res.PID, serving(st))
	assert.Len(t, st.Children, 1, "the old child exited after its SIGTERM")
	assert.False(t, alive(first))

	pids, err := os.ReadFile(filepath.Join(h.dir, "pids"))
	require.NoError(t, err)
	for _, line := range strings.Split(strings.TrimSpace(string(pids)), "\n") {
		f := strings.Fields(line)
		assert.Equal(t, f[0], f[1], "LISTEN_PID is the child's own PID")
	}
	assert.Contains(t, h.stdout.String(), "serving\n")
	assert.Regexp(t, `\[pid \d+\] serving`, h.stdout.String(), "output lines carry the child's PID")
}

func TestBrokenChildrenLeaveTheOldOneServing(t *testing.T) {
	h := start(t, 3*time.Second)
	first := serving(h.sup.Status())

	h.mode("fail")
	_, err := h.upgrade()
	var exit *control.ExitError
	require.ErrorAs(t, err, &exit)
	assert.Equal(t, 1, exit.Code)
	assert.Contains(t, exit.Stderr, "boom: config broken")

	h.mode("hang")
	_, err = h.upgrade()
	assert.ErrorIs(t, err, control.ErrTimeout)

	st := h.waitPhase(gate.Serving)
	assert.Equal(t, first, serving(st), "the first child still serves")
	assert.Len(t, st.Children, 1, "the broken children are gone")
	assert.Equal(t, control.KindTimeout, st.LastUpgrade.Kind)

	h.mode("ok")
	res, err := h.upgrade()
	require.NoError(t, err)
	assert.NotEqual(t, first, res.PID)
}

// tcpListener is a listening socket on 127.0.0.1 as handoff run passes it,
// closed at the end of the test.
func tcpListener(t *testing.T) Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close() // the file is a copy
	f, err := ln.(*net.TCPListener).File()
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return Listener{Name: "l", File: f, Network: "tcp", Addr: ln.Addr().String()}
}

// Every child shares the listening socket's O_NONBLOCK flag. Starting a child
// must not clear it (os.StartProcess's Fd does), or the serving children block
// in accept(2) until a child that sets it again starts: forever after a new
// child that fails before it listens.
func TestListenersStayNonBlocking(t *testing.T) {
	l := tcpListener(t)
	f := l.File
	require.NoError(t, syscall.SetNonblock(int(f.Fd()), false)) // as systemd passes it by default
	nonblocking := func() bool {
		rc, err := f.SyscallConn()
		require.NoError(t, err)
		var flags int
		require.NoError(t, rc.Control(func(fd uintptr) { flags, err = unix.FcntlInt(fd, unix.F_GETFL, 0) }))
		require.NoError(t, err)
		return flags&unix.O_NONBLOCK != 0
	}
	h := startWith(t, Options{Command: []string{"/bin/sh", "-c", childScript}, ReadyTimeout: 5 * time.Second,
		DrainTimeout: 5 * time.Second, Listeners: []Listener{l}})
	assert.True(t, nonblocking(), "after the first start")
	h.mode("fail")
	_, err := h.upgrade()
	require.Error(t, err)
	assert.True(t, nonblocking(), "after a new child that failed")
	h.mode("ok")
	_, err = h.upgrade()
	require.NoError(t, err)
	assert.True(t, nonblocking(), "after an upgrade")
}

func TestChildDyingWhileServingIsRestarted(t *testing.T) {
	h := start(t, 5*time.Second)
	first := serving(h.sup.Status())
	require.NoError(t, syscall.Kill(first, syscall.SIGKILL))
	require.Eventually(t, func() bool {
		pid := serving(h.sup.Status())
		return pid != 0 && pid != first
	}, 10*time.Second, 5*time.Millisecond)
}

func TestStopDrainsChildren(t *testing.T) {
	h := start(t, 5*time.Second)
	pid := serving(h.sup.Status())
	h.cancel()
	select {
	case err := <-h.done:
		assert.NoError(t, err, "the child exited 0 on SIGTERM")
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
	}
	h.done <- nil // for the cleanup
	assert.False(t, alive(pid))
}

func TestReadyBySdNotify(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed: the sd_notify path is tested with it")
	}
	h := start(t, 5*time.Second, py, "-c", `
import os, socket, signal, time
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"STATUS=warming up\nREADY=1", os.environ["NOTIFY_SOCKET"])
time.sleep(600)
`)
	assert.Positive(t, serving(h.sup.Status()))
}

func TestFirstChildFailingFailsRun(t *testing.T) {
	sup, err := New(Options{Command: []string{"/bin/sh", "-c", "echo nope >&2; exit 3"}, Shim: shellShim,
		Stdout: &syncBuffer{}, Stderr: &syncBuffer{}})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err = sup.Run(ctx)
	assert.ErrorIs(t, err, ErrChildFailed)
	assert.ErrorContains(t, err, "exit status 3")
}

func TestReaperReportsRealPID(t *testing.T) {
	r := newReaper(nil)
	defer r.stop()
	exited := make(chan int, 1)
	pid, err := r.start([]string{"/bin/true"}, &syscall.ProcAttr{}, func(pid int, _ syscall.WaitStatus) { exited <- pid })
	require.NoError(t, err)
	assert.Greater(t, pid, 1, "a PID, never -1: kill(-1) would signal every process")
	select {
	case got := <-exited:
		assert.Equal(t, pid, got)
	case <-time.After(5 * time.Second):
		t.Fatal("exit not reported")
	}
}

func TestCleanEnv(t *testing.T) {
	got := cleanEnv([]string{"PATH=/bin", "LISTEN_FDS=2", "LISTEN_PID=1", "NOTIFY_SOCKET=/run/x", "HANDOFF_READY_FD=5", "HOME=/root"})
	assert.Equal(t, []string{"PATH=/bin", "HOME=/root"}, got)
}

func TestNewRejectsMissingCommand(t *testing.T) {
	_, err := New(Options{Shim: shellShim})
	assert.Error(t, err)
	_, err = New(Options{Command: []string{"x"}})
	assert.Error(t, err)
	assert.False(t, errors.Is(err, ErrChildFailed))
}

func TestReadyDelayForProgramsThatCannotNotify(t *testing.T) {
	// startWith waits for "serving": the child never notifies, so only the delay gets it there.
	startWith(t, Options{Command: []string{"/bin/sh", "-c", "trap 'exit 0' TERM; sleep 600 & wait $!"},
		ReadyDelay: 50 * time.Millisecond})
}

// As a subreaper (or PID 1), the reaper reaps orphans of the children's trees:
// nothing is left a zombie.
func TestReaperReapsOrphans(t *testing.T) {
	orphans := make(chan int, 64)
	r := newReaper(func(pid int) { orphans <- pid })
	defer r.stop()
	out := filepath.Join(t.TempDir(), "orphan.pid")
	// The shell starts a background sleep, writes its PID and exits: the sleep
	// is re-parented to this process, the nearest subreaper.
	_, err := r.start([]string{"/bin/sh", "-c", `sleep 0.2 & echo $! > "$0"`, out}, &syscall.ProcAttr{},
		func(int, syscall.WaitStatus) {})
	require.NoError(t, err)
	var orphan int
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(out)
		if err != nil || len(bytes.TrimSpace(b)) == 0 {
			return false
		}
		_, err = fmt.Sscan(string(b), &orphan)
		return err == nil
	}, 5*time.Second, 5*time.Millisecond)
	// Orphans of earlier tests' process trees may be reaped first: this
	// process has been a subreaper since the first reaper of the run.
	deadline := time.After(10 * time.Second)
	for {
		select {
		case got := <-orphans:
			if got == orphan {
				return
			}
		case <-deadline:
			t.Fatalf("orphan %d not reaped", orphan)
		}
	}
}

func TestForceKillsAChildThatIgnoresItsStopSignal(t *testing.T) {
	h := startWith(t, Options{Command: []string{"/bin/sh", "-c",
		`trap '' TERM; eval "echo READY=1 >&$HANDOFF_READY_FD"; sleep 600 & wait $!; sleep 600`},
		DrainTimeout: time.Hour})
	h.cancel() // SIGTERM, which the child ignores; the drain timeout is an hour
	h.sup.Force()
	select {
	case err := <-h.done:
		// A drain cut short is a clean stop, as for handoff serve (exit 0);
		// that the child was killed is logged.
		assert.NoError(t, err)
		assert.Zero(t, h.sup.tracked(), "no child left")
	case <-time.After(10 * time.Second):
		t.Fatal("Force did not end the stop")
	}
	h.done <- nil // for the cleanup
}

func TestSignalIsForwardedToTheServingChild(t *testing.T) {
	dir := t.TempDir()
	got := filepath.Join(dir, "got-usr1")
	h := start(t, 5*time.Second, "/bin/sh", "-c", `trap 'echo usr1 > "$0"' USR1; trap 'exit 0' TERM
eval "echo READY=1 >&$HANDOFF_READY_FD"
while :; do sleep 600 & wait $!; done`, got)
	h.sup.Signal(syscall.SIGUSR1)
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(got)
		return err == nil && strings.TrimSpace(string(b)) == "usr1"
	}, 10*time.Second, 5*time.Millisecond, "the child's USR1 trap ran")
}

// A child's output is relayed whole, with the prefix once per line, however
// long the line; keep gets at most maxLine bytes of each (a child writing
// megabytes without a newline once made handoff hold all of it).
func TestCopyLinesBoundsLongLines(t *testing.T) {
	long := strings.Repeat("x", 5*maxLine+7)
	in := "short\n" + long + "\nlast, unterminated"
	var out bytes.Buffer
	var kept []string
	copyLines(io.NopCloser(strings.NewReader(in)), &out, "[p] ", func(s string) { kept = append(kept, s) })
	assert.Equal(t, "[p] short\n[p] "+long+"\n[p] last, unterminated\n", out.String())
	require.Len(t, kept, 3)
	assert.Equal(t, "short", kept[0])
	assert.Len(t, kept[1], maxLine)
	assert.Equal(t, "last, unterminated", kept[2])
}

// Restarts of a child that hangs before it is ready and ignores its stop
// signal do not pile up: the next restart of the instance waits for the drain
// of the last one (they once started every backoff period, past N+1 children,
// with the gate saying "previous generation still draining" for good).
func TestRestartsOfAHungChildDoNotPileUp(t *testing.T) {
	h := startWith(t, Options{Command: []string{"/bin/sh", "-c", childScript}, ReadyTimeout: time.Second,
		DrainTimeout: 2 * time.Second})
	first := serving(h.sup.Status())
	h.mode("deaf")
	require.NoError(t, syscall.Kill(first, syscall.SIGKILL))
	// The first restart: not ready in time, told to stop, ignores it.
	var deaf int
	require.Eventually(t, func() bool {
		for _, c := range h.sup.Status().Children {
			if c.Phase == control.ChildDraining {
				deaf = c.PID
				return true
			}
		}
		return false
	}, 10*time.Second, 5*time.Millisecond)
	most := 0
	require.Eventually(t, func() bool {
		most = max(most, len(h.sup.Status().Children))
		return !alive(deaf)
	}, 10*time.Second, 5*time.Millisecond, "the deaf restart %d is killed at its drain deadline", deaf)
	assert.LessOrEqual(t, most, 1, "children while the deaf restart drained (it alone, no new restart beside it)")
	h.mode("ok")
	require.Eventually(t, func() bool { return serving(h.sup.Status()) != 0 }, 30*time.Second, 5*time.Millisecond,
		"a restart serves once the child starts again")
}

// A process a child started in a session of its own holds the listening
// socket; when the child exits it is orphaned to the supervisor, which kills
// it, rather than leave it holding the port and accepting for no one.
func TestOrphanHoldingTheSocketIsKilled(t *testing.T) {
	l := tcpListener(t)
	h := startWith(t, Options{Command: []string{"/bin/sh", "-c", childScript}, ReadyTimeout: 5 * time.Second,
		DrainTimeout: 5 * time.Second, Listeners: []Listener{l}})
	h.mode("daemon")
	_, err := h.upgrade() // this child starts the daemon
	require.NoError(t, err)
	var orphan int
	require.Eventually(t, func() bool {
		b, err := os.ReadFile(filepath.Join(h.dir, "orphan"))
		return err == nil && len(bytes.TrimSpace(b)) > 0 && func() bool { _, err := fmt.Sscan(string(b), &orphan); return err == nil }()
	}, 10*time.Second, 5*time.Millisecond)
	t.Cleanup(func() { syscall.Kill(orphan, syscall.SIGKILL) })
	require.True(t, alive(orphan))
	h.mode("ok")
	_, err = h.upgrade() // the daemon's parent is told to stop and exits
	require.NoError(t, err)
	assert.Eventually(t, func() bool { return !alive(orphan) }, 10*time.Second, 5*time.Millisecond,
		"the orphan %d holding the listening socket is killed", orphan)
}
