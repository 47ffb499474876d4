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
// from the first connection moved in and put back at the drain report.
func TestReceiveMovesRaisesGCPercentUntilTheMovesEnd(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	reported := make(chan DrainReport, 1)
	theirs, ln, exit := receiving(t, Options{MoveGCPercent: 400, OnPreviousDrained: func(r DrainReport) { reported <- r }})
	assert.Equal(t, 100, gcPercent(), "before any connection moved")
	moveOne(t, movesOver(theirs, Options{}, slog.New(slog.DiscardHandler)), ln)
	assert.Equal(t, 400, gcPercent(), "while connections move in")

	// The drain report: the moves are over, before the previous generation exits.
	_, err := theirs.Write(append([]byte{drainPrefix}, `{"moved":1}`...))
	require.NoError(t, err)
	select {
	case r := <-reported:
		assert.Equal(t, 1, r.Moved)
	case <-time.After(10 * time.Second):
		t.Fatal("the drain report did not arrive")
	}
	assert.Equal(t, 100, gcPercent(), "once the previous generation reported its drain")
	exit()
	assert.Equal(t, 100, gcPercent(), "after its exit")
}

// TestReceiveMovesRestoresAtExitWithoutAReport: a previous generation killed
// with -9 sends no report; its end closes, and the percent goes back.
func TestReceiveMovesRestoresAtExitWithoutAReport(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	theirs, ln, exit := receiving(t, Options{MoveGCPercent: 400})
	moveOne(t, movesOver(theirs, Options{}, slog.New(slog.DiscardHandler)), ln)
	assert.Equal(t, 400, gcPercent(), "while connections move in")
	exit()
	assert.Equal(t, 100, gcPercent(), "after the previous generation's end closed")
}

// receiving runs receiveMoves with opts on one end of a moves channel and
// returns the other end, the listener it feeds, and exit, which closes the
// other end as an exiting previous generation does and waits (10 s at most)
// for receiveMoves to return.
func receiving(t *testing.T, opts Options) (theirs *net.UnixConn, ln *moved.Listener, exit func()) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	theirs, err = fileUnixConn(fds[0], "test-moves-parent")
	require.NoError(t, err)
	mine, err := fileUnixConn(fds[1], "test-moves-child")
	require.NoError(t, err)
	u := &Upgrader{opts: opts, log: slog.New(slog.DiscardHandler)}
	ln = moved.New(&net.UnixAddr{Name: "test", Net: "unix"})
	t.Cleanup(func() { ln.Close() })
	done := make(chan struct{})
	go func() { defer close(done); u.receiveMoves(mine, ln) }()
	return theirs, ln, func() {
		theirs.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("receiveMoves did not return when the channel closed")
		}
	}
}

// TestMovesOutRaisesGCPercentFromTheFirstMove: a draining generation raises
// the percent at its first move, and Close puts it back.
func TestMovesOutRaisesGCPercentFromTheFirstMove(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	m, fd := sending(t, Options{MoveGCPercent: 400})
	assert.Equal(t, 100, gcPercent(), "before any move")
	require.NoError(t, m.Move([]int{fd}))
	assert.Equal(t, 400, gcPercent(), "from the first move")
	m.Close()
	assert.Equal(t, 100, gcPercent(), "after Close")
}

// TestMovesOutCloseBeforeMove: Close before any move raises nothing, and a
// Move after Close raises nothing either (nobody would put it back).
func TestMovesOutCloseBeforeMove(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	m, fd := sending(t, Options{MoveGCPercent: 400})
	m.Close()
	assert.Equal(t, 100, gcPercent(), "after Close")
	assert.Error(t, m.Move([]int{fd}), "a closed channel")
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

// sending returns a movesOut with opts' settings over a fresh channel, and a
// descriptor to move (any will do: nobody takes it).
func sending(t *testing.T, opts Options) (*movesOut, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	require.NoError(t, err)
	t.Cleanup(func() { unix.Close(fds[1]) })
	c, err := fileUnixConn(fds[0], "test-moves-parent")
	require.NoError(t, err)
	r, w, err := os.Pipe()
	require.NoError(t, err)
	t.Cleanup(func() { r.Close(); w.Close() })
	return movesOver(c, opts, slog.New(slog.DiscardHandler)), int(r.Fd())
}
