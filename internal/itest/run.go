package itest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// CLITimeout bounds every run of the handoff CLI (upgrade, status) by the
// helpers of this package.
const CLITimeout = 30 * time.Second

// CleanEnv returns the test's environment without systemd's variables
// (NOTIFY_SOCKET, LISTEN_*), plus extra.
func CleanEnv(extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES":
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// Result is the outcome of a one-shot command.
type Result struct {
	Args     []string // the command line, program first
	Code     int      // exit code; -1 when killed by a signal
	Stdout   string
	Stderr   string
	Took     time.Duration
	TimedOut bool // killed at the end of its timeout
}

func (r Result) String() string {
	return fmt.Sprintf("%s: exit %d after %v\nstdout: %s\nstderr: %s",
		strings.Join(r.Args, " "), r.Code, r.Took.Round(time.Millisecond), r.Stdout, r.Stderr)
}

// Running is a one-shot command started by [Go].
type Running struct {
	args []string
	done chan struct{}
	res  Result
}

// Go starts cmd in its own process group (keeping any SysProcAttr.Credential
// the caller set) with its output captured, under a context of timeout whose
// end SIGKILLs the group. It does not wait; see [Running.Wait]. The test's
// cleanup kills and reaps it if it still runs. A failed start fails tb.
func Go(tb testing.TB, timeout time.Duration, cmd *exec.Cmd) *Running {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	// Rebuild cmd under ctx, keeping what the caller set.
	c := exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
	c.Args, c.Dir, c.Env, c.ExtraFiles, c.SysProcAttr, c.Err = cmd.Args, cmd.Dir, cmd.Env, cmd.ExtraFiles, cmd.SysProcAttr, cmd.Err
	var stdout, stderr bytes.Buffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if c.SysProcAttr == nil {
		c.SysProcAttr = &syscall.SysProcAttr{}
	}
	c.SysProcAttr.Setpgid = true
	c.SysProcAttr.Pdeathsig = syscall.SIGKILL // should this test process die unclean
	c.Cancel = func() error { return syscall.Kill(-c.Process.Pid, syscall.SIGKILL) }
	// Wait returns at most this long after the process exited even when one
	// it started still holds the output pipes.
	c.WaitDelay = 5 * time.Second
	r := &Running{args: cmd.Args, done: make(chan struct{})}
	started := time.Now()
	if err := c.Start(); err != nil {
		cancel()
		tb.Fatalf("start %s: %v", strings.Join(cmd.Args, " "), err)
	}
	pgid := c.Process.Pid
	go func() {
		defer close(r.done)
		defer cancel()
		_ = c.Wait() // the output is copied in full when it returns
		r.res = Result{Args: cmd.Args, Code: c.ProcessState.ExitCode(), Stdout: stdout.String(), Stderr: stderr.String(),
			Took: time.Since(started), TimedOut: ctx.Err() != nil}
	}()
	tb.Cleanup(func() {
		if closed(r.done) {
			return
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		if !WaitChan(r.done, 10*time.Second) {
			tb.Errorf("%s (pid %d) not reaped 10s after SIGKILL", strings.Join(cmd.Args, " "), pgid)
		}
	})
	return r
}

// Done reports whether the command has ended (and its result is complete).
func (r *Running) Done() bool { return closed(r.done) }

// Wait waits at most timeout for the command to end and returns its result,
// output complete; it fails tb when the command still runs or was killed at
// the end of its own timeout.
func (r *Running) Wait(tb testing.TB, timeout time.Duration) Result {
	tb.Helper()
	if !WaitChan(r.done, timeout) {
		tb.Fatalf("%s still running after %v", strings.Join(r.args, " "), timeout)
	}
	if r.res.TimedOut {
		tb.Fatalf("%s was killed at the end of its timeout:\n%v", strings.Join(r.args, " "), r.res)
	}
	return r.res
}

// RunCmd runs cmd to its end as [Go] does, bounded by timeout, and returns its
// result; it fails tb when the command does not end by itself in time.
func RunCmd(tb testing.TB, timeout time.Duration, cmd *exec.Cmd) Result {
	tb.Helper()
	return Go(tb, timeout, cmd).Wait(tb, timeout+15*time.Second)
}

// Run runs name args... with the environment of [CleanEnv] in its own
// process group, bounded by timeout (see [RunCmd]).
func Run(tb testing.TB, timeout time.Duration, name string, args ...string) Result {
	tb.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = CleanEnv(nil)
	return RunCmd(tb, timeout, cmd)
}
