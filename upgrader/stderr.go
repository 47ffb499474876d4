package upgrader

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"
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

// Bounds on what is kept of a new process's stderr.
const (
	stderrTailLines = 20
	stderrLineMax   = 1024 // longer lines are cut, so a verdict fits a control answer
)

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
	tail  Tail
}

// captureStderr makes os.Stderr a pipe copied to the real stderr. It must be
// undone with stop before anything else reads os.Stderr to start a process.
func captureStderr() (*stderrTee, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("capture stderr: %w", err)
	}
	t := &stderrTee{saved: os.Stderr, w: w, done: make(chan struct{})}
	os.Stderr = w
	go func() {
		defer close(t.done)
		defer r.Close()
		t.tail.copyFrom(io.TeeReader(r, t.saved))
	}()
	return t, nil
}

// stop restores os.Stderr and, when wait is set, waits (a second at most: a
// grandchild may hold the pipe) for the new process's output to be copied; it
// returns the last lines.
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

// Tail keeps the last lines of a process's output for a verdict (Outcome.Stderr):
// 20 lines at most, each cut at 1 KiB. The zero value is ready to use.
type Tail struct {
	mu   sync.Mutex
	last []string
}

// Add keeps line.
func (t *Tail) Add(line string) {
	line = strings.TrimRight(line, "\r\n")
	if len(line) > stderrLineMax {
		line = line[:stderrLineMax] + "..."
	}
	if line == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.last = append(t.last, line)
	if len(t.last) > stderrTailLines {
		t.last = t.last[len(t.last)-stderrTailLines:]
	}
}

// Lines returns the lines kept.
func (t *Tail) Lines() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.last...)
}

// copyFrom reads r to its end, keeping the tail; a line longer than the reader's
// buffer is kept in part.
func (t *Tail) copyFrom(r io.Reader) {
	br := bufio.NewReaderSize(r, stderrLineMax)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			t.Add(string(line))
		}
		if err == bufio.ErrBufferFull {
			// The rest of an overlong line.
			for err == bufio.ErrBufferFull {
				_, err = br.ReadSlice('\n')
			}
		}
		if err != nil && err != bufio.ErrBufferFull {
			return
		}
	}
}
