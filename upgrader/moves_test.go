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
	u := &Upgrader{opts: Options{MoveGCPercent: 400}, log: slog.New(slog.DiscardHandler)}
	ln := moved.New(&net.UnixAddr{Name: "test", Net: "unix"})
	defer ln.Close()
	done := make(chan struct{})
	go func() { defer close(done); u.receiveMoves(mine, ln) }()

	// One connection moves: once it is accepted, receiveMoves is running.
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
	mv := &movesOut{conn: theirs}
	require.NoError(t, mv.Move([]int{int(f.Fd())}))
	f.Close()
	got, err := ln.Accept()
	require.NoError(t, err)
	got.Close()
	assert.Equal(t, 400, gcPercent(), "while connections move in")

	mv.Close() // the previous generation exits
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("receiveMoves did not return when the channel closed")
	}
	assert.Equal(t, 100, gcPercent(), "once the moves ended")
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
