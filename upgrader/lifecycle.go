package upgrader

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/handoff-dev/handoff/internal/pidfile"
)

// Ready says that the application has initialised and can serve. It puts the
// PID file in place, tells the previous generation, which then stops accepting
// and drains, and closes inherited descriptors that nobody claimed; then it
// reports this generation's PID and version to the previous one.
func (u *Upgrader) Ready() error {
	var err error
	u.readyOnce.Do(func() {
		u.mu.Lock()
		aborted := u.aborted
		u.readyBegun = true
		u.mu.Unlock()
		if aborted {
			err = fmt.Errorf("previous generation gave up waiting for this one: %w", ErrStopping)
			return
		}
		// A stop (a SIGTERM, say) that comes before this generation takes
		// over fails Ready: taking over would leave nothing serving once it
		// has drained, and the previous one sees the upgrade fail and serves
		// on. Signals wait for handover (below): a stop is either before it,
		// or after it, a stop of the serving generation.
		stoppedBefore := func() bool { return u.tf.HasParent() && isClosed(u.stopC) }
		if stoppedBefore() {
			err = fmt.Errorf("stop requested before ready: %w", ErrStopping)
			return
		}
		var pending *pidfile.Pending
		if u.opts.PIDFile != "" {
			if pending = u.takePIDPrep(); pending == nil {
				pending = pidfile.Prepare(u.opts.PIDFile, os.Getpid())
			}
		}
		if err = restoreStderr(u.tf); err != nil {
			pending.Discard()
			return
		}
		u.mu.Lock()
		sigSet := u.sigSet
		u.mu.Unlock()
		if sigSet != nil {
			<-sigSet // a SIGTERM once the previous generation hands over is handled
		}
		u.handover.Lock()
		defer u.handover.Unlock()
		if stoppedBefore() {
			pending.Discard()
			err = fmt.Errorf("stop requested before ready: %w", ErrStopping)
			return
		}
		// The PID file names this generation before it takes over: a PID
		// file that cannot be put in place fails the upgrade, and the
		// previous generation serves on.
		if err = pending.Swap(); err != nil {
			return
		}
		if err = u.tf.Ready(); err != nil {
			pending.Revert() // the previous generation is gone: the PID file is as it found it
			err = fmt.Errorf("signal ready: %w", err)
			return
		}
		close(u.readyC)
		// This generation serves from here: the previous one has stopped
		// accepting (Options.StopAccepting). What follows is off the
		// critical path of the upgrade; the previous generation waits for
		// the report (reportTimeout) before it gives its verdict.
		pending.Cleanup()
		if rerr := u.parent.sendReport(report{PID: os.Getpid(), Version: u.opts.Version, Generation: u.generation,
			Moves: u.moved != nil}); rerr != nil {
			u.log.Warn("cannot report to previous generation", "error", rerr)
		}
		if u.tf.HasParent() {
			// The upgrade that made this generation, as this generation saw it.
			arrived := control.NewOutcome(control.Result{PID: os.Getpid(), Version: u.opts.Version,
				Generation: u.generation, Duration: time.Since(u.started)}, nil)
			u.mu.Lock()
			u.last = &arrived
			u.mu.Unlock()
		}
		u.closeActivated()
		u.sd.Ready(os.Getpid(), fmt.Sprintf("serving: generation %d, version %s", u.generation, u.opts.Version))
		u.log.Info("ready", "version", u.opts.Version)
		if u.control != nil {
			go func() {
				defer close(u.accepting)
				control.Serve(u.control, controller{u}, u.log)
			}()
		}
		go func() {
			// Once the previous generation has exited (no upgrade can start
			// before), not while this one takes its first connections.
			select {
			case <-u.parentC:
				u.warmUp()
			case <-u.closingC:
			}
		}()
	})
	return err
}

// HandedOff returns the generation that took over, or nil.
func (u *Upgrader) HandedOff() *Result {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.handedTo
}

// Done is closed when this generation must stop serving: a new generation is
// ready (HandedOff is then non-nil), or Stop was called.
func (u *Upgrader) Done() <-chan struct{} { return u.doneC }

// Forced is closed when a second SIGTERM or SIGINT asks to stop at once.
func (u *Upgrader) Forced() <-chan struct{} { return u.forcedC }

// DrainContext returns the context a drain should run under: it ends after
// timeout (cause context.DeadlineExceeded) or at a second SIGTERM/SIGINT (cause
// ErrForced).
func (u *Upgrader) DrainContext(parent context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	forced, cancelForced := context.WithCancelCause(parent)
	ctx, cancel := context.WithTimeoutCause(forced, timeout,
		fmt.Errorf("drain deadline of %v: %w", timeout, context.DeadlineExceeded))
	go func() {
		select {
		case <-u.forcedC:
			cancelForced(ErrForced)
		case <-ctx.Done():
		}
	}()
	return ctx, func() {
		cancel()
		cancelForced(context.Canceled)
	}
}

// HandleSignals makes SIGHUP upgrade (queued while the previous generation
// drains, ignored while an upgrade runs), the first SIGTERM or SIGINT Stop, and
// the second close Forced; the handlers are in place when it returns. A stop
// before Ready makes Ready fail in a new generation: the previous one serves
// on. Options.HandleSignals does the same from the start of New, in the
// background (the runtime starts a thread for signals), off an upgrade's
// critical path; Ready then waits for it. Close undoes it.
func (u *Upgrader) HandleSignals() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.sigC != nil {
		return
	}
	u.sigC, u.sigSet = notifySignals()
	<-u.sigSet
	go u.handleSignals(u.sigC)
}

func (u *Upgrader) handleSignals(c chan os.Signal) {
	for sig := range c {
		u.onSignal(sig)
	}
}

// onSignal acts on one signal; it is called by one goroutine at a time.
func (u *Upgrader) onSignal(sig os.Signal) {
	switch sig {
	case syscall.SIGHUP:
		u.signalUpgrade()
	default:
		u.stops++
		u.log.Info("stop requested", "signal", sig.String(), "count", u.stops)
		if u.stops == 1 {
			u.handover.Lock() // before Ready hands over, or after: not during
			u.Stop()
			u.handover.Unlock()
		} else {
			u.forceOnce.Do(func() { close(u.forcedC) })
		}
	}
}

// takePending acts on the signals already caught (since package init, see
// EarlySignals), before New returns: a stop sent before New is then a stop
// before Ready, which fails.
func (u *Upgrader) takePending(c chan os.Signal) {
	for {
		select {
		case sig := <-c:
			u.onSignal(sig)
		default:
			return
		}
	}
}

// signalUpgrade asks the run loop for an upgrade and does not wait for the
// verdict (the reply channel is buffered). The request is handed to the loop
// from this goroutine when the loop waits for one, as it nearly always does: a
// goroutine started for it would be one more wake-up on the critical path of
// the upgrade, which a loaded machine can make long.
func (u *Upgrader) signalUpgrade() {
	req := request{ctx: context.Background(), trigger: gate.Signal, wait: true, reply: make(chan outcome, 1)}
	select {
	case u.requests <- req:
	default:
		go func() {
			select {
			case u.requests <- req:
			case <-u.doneC:
			}
		}()
	}
}

// Stop ends upgrades and closes Done at once, so that the drain can start: a
// running upgrade is given up on (see Options.AbortTimeout) and ends on its
// own; Close waits for it. The listeners stay open for the drain. On a final
// stop, Unix socket files are removed and systemd hears STOPPING=1; a new
// generation that never became ready does neither, since its previous
// generation still serves on those sockets.
func (u *Upgrader) Stop() {
	u.stopOnce.Do(func() {
		if u.HandedOff() == nil && (isClosed(u.readyC) || !u.tf.HasParent()) {
			u.sd.Stopping()
		}
		close(u.stopC)
	})
}

// stopTableflip ends tableflip. A generation started by an upgrade that never
// became ready must not let tableflip stop: its Stop unlinks every Unix socket
// path in use, and the previous generation still serves on them. Its copies
// close when it exits; only the socket files it bound itself are removed.
func (u *Upgrader) stopTableflip() {
	if u.tf.HasParent() && !isClosed(u.readyC) {
		u.mu.Lock()
		created := u.created
		u.mu.Unlock()
		for _, path := range created {
			if !strings.HasPrefix(path, "@") {
				os.Remove(path)
			}
		}
		return
	}
	u.tf.Stop()
	// tableflip unlinks the Unix socket files from its own goroutine: wait for
	// it, or this process could exit first and leave them behind.
	select {
	case <-u.tf.Exit():
	case <-time.After(time.Second):
	}
}

// abandoned is called when the previous generation gives up on this one
// before it is ready: it stops, and drains what it accepted.
func (u *Upgrader) abandoned() {
	u.mu.Lock()
	late := u.readyBegun
	u.aborted = !late
	u.mu.Unlock()
	if late {
		return // Ready is under way: the previous generation will see it
	}
	u.log.Warn("the previous generation gave up waiting for this one: stopping")
	u.Stop()
}

// Close releases the generation: it stops signal handling, ends the upgrade loop
// and, after a final stop (no new generation took over), removes the PID file.
// Call it last, after the drain. It blocks until the control socket's answers
// in flight are written and an upgrade abandoned by Stop has ended (at most
// Options.AbortTimeout and a few seconds).
func (u *Upgrader) Close() error {
	var err error
	u.closeOnce.Do(func() {
		close(u.closingC)
		u.mu.Lock()
		sigC, sigSet := u.sigC, u.sigSet
		u.mu.Unlock()
		if sigC != nil {
			stopSignals(sigC, sigSet)
		}
		u.Stop()
		<-u.doneC
		if u.finishing != nil {
			<-u.finishing // the abandoned attempt's verdict, and tableflip's stop
		}
		if u.accepting != nil && isClosed(u.readyC) {
			// The run loop closed the control socket; the answers still being
			// given (the verdict of the upgrade that ended this generation, say)
			// are written before this returns.
			<-u.accepting
		}
		u.parent.close()
		u.mu.Lock()
		if t := u.lastTee; t != nil {
			u.mu.Unlock()
			t.wait(time.Second)
			u.mu.Lock()
		}
		u.children.Close()
		u.moves.Close()
		handed := u.handedTo != nil
		u.mu.Unlock()
		if p := u.takePIDPrep(); p != nil {
			p.Discard() // never ready
		}
		if u.opts.PIDFile != "" && !handed {
			err = pidfile.Remove(u.opts.PIDFile, os.Getpid())
		}
		u.log.Info("exiting", usage()...)
	})
	return err
}

// takePIDPrep returns the PID file a new generation wrote ahead (New), once;
// nil at first start, or once taken.
func (u *Upgrader) takePIDPrep() *pidfile.Pending {
	u.mu.Lock()
	c := u.pidPrep
	u.pidPrep = nil
	u.mu.Unlock()
	if c == nil {
		return nil
	}
	return <-c
}

// usage is this process's CPU time (user and system) and peak RSS so far,
// as log attributes: what one generation cost, from its exiting line.
func usage() []any {
	var attrs []any
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		attrs = append(attrs, "cpu", time.Duration(ru.Utime.Nano()+ru.Stime.Nano()))
	}
	if kib, ok := peakRSSKiB(); ok {
		attrs = append(attrs, "peak_rss_kib", kib)
	}
	return attrs
}

// peakRSSKiB is VmHWM (Linux). Not getrusage's ru_maxrss: a process keeps
// that across exec, so a new generation's would start at its parent's peak.
func peakRSSKiB() (int64, bool) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, false
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}
