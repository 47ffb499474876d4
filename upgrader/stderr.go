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

// stderrName is the name under which a generation passes its real stderr to a
// new process. tableflip gives the new process this process's fd 2; during an
// upgrade attempt fd 2 is a pipe whose output is copied to the real stderr and
// kept, so that the verdict of a failed upgrade can quote the new process's last
// lines. At Ready the new process puts the real stderr back on its fd 2.
const stderrName = "handoff-stderr"

// stderrTailLines is how many lines of a failed new process's stderr are kept.
const stderrTailLines = 20

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

// stderrTee is fd 2 turned into a pipe for the length of one upgrade attempt.
type stderrTee struct {
	real *os.File // this process's real stderr, a dup of the original fd 2
	w    *os.File
	done chan struct{}

	mu    sync.Mutex
	lines []string
}

// captureStderr points fd 2 at a pipe copied to real. real must be a dup of the
// original stderr, kept for the process's life.
func captureStderr(real *os.File) (*stderrTee, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("capture stderr: %w", err)
	}
	if err := unix.Dup3(int(w.Fd()), 2, 0); err != nil {
		r.Close()
		w.Close()
		return nil, fmt.Errorf("capture stderr: %w", err)
	}
	t := &stderrTee{real: real, w: w, done: make(chan struct{})}
	go t.copy(r)
	return t, nil
}

func (t *stderrTee) copy(r *os.File) {
	defer close(t.done)
	defer r.Close()
	br := bufio.NewReader(io.TeeReader(r, t.real))
	for {
		line, err := br.ReadString('\n')
		if line = strings.TrimRight(line, "\n"); line != "" {
			t.mu.Lock()
			t.lines = append(t.lines, line)
			if len(t.lines) > stderrTailLines {
				t.lines = t.lines[len(t.lines)-stderrTailLines:]
			}
			t.mu.Unlock()
		}
		if err != nil {
			return
		}
	}
}

// stop puts the real stderr back on fd 2 and, when wait is set, waits (up to
// a second: a grandchild may hold the pipe) for the new process's output to be
// copied; it returns the last lines.
func (t *stderrTee) stop(wait bool) []string {
	unix.Dup3(int(t.real.Fd()), 2, 0)
	t.w.Close()
	if wait {
		select {
		case <-t.done:
		case <-time.After(time.Second):
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.lines...)
}
