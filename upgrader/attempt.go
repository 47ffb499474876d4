package upgrader

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/tail"
)

// reportTimeout bounds the wait for a ready child's report; the child sends it
// right after it has signalled readiness (and this process has stopped
// accepting), so it normally comes within a millisecond.
const reportTimeout = 2 * time.Second

// attempt runs one upgrade; it is the only caller of tableflip's Upgrade.
func (u *Upgrader) attempt() (o outcome) {
	started := time.Now()
	u.sd.Reloading()
	defer func() {
		out := control.NewOutcome(control.Result(o.res), o.err)
		u.mu.Lock()
		u.last = &out
		u.mu.Unlock()
		u.upgrading.Store(false) // before the verdict is given
		// An attempt ended by a stop is not a failed reload: systemd heard
		// STOPPING=1, and READY=1 would tell it the service runs on.
		if o.err != nil && !errors.Is(o.err, ErrStopping) {
			u.sd.Failed(o.err)
		}
	}()
	if err := checkBinary(u.binary); err != nil {
		return outcome{err: err}
	}
	if err := u.preflight(); err != nil {
		return outcome{err: err}
	}
	if isClosed(u.abortC) {
		return outcome{err: ErrStopping}
	}
	ch, err := u.childChannel()
	if err != nil {
		return outcome{err: err}
	}
	moves := false
	h := hello{Generation: u.generation + 1}
	if u.opts.Handover != nil {
		if h.Handover = u.opts.Handover(); len(h.Handover) > MaxHandover {
			u.log.Warn("handover too long: not passed", "bytes", len(h.Handover), "max", MaxHandover)
			h.Handover = nil
		}
	}
	u.mu.Lock() // warmUp and settle prime the channel under it
	err = ch.hello(h)
	u.mu.Unlock()
	if err != nil {
		return outcome{err: fmt.Errorf("prepare child channel: %w", err)}
	}
	u.log.Info("starting new generation", "binary", u.binary)
	tee, err := u.captureStderr()
	if err != nil {
		return outcome{err: err}
	}
	err = u.waitReady(ch)
	if err != nil {
		// What the new process left behind (a wrapper's forked children).
		if pids := killHolders(ch.theirsLink(), unix.SIGKILL); len(pids) > 0 {
			u.log.Warn("killed what the failed new process left running", "pids", pids)
		}
	}
	lines := tee.stop(err != nil)
	if err == nil {
		// The new generation's lines written before its Ready may still be in
		// the pipe: Close waits for them, so they are not lost when this
		// process exits right after its drain.
		u.mu.Lock()
		u.lastTee = tee
		u.mu.Unlock()
	}
	if err != nil {
		return outcome{err: withStderr(err, lines)}
	}
	res := Result{Generation: u.generation + 1, Duration: time.Since(started)}
	if r, err := ch.readReport(reportTimeout); err != nil {
		u.log.Warn("new generation is ready but sent no report", "error", err)
	} else {
		res.PID, res.Version = r.PID, r.Version
		moves = r.Moves
	}
	return outcome{res: res, moves: moves}
}

// backstop is how much longer than UpgradeTimeout+AbortTimeout tableflip waits
// before it kills a new process that waitReady could not find.
const backstop = 5 * time.Second

// waitReady runs tableflip's Upgrade until the new process is ready or exits.
// At UpgradeTimeout, or when the attempt is abandoned by Stop, the new process
// is given up on: one that said it started (it is built on this package) is
// told to stop and drains what it accepted, for up to AbortTimeout; anything
// else is killed. If it becomes ready meanwhile, it serves.
func (u *Upgrader) waitReady(ch *childChannel) error {
	res := make(chan error, 1)
	go func() {
		err := u.tableflipUpgrade()
		if err == nil && u.opts.StopAccepting != nil {
			u.opts.StopAccepting() // the new generation serves: it takes the connections from now on
		}
		res <- err
	}()
	timer := time.NewTimer(u.opts.UpgradeTimeout)
	defer timer.Stop()
	var why error
	select {
	case err := <-res:
		return err
	case <-timer.C:
		why = ErrTimeout
	case <-u.abortC:
		why = ErrStopping
	}
	link := ch.theirsLink()
	pid := ch.started()
	if pid != 0 && ch.abort() == nil {
		u.log.Warn("giving up on the new process: it stops and drains what it accepted", "new_pid", pid,
			"reason", why.Error(), "timeout", u.opts.AbortTimeout)
		select {
		case err := <-res:
			return gaveUp(err, why, pid, true)
		case <-time.After(u.opts.AbortTimeout):
			u.log.Warn("the new process did not stop in time: killing it", "new_pid", pid)
		}
	}
	killHolders(link, unix.SIGKILL)
	return gaveUp(<-res, why, pid, false)
}

// gaveUp is the outcome of an attempt given up on for why: err is tableflip's
// answer once the new process (pid, if known) ended, by itself when stopped
// is set, or killed.
func gaveUp(err, why error, pid int, stopped bool) error {
	if err == nil {
		return nil // it became ready at the last moment, and serves
	}
	var exit *ExitError
	if errors.As(err, &exit) {
		pid = exit.PID
	}
	if why == ErrTimeout {
		return &TimeoutError{PID: pid, Stopped: stopped}
	}
	return ErrStopping
}

// tableflipUpgrade calls tableflip's Upgrade. Our run loop starts an upgrade only
// once WaitForParent has returned, but tableflip's own loop learns of the
// parent's exit from another channel, a moment later: until then it answers
// "parent hasn't exited". That answer is retried for a bounded moment.
func (u *Upgrader) tableflipUpgrade() error {
	deadline := time.Now().Add(time.Second)
	for {
		err := fromTableflip(u.tf.Upgrade())
		if !errors.Is(err, ErrParentDraining) || time.Now().After(deadline) {
			return err
		}
		time.Sleep(time.Millisecond)
	}
}

// captureStderr makes os.Stderr a pipe for the attempt, passing the real
// stderr on to the new process the first time, for it to restore at Ready.
func (u *Upgrader) captureStderr() (*stderrTee, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err := u.passStderrLocked(); err != nil {
		return nil, err
	}
	return captureStderr()
}

// passStderrLocked registers the real stderr with tableflip, once.
func (u *Upgrader) passStderrLocked() error {
	if !u.stderrPassed {
		if err := u.tf.AddFile(stderrName, os.Stderr); err != nil {
			return fmt.Errorf("pass stderr: %w", err)
		}
		u.stderrPassed = true
	}
	return nil
}

// preflight runs the new binary with Options.Preflight.
func (u *Upgrader) preflight() error {
	if u.opts.Preflight == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), u.opts.UpgradeTimeout)
	defer cancel()
	go func() {
		select {
		case <-u.abortC:
			cancel()
		case <-ctx.Done():
		}
	}()
	u.log.Info("preflight", "binary", u.binary, "args", u.opts.Preflight)
	cmd := exec.CommandContext(ctx, u.binary, u.opts.Preflight...)
	cmd.Dir = filepath.Dir(u.binary)
	// Its own process group, killed whole: a wrapper's forked children would
	// otherwise hold the output pipe and the wait.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	out, err := cmd.CombinedOutput()
	if cmd.Process != nil {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // what it left behind
	}
	if err == nil {
		return nil
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) > tail.MaxLines {
		lines = lines[len(lines)-tail.MaxLines:]
	}
	status := err.Error()
	if isClosed(u.abortC) {
		return ErrStopping
	}
	if ctx.Err() != nil {
		status = "timed out after " + u.opts.UpgradeTimeout.String()
	}
	return &PreflightError{Status: status, Output: lines}
}

// childChannel returns the channels to the next generation, made at the first
// attempt if warmUp has not made them.
func (u *Upgrader) childChannel() (*childChannel, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.childChannelLocked()
}

// warmUp makes, once this generation is ready, what the first attempt would
// otherwise make on an upgrade's critical path: the channels to the next
// generation and the registration of the real stderr. An error is left for
// that attempt to meet and report.
func (u *Upgrader) warmUp() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if isClosed(u.closingC) {
		return // Close closes the channels under u.mu after closingC
	}
	if ch, err := u.childChannelLocked(); err == nil {
		u.passStderrLocked()
		// Not once an attempt has started (a SIGHUP queued during the
		// previous generation's drain starts as it exits): the attempt
		// queues its hello itself, under u.mu, and priming again would
		// empty the channel under its new process.
		if u.opts.Handover == nil && !u.upgrading.Load() {
			ch.prime(u.generation + 1)
		}
	}
}

func (u *Upgrader) childChannelLocked() (*childChannel, error) {
	if u.children == nil {
		ch, err := newChildChannel(u.tf)
		if err != nil {
			return nil, err
		}
		m, err := newMovesOut(u.tf, u.opts, u.log)
		if err != nil {
			ch.Close()
			return nil, err
		}
		u.children, u.moves = ch, m
	}
	return u.children, nil
}
