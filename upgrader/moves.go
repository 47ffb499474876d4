package upgrader

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/moved"
)

// Idle connections move from a generation that hands off to the next one
// over a SOCK_SEQPACKET socket pair, passed to each child under movesName:
// one message per batch of descriptors (SCM_RIGHTS). A child that takes it says
// so in its report ("moves"); an older binary does not, and nothing moves.
const movesName = "handoff-moves"

// takesMoves is false only in a binary built with the tag handoff_nomoves,
// which plays an older generation that knows nothing of moves (for tests).
var takesMoves = true

// maxMoveBatch matches server.MaxMoveBatch: within the kernel's SCM_MAX_FD.
const maxMoveBatch = 250

// moveTimeout bounds one batch's send: a successor that stopped reading makes
// the batch fail, and its connections stay.
const moveTimeout = 2 * time.Second

// movesOut is a generation's end of the pair, made at its first upgrade.
type movesOut struct {
	conn      *net.UnixConn
	gcPercent int       // Options.MoveGCPercent
	raise     sync.Once // at the first Move: this generation drains
	restore   func()
	log       *slog.Logger
}

func newMovesOut(tf *tableflip.Upgrader, opts Options, log *slog.Logger) (*movesOut, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("create moves channel: %w", err)
	}
	mine, err := fileUnixConn(fds[0], "handoff-moves-parent")
	if err != nil {
		unix.Close(fds[1])
		return nil, err
	}
	theirs := os.NewFile(uintptr(fds[1]), "handoff-moves-child")
	defer theirs.Close() // tableflip keeps its own copy for the children
	if err := tf.AddFile(movesName, theirs); err != nil {
		mine.Close()
		return nil, fmt.Errorf("pass moves channel: %w", err)
	}
	return movesOver(mine, opts, log), nil
}

// movesOver is a movesOut over c with opts' settings.
func movesOver(c *net.UnixConn, opts Options, log *slog.Logger) *movesOut {
	return &movesOut{conn: c, gcPercent: opts.MoveGCPercent, log: log}
}

// Move sends fds, at most maxMoveBatch, in one message. The first one raises
// the collector's percent (Options.MoveGCPercent): what the moved connections
// leave behind is garbage of a process that exits at the end of its drain.
func (m *movesOut) Move(fds []int) error {
	if len(fds) > maxMoveBatch {
		return fmt.Errorf("move: %d descriptors in one batch (at most %d)", len(fds), maxMoveBatch)
	}
	m.raise.Do(func() {
		m.restore = raiseGCPercent(m.gcPercent)
		percent, _ := currentGCPercent()
		m.log.Info("moving idle connections to the new generation", "gc_percent", percent)
	})
	m.conn.SetWriteDeadline(time.Now().Add(moveTimeout))
	_, _, err := m.conn.WriteMsgUnix([]byte{byte(len(fds))}, unix.UnixRights(fds...), nil)
	if err != nil {
		return fmt.Errorf("move connections: %w", err)
	}
	return nil
}

func (m *movesOut) Close() {
	if m != nil {
		m.conn.Close()
		m.raise.Do(func() {}) // after a Move's raise, or none from now on
		if m.restore != nil {
			m.restore()
		}
	}
}

// claimMoves takes the moves channel a parent passed, if it did, and feeds
// what arrives to a listener. It returns nil without one.
//
// The channel is opened in the background (net.FileConn is half a dozen
// syscalls), off the critical path of the upgrade: connections move only once
// this generation is ready, long after.
func (u *Upgrader) claimMoves() (*moved.Listener, error) {
	if !takesMoves {
		return nil, nil
	}
	f, err := u.tf.File(movesName)
	if err != nil || f == nil {
		return nil, err
	}
	ln := moved.New(&net.UnixAddr{Name: "moved-from-previous-generation", Net: "unix"})
	go func() {
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			// The previous generation's moves fail, and it falls back to
			// closing those connections once they are quiet.
			u.log.Warn("cannot take moved connections", "error", fmt.Errorf("open moves channel: %w", err))
			return
		}
		u.receiveMoves(c.(*net.UnixConn), ln)
	}()
	return ln, nil
}

// receiveMoves hands every descriptor that arrives to ln, until the previous
// generation closes its end (it exits) or ln is closed. From the first
// descriptor to the previous generation's drain report or exit, the
// collector runs at Options.MoveGCPercent.
func (u *Upgrader) receiveMoves(c *net.UnixConn, ln *moved.Listener) {
	defer c.Close()
	var restore func() // set at the first descriptor
	defer func() {
		if restore != nil {
			restore()
		}
	}()
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(maxMoveBatch*4))
	total := 0
	defer func() {
		if total > 0 {
			u.log.Info("connections moved from the previous generation", "count", total)
		}
	}()
	for {
		n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 && oobn == 0 {
			return
		}
		if oobn == 0 {
			r, ok := parseDrain(buf[:n])
			if ok && restore != nil {
				restore() // the drain is over: nothing moves any more
				restore = func() {}
			}
			if ok && u.opts.OnPreviousDrained != nil {
				u.opts.OnPreviousDrained(r)
			}
			continue
		}
		if restore == nil {
			restore = raiseGCPercent(u.opts.MoveGCPercent)
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			continue
		}
		for _, m := range msgs {
			fds, err := unix.ParseUnixRights(&m)
			if err != nil {
				continue
			}
			for _, fd := range fds {
				if ln.Add(fd) == nil {
					total++
				}
			}
		}
	}
}

// raiseGCPercent sets the collector's percent to p if that raises it, and
// returns what puts it back (Options.MoveGCPercent). It reads the percent
// first, so that a collector that is off, or at a higher percent, is not
// touched even for a moment.
func raiseGCPercent(p int) (restore func()) {
	if p <= 0 {
		return func() {}
	}
	if cur, ok := currentGCPercent(); !ok || cur < 0 || cur >= p {
		return func() {}
	}
	prev := debug.SetGCPercent(p)
	return func() { debug.SetGCPercent(prev) }
}

// currentGCPercent reads the collector's percent without setting it: -1 when
// the collector is off.
func currentGCPercent() (int, bool) {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindUint64 {
		return 0, false
	}
	return int(int64(s[0].Value.Uint64())), true // off reads as 2^64-1
}

// Moved returns the listener on which this generation receives the idle
// connections its previous generation moves to it when it drains (package
// server's DrainTo): serve it like the others (package server's Serve); it is
// closed with them. It is nil at first start, or when the previous generation
// cannot move connections (an older binary).
func (u *Upgrader) Moved() net.Listener {
	if u.moved == nil {
		return nil
	}
	return u.moved
}

// Mover returns what moves idle connections to the generation that took over
// (pass it to package server's DrainTo), or nil when none did (a final stop).
// When the new generation cannot take connections (an older binary), its Move
// fails: nothing moves, and the drain keeps idle connections open as steady
// state would rather than close them under a client's feet.
func (u *Upgrader) Mover() interface{ Move(fds []int) error } {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.handedTo == nil:
		return nil
	case !u.successorMoves || u.moves == nil:
		return refuseMoves{}
	}
	return u.moves
}

// refuseMoves is the Mover of a successor that takes no connections.
type refuseMoves struct{}

func (refuseMoves) Move([]int) error { return errNoMoves }

// Moves tells package server's DrainTo up front that nothing moves.
func (refuseMoves) Moves() bool { return false }

var errNoMoves = errors.New("the new generation takes no moved connections")
