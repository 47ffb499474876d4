package itest

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Proc is a long-running process started by [Start] or [StartCmd], the leader
// of its own process group, its output read into Logs.
type Proc struct {
	Cmd  *exec.Cmd
	PID  int // its PID, which is also its process group ID
	Logs *Logs

	tb      testing.TB
	exited  chan struct{}
	kill    sync.Once
	release func() // ends the group's guard (see guard)
}

// TailLines is how many lines of output a failed test's cleanup dumps.
const TailLines = 400

// Start runs name args... as [StartCmd] does, with the environment of
// [CleanEnv] and the test's working directory.
func Start(tb testing.TB, name string, args ...string) *Proc {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = CleanEnv(nil)
	return StartCmd(tb, cmd)
}

// StartCmd starts cmd in its own process group, its stdout and stderr going
// to pipes of our own (not cmd.StdoutPipe: every process it starts inherits
// the write ends, and reading must go on after cmd exits) that the returned
// Proc's Logs read until every writer has exited. It does not wait for any
// readiness: see [Proc.WaitLog] and [Eventually]. A failed start fails tb.
//
// The test's cleanup SIGKILLs the group and waits, 10s at most each, for
// cmd to be reaped, for every process of the group to be gone and for the
// output to end; then, when the test failed, it logs the last [TailLines]
// lines of output.
func StartCmd(tb testing.TB, cmd *exec.Cmd) *Proc {
	tb.Helper()
	rOut, wOut, err := os.Pipe()
	if err != nil {
		tb.Fatal(err)
	}
	rErr, wErr, err := os.Pipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout = wOut
	cmd.Stderr = wErr
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL // should this test process die unclean (a -timeout panic)
	p := &Proc{Cmd: cmd, Logs: NewLogs(2), tb: tb, exited: make(chan struct{})}
	// Registered first, so it runs last, after the group was killed.
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("output of %s:\n%s", strings.Join(cmd.Args, " "), p.Logs.Tail(TailLines))
		}
	})
	err = cmd.Start()
	wOut.Close()
	wErr.Close()
	if err != nil {
		rOut.Close()
		rErr.Close()
		tb.Fatalf("start %v: %v", cmd.Args, err)
	}
	p.PID = cmd.Process.Pid
	p.release = guard(tb, p.PID)
	go p.Logs.Consume(rOut, "stdout")
	go p.Logs.Consume(rErr, "stderr")
	go func() {
		_ = cmd.Wait()
		close(p.exited)
	}()
	tb.Cleanup(p.Kill)
	return p
}

// Exited is closed once the process has been reaped; its status is then in
// Cmd.ProcessState. Its output may still be being read: see [Proc.Wait].
func (p *Proc) Exited() <-chan struct{} { return p.exited }

// Running reports whether the process has not been reaped yet.
func (p *Proc) Running() bool { return !closed(p.exited) }

// Wait blocks until the process has exited and been reaped and its output has
// ended (every process that inherited the pipes has exited too, and the
// readers have read everything), timeout at most in all; it fails tb when
// that does not happen in time. It returns the process's state; Logs then
// hold all of its output.
func (p *Proc) Wait(tb testing.TB, timeout time.Duration) *os.ProcessState {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	if !WaitChan(p.exited, timeout) {
		tb.Fatalf("%s (pid %d) still running after %v", p.Cmd.Args[0], p.PID, timeout)
	}
	if !WaitChan(p.Logs.Done(), time.Until(deadline)) {
		tb.Fatalf("%s (pid %d) exited (%v), but its output did not end within %v: processes of its group still alive: %v",
			p.Cmd.Args[0], p.PID, p.Cmd.ProcessState, timeout, GroupProcs(p.PID))
	}
	return p.Cmd.ProcessState
}

// ExitCode waits as [Proc.Wait] does and returns the exit code, or -1 when
// the process was killed by a signal.
func (p *Proc) ExitCode(tb testing.TB, timeout time.Duration) int {
	tb.Helper()
	return p.Wait(tb, timeout).ExitCode()
}

// WaitLog is p.Logs.Wait: it waits at most timeout for a line from index from
// on with msg (any when empty) that satisfies pred (when non-nil).
func (p *Proc) WaitLog(tb testing.TB, from int, msg string, pred func(Line) bool, timeout time.Duration) Line {
	tb.Helper()
	return p.Logs.Wait(tb, from, msg, pred, timeout)
}

// Kill SIGKILLs the process group and waits, 10s at most each, for the
// leader to be reaped, for every process of the group to be gone and for the
// output to end; it reports a failure to tb with Errorf. Only the first call
// does anything. The cleanup of [StartCmd] calls it.
func (p *Proc) Kill() {
	p.kill.Do(func() {
		_ = syscall.Kill(-p.PID, syscall.SIGKILL)
		if !WaitChan(p.exited, 10*time.Second) {
			p.tb.Errorf("%s (pid %d) not reaped 10s after SIGKILL", p.Cmd.Args[0], p.PID)
		}
		if !Poll(10*time.Second, func() bool { return len(GroupProcs(p.PID)) == 0 }) {
			p.tb.Errorf("processes of group %d still alive 10s after SIGKILL: %v", p.PID, GroupProcs(p.PID))
		}
		if !WaitChan(p.Logs.Done(), 10*time.Second) {
			p.tb.Errorf("output pipes of group %d not closed 10s after SIGKILL", p.PID)
		}
		p.release()
	})
}

// guard starts a watchdog, outside process group pgid, that SIGKILLs the
// group once its standard input ends, which happens when this test process
// dies without running its cleanup (a -timeout panic, a kill): Pdeathsig
// reaches only the group's leader, not the generations that it started and
// that outlive it. The returned release, for a cleanup that killed the group
// itself, kills the watchdog (the group's ID may be reused once its processes
// are gone) and waits for it.
func guard(tb testing.TB, pgid int) (release func()) {
	r, w, err := os.Pipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", "-c", `read -r _; kill -KILL -"$1" 2>/dev/null; exit 0`, "guard", strconv.Itoa(pgid))
	cmd.Stdin = r
	// Its own group, and no Pdeathsig: it must outlive this process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	r.Close()
	if err != nil {
		w.Close()
		tb.Fatalf("start the guard of process group %d: %v", pgid, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	return func() {
		_ = cmd.Process.Kill()
		w.Close()
		if !WaitChan(done, 10*time.Second) {
			tb.Errorf("guard of process group %d (pid %d) not reaped 10s after SIGKILL", pgid, cmd.Process.Pid)
		}
	}
}
