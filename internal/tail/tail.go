// Package tail keeps the last lines of a process's output, for the verdict of a
// failed upgrade.
package tail

import (
	"bufio"
	"io"
	"strings"
	"sync"
)

// Bounds on what is kept.
const (
	MaxLines   = 20
	MaxLineLen = 1024 // longer lines are cut, so a verdict fits a control answer
)

// Tail keeps the last MaxLines lines, each cut at MaxLineLen bytes. The zero
// value is ready to use; it is safe for concurrent use.
type Tail struct {
	mu   sync.Mutex
	last []string
}

// Add keeps line.
func (t *Tail) Add(line string) {
	line = strings.TrimRight(line, "\r\n")
	if len(line) > MaxLineLen {
		line = line[:MaxLineLen] + "..." // a copy: the long line is not kept alive
	}
	if line == "" {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.last = append(t.last, line)
	if len(t.last) > MaxLines {
		t.last = t.last[len(t.last)-MaxLines:]
	}
}

// Lines returns the lines kept.
func (t *Tail) Lines() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]string(nil), t.last...)
}

// Copy reads r to its end, keeping the tail; a line longer than the reader's
// buffer is kept in part.
func (t *Tail) Copy(r io.Reader) {
	br := bufio.NewReaderSize(r, MaxLineLen)
	for {
		line, err := br.ReadSlice('\n')
		if len(line) > 0 {
			t.Add(string(line))
		}
		for err == bufio.ErrBufferFull {
			// The rest of an overlong line.
			_, err = br.ReadSlice('\n')
		}
		if err != nil {
			return
		}
	}
}
