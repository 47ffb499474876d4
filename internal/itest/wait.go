package itest

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// PollEvery is how often [Poll] asks its condition.
const PollEvery = 5 * time.Millisecond

// Poll calls cond until it returns true or timeout elapses, and reports
// whether cond became true. It asks cond once more at the deadline.
func Poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(PollEvery)
	defer tick.Stop()
	for {
		if cond() {
			return true
		}
		select {
		case <-deadline.C:
			return cond()
		case <-tick.C:
		}
	}
}

// Eventually fails tb (it must be called from the test's goroutine) when cond
// does not become true within timeout; the message says what it waited for.
func Eventually(tb testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	tb.Helper()
	if !Poll(timeout, cond) {
		tb.Fatalf("timed out after %v waiting for: %s", timeout, fmt.Sprintf(format, args...))
	}
}

// WaitChan waits at most timeout for ch to be closed or to deliver, and
// reports whether it did.
func WaitChan[T any](ch <-chan T, timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

// closed reports whether ch is closed (or has a value ready).
func closed[T any](ch <-chan T) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// waitExit sleeps until pid exits or deadline passes, on a pidfd (readable
// once the process has exited). Without one (an old kernel, a process gone
// already) it returns at once, and the caller's poll decides.
func waitExit(pid int, deadline time.Time) {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, int(left.Milliseconds())+1)
		if n > 0 || err != nil && !errors.Is(err, unix.EINTR) {
			return
		}
	}
}
