package upgrader

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/tail"
)

// A failed upgrade's verdict quotes the new process's last lines of stderr.
// tableflip gives the new process the *os.File in the os.Stderr variable as its
// fd 2 (tableflip v1.2.3, child.go); for the length of an attempt that variable
// is the write end of a pipe, which this process copies to its real stderr and
// keeps the tail of. This process's own fd 2 is not touched: its logs (through a
// writer taken at start) and a crash of its own still reach the real stderr. At
// Ready the new process puts its real stderr, passed under stderrName, back on
// its fd 2, so nothing of it depends on this process once it serves.
const stderrName = "handoff-stderr"

// restoreStderr puts the real stderr passed by the parent back on fd 2.
func restoreStderr(tf *tableflip.Upgrader) error {
	f, err := tf.File(stderrName)
	if err != nil || f == nil {
		return err
	}
	defer f.Close()
	if err := unix.Dup3(int(f.Fd()), 2, 0); err != nil {
		return fmt.Errorf("restore stderr: %w", err)
	}
	return nil
}

// stderrTee is the pipe a new process gets as its stderr during an attempt.
type stderrTee struct {
	saved *os.File // what os.Stderr was
	w     *os.File
	done  chan struct{}
	tail  tail.Tail
}

// captureStderr makes os.Stderr a pipe copied to the real stderr. It must be
// undone with stop before anything else reads os.Stderr to start a process.
func captureStderr() (*stderrTee, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("capture stderr: %w", err)
	}
	// The new process gets w as its fd 2: in blocking mode, as a stderr is
	// (os.Pipe makes it non-blocking for Go's poller, and a program that is
	// not written in Go fails its writes with EAGAIN when the pipe is full).
	// Fd sets it so; this process never writes to it.
	w.Fd()
	t := &stderrTee{saved: os.Stderr, w: w, done: make(chan struct{})}
	os.Stderr = w
	go func() {
		defer close(t.done)
		defer r.Close()
		t.tail.Copy(io.TeeReader(r, t.saved))
	}()
	return t, nil
}

// stop restores os.Stderr and, when wait is set, waits (a second at most: a
// grandchild may hold the pipe) for the new process's output to be copied; it
// returns the last lines.
// wait waits, up to d, until the new process's output has all been copied
// (it restores its own stderr at Ready, which ends the pipe).
func (t *stderrTee) wait(d time.Duration) {
	select {
	case <-t.done:
	case <-time.After(d):
	}
}

func (t *stderrTee) stop(wait bool) []string {
	os.Stderr = t.saved
	t.w.Close()
	if wait {
		select {
		case <-t.done:
		case <-time.After(time.Second):
		}
	}
	return t.tail.Lines()
}
