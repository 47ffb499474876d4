package upgrader

import (
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/moved"
)

// gcPercent reads the collector's percent.
func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

func TestRaiseGCPercent(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	for _, tc := range []struct {
		name            string
		before, p, want int
	}{
		{"raised", 100, 400, 400},
		{"already higher", 800, 400, 800},
		{"off stays off", -1, 400, -1},
		{"zero: left alone", 100, 0, 100},
		{"not lowered", 100, 50, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			debug.SetGCPercent(tc.before)
			restore := raiseGCPercent(tc.p)
			assert.Equal(t, tc.want, gcPercent(), "while moving")
			restore()
			assert.Equal(t, tc.before, gcPercent(), "after")
		})
	}
}

// TestReceiveMovesRaisesGCPercentUntilTheMovesEnd: the percent is raised
// while the channel is open and put back when the previous generation closes
// its end.
func TestReceiveMovesRaisesGCPercentUntilTheMovesEnd(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	theirs, err := fileUnixConn(fds[0], "test-moves-parent")
	require.NoError(t, err)
	mine, err := fileUnixConn(fds[1], "test-moves-child")
	require.NoError(t, err)
	reported := make(chan DrainReport, 1)
	u := &Upgrader{opts: Options{MoveGCPercent: 400, OnPreviousDrained: func(r DrainReport) { reported <- r }},
		log: slog.New(slog.DiscardHandler)}
	ln := moved.New(&net.UnixAddr{Name: "test", Net: "unix"})
	defer ln.Close()
	done := make(chan struct{})
	go func() { defer close(done); u.receiveMoves(mine, ln) }()

	assert.Equal(t, 100, gcPercent(), "before any connection moved")
	moveOne(t, &movesOut{conn: theirs}, ln)
	assert.Equal(t, 400, gcPercent(), "while connections move in")

	// The drain report: the moves are over, before the previous generation exits.
	_, err = theirs.Write(append([]byte{drainPrefix}, `{"moved":1}`...))
	require.NoError(t, err)
	select {
	case r := <-reported:
		assert.Equal(t, 1, r.Moved)
	case <-time.After(10 * time.Second):
		t.Fatal("the drain report did not arrive")
	}
	assert.Equal(t, 100, gcPercent(), "once the previous generation reported its drain")

	theirs.Close() // the previous generation exits
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("receiveMoves did not return when the channel closed")
	}
	assert.Equal(t, 100, gcPercent(), "after its exit")
}

// TestReceiveMovesRestoresAtExitWithoutAReport: a previous generation killed
// with -9 sends no report; its end closes, and the percent goes back.
func TestReceiveMovesRestoresAtExitWithoutAReport(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	theirs, err := fileUnixConn(fds[0], "test-moves-parent")
	require.NoError(t, err)
	mine, err := fileUnixConn(fds[1], "test-moves-child")
	require.NoError(t, err)
	u := &Upgrader{opts: Options{MoveGCPercent: 400}, log: slog.New(slog.DiscardHandler)}
	ln := moved.New(&net.UnixAddr{Name: "test", Net: "unix"})
	defer ln.Close()
	done := make(chan struct{})
	go func() { defer close(done); u.receiveMoves(mine, ln) }()
	moveOne(t, &movesOut{conn: theirs}, ln)
	assert.Equal(t, 400, gcPercent(), "while connections move in")
	theirs.Close()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("receiveMoves did not return when the channel closed")
	}
	assert.Equal(t, 100, gcPercent(), "after the previous generation's end closed")
}

// TestMovesOutRaisesGCPercentFromTheFirstMove: a draining generation raises
// the percent at its first move, and Close puts it back.
func TestMovesOutRaisesGCPercentFromTheFirstMove(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(fds[1])
	c, err := fileUnixConn(fds[0], "test-moves-parent")
	require.NoError(t, err)
	m := &movesOut{conn: c, gcPercent: 400}
	assert.Equal(t, 100, gcPercent(), "before any move")
	r, w, err := os.Pipe() // any descriptor moves
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()
	require.NoError(t, m.Move([]int{int(r.Fd())}))
	assert.Equal(t, 400, gcPercent(), "from the first move")
	m.Close()
	assert.Equal(t, 100, gcPercent(), "after Close")
}

// TestMovesOutCloseBeforeMove: Close before any move raises nothing, and a
// Move after Close raises nothing either (nobody would put it back).
func TestMovesOutCloseBeforeMove(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	defer unix.Close(fds[1])
	c, err := fileUnixConn(fds[0], "test-moves-parent")
	require.NoError(t, err)
	m := &movesOut{conn: c, gcPercent: 400}
	m.Close()
	assert.Equal(t, 100, gcPercent(), "after Close")
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()
	assert.Error(t, m.Move([]int{int(r.Fd())}), "a closed channel")
	assert.Equal(t, 100, gcPercent(), "a Move after Close raises nothing")
}

// moveOne moves one loopback TCP connection through m and waits (10 s at
// most) until ln yields it: receiveMoves then runs and has taken it.
func moveOne(t *testing.T, m *movesOut, ln *moved.Listener) {
	t.Helper()
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer tl.Close()
	client, err := net.Dial("tcp", tl.Addr().String())
	require.NoError(t, err)
	defer client.Close()
	sc, err := tl.Accept()
	require.NoError(t, err)
	f, err := sc.(*net.TCPConn).File()
	require.NoError(t, err)
	sc.Close()
	require.NoError(t, m.Move([]int{int(f.Fd())}))
	f.Close()
	got := make(chan net.Conn, 1)
	go func() {
		if c, err := ln.Accept(); err == nil {
			got <- c
		}
	}()
	select {
	case c := <-got:
		c.Close()
	case <-time.After(10 * time.Second):
		ln.Close() // ends the Accept above
		t.Fatal("the moved connection was not accepted")
	}
}
