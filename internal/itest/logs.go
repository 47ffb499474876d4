package itest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Line is one line a process wrote on stdout or stderr. A JSON line (slog's
// JSON handler) is decoded into Fields; other lines (a broken binary's
// message, a panic, a supervised child's prefixed output) have only Raw.
type Line struct {
	Stream string // "stdout" or "stderr"
	Raw    string
	Fields map[string]any
}

// Msg returns the msg field.
func (l Line) Msg() string { return l.Str("msg") }

// Str returns field key as a string ("" when missing).
func (l Line) Str(key string) string {
	switch v := l.Fields[key].(type) {
	case string:
		return v
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}

// Num returns a numeric field (a JSON number or a numeric string); ok is
// false when the field is missing or not a number.
func (l Line) Num(key string) (int64, bool) {
	switch v := l.Fields[key].(type) {
	case float64:
		return int64(v), true
	case string:
		n, err := strconv.ParseInt(v, 10, 64)
		return n, err == nil
	}
	return 0, false
}

// PID returns the pid field, or 0.
func (l Line) PID() int {
	n, _ := l.Num("pid")
	return int(n)
}

// PIDIs matches the lines whose pid field is pid.
func PIDIs(pid int) func(Line) bool {
	return func(l Line) bool { return l.PID() == pid }
}

// NumIs matches the lines whose numeric field key is n.
func NumIs(key string, n int) func(Line) bool {
	return func(l Line) bool { v, ok := l.Num(key); return ok && int(v) == n }
}

// Logs collects a process's output, in the order each stream was written (the
// order across the two streams is the order the readers got to the lines). A
// goroutine per stream appends lines until EOF, that is until every process
// that holds the write end (a server's every generation) has exited.
type Logs struct {
	mu    sync.Mutex
	lines []Line
	open  int
	done  chan struct{}
}

// NewLogs returns a Logs that reads streams streams (see [Logs.Consume]).
func NewLogs(streams int) *Logs {
	return &Logs{open: streams, done: make(chan struct{})}
}

// Consume reads r line by line into the store until EOF, then closes r.
func (s *Logs) Consume(r io.ReadCloser, stream string) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := Line{Stream: stream, Raw: sc.Text()}
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			line.Fields = m
		}
		s.mu.Lock()
		s.lines = append(s.lines, line)
		s.mu.Unlock()
	}
	// Keep draining (after a line too long for the scanner) so that writers never block.
	_, _ = io.Copy(io.Discard, r)
	s.mu.Lock()
	s.open--
	if s.open == 0 {
		close(s.done)
	}
	s.mu.Unlock()
}

// Done is closed once every stream reached EOF: the store then holds all the
// output, for good.
func (s *Logs) Done() <-chan struct{} { return s.done }

// Mark returns the index of the next line to arrive; pass it as from to
// consider only later lines.
func (s *Logs) Mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lines)
}

// Find returns the lines from index from on whose msg is msg (any when msg
// is empty) and that satisfy pred (when non-nil), with their indexes. It sees
// only what was read so far: wait for a line with [Logs.Wait] while the
// process runs, or for the end of the output ([Proc.Wait]) after.
func (s *Logs) Find(from int, msg string, pred func(Line) bool) ([]Line, []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Line
	var idx []int
	for i := from; i < len(s.lines); i++ {
		l := s.lines[i]
		if msg != "" && l.Msg() != msg {
			continue
		}
		if pred != nil && !pred(l) {
			continue
		}
		out = append(out, l)
		idx = append(idx, i)
	}
	return out, idx
}

// First returns the first line that [Logs.Find] would, its index, and
// whether there is one.
func (s *Logs) First(from int, msg string, pred func(Line) bool) (Line, int, bool) {
	ls, idx := s.Find(from, msg, pred)
	if len(ls) == 0 {
		return Line{}, -1, false
	}
	return ls[0], idx[0], true
}

// Wait waits at most timeout for a line (from index from on) with msg that
// satisfies pred and returns it; it fails tb when none comes. It blocks until
// the line is read, the output ends without it, or the timeout passes.
func (s *Logs) Wait(tb testing.TB, from int, msg string, pred func(Line) bool, timeout time.Duration) Line {
	tb.Helper()
	var got Line
	var ok bool
	Poll(timeout, func() bool {
		got, _, ok = s.First(from, msg, pred)
		return ok || closed(s.done)
	})
	if !ok {
		if got, _, ok = s.First(from, msg, pred); !ok {
			why := fmt.Sprintf("timed out after %v", timeout)
			if closed(s.done) {
				why = "the output ended"
			}
			tb.Fatalf("%s waiting for the log line msg=%q", why, msg)
		}
	}
	return got
}

// Contains reports whether a raw line from index from on contains sub.
func (s *Logs) Contains(from int, sub string) bool {
	_, _, ok := s.First(from, "", func(l Line) bool { return strings.Contains(l.Raw, sub) })
	return ok
}

// WaitContains waits at most timeout for a raw line from index from on that
// contains sub, and reports whether one came.
func (s *Logs) WaitContains(from int, sub string, timeout time.Duration) bool {
	return Poll(timeout, func() bool { return s.Contains(from, sub) || closed(s.done) }) && s.Contains(from, sub)
}

// None fails tb (without stopping it) when a line with msg and pred was
// logged from index from on; why says what makes it unexpected.
func (s *Logs) None(tb testing.TB, from int, msg string, pred func(Line) bool, why string) {
	tb.Helper()
	if l, _, ok := s.First(from, msg, pred); ok {
		tb.Errorf("%s: unexpected log line %s", why, l.Raw)
	}
}

// Tail returns the last n lines as text, each prefixed with its stream.
func (s *Logs) Tail(n int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	start := 0
	if len(s.lines) > n {
		start = len(s.lines) - n
	}
	var b strings.Builder
	if start > 0 {
		fmt.Fprintf(&b, "... (%d earlier lines)\n", start)
	}
	for _, l := range s.lines[start:] {
		b.WriteString(l.Stream)
		b.WriteString(": ")
		b.WriteString(l.Raw)
		b.WriteByte('\n')
	}
	return b.String()
}
