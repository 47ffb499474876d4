package upgrader

import (
	"context"
	"errors"
	"os"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/handoff-dev/handoff/internal/pidfile"
)

type request struct {
	ctx     context.Context
	trigger gate.Trigger
	wait    bool // wait for a draining previous generation instead of failing
	reply   chan outcome
}

type outcome struct {
	res   Result
	err   error
	moves bool // the new generation takes moved connections
}

// Upgrade execs a new generation and blocks until it is ready, exits, or the
// upgrade timeout passes; ctx bounds only the wait, not the upgrade. It fails at
// once with ErrUpgradeInProgress, ErrParentDraining or ErrNotReady when another
// upgrade runs, the previous generation still drains, or Ready was not called.
// The binary is checked before anything is forked (ErrBinaryMissing,
// ErrBinaryNotExecutable); a new process that exits early gives an *ExitError,
// one that hangs ErrTimeout. On success, Done is closed.
func (u *Upgrader) Upgrade(ctx context.Context) (Result, error) {
	return u.request(ctx, gate.API, false)
}

// UpgradeAfterDrain is Upgrade, except that it waits for this generation to be
// ready and for the previous generation to exit instead of failing. Requests
// that wait together share one upgrade.
func (u *Upgrader) UpgradeAfterDrain(ctx context.Context) (Result, error) {
	return u.request(ctx, gate.API, true)
}

func (u *Upgrader) request(ctx context.Context, trigger gate.Trigger, wait bool) (Result, error) {
	req := request{ctx: ctx, trigger: trigger, wait: wait, reply: make(chan outcome, 1)}
	select {
	case u.requests <- req:
	case <-u.doneC:
		return Result{}, u.finalErr()
	case <-ctx.Done():
		return Result{}, context.Cause(ctx)
	}
	select {
	case o := <-req.reply:
		return o.res, o.err
	case <-ctx.Done():
		return Result{}, context.Cause(ctx)
	}
}

// observe tells Options.OnUpgrade.
func (u *Upgrader) observe(o outcome) {
	if u.opts.OnUpgrade != nil {
		u.opts.OnUpgrade(o.res, o.err)
	}
}

func (u *Upgrader) finalErr() error {
	if u.HandedOff() != nil {
		return ErrHandedOff
	}
	return ErrStopping
}

// run owns the upgrade state: requests, signals and outcomes are messages to
// it, and the gate decides.
func (u *Upgrader) run() {
	g := gate.New[request](u.tf.HasParent())
	defer func() {
		if u.control != nil {
			u.control.Close() // the next generation, or nobody, answers from now on
		}
		close(u.doneC)
	}()
	var (
		ready   = u.readyC
		parent  = u.parentC
		attempt chan outcome // non-nil while an upgrade runs
	)
	if !u.tf.HasParent() {
		g.PreviousExited()
	}
	reply := func(reqs []request, o outcome) {
		for _, r := range reqs {
			r.reply <- o
		}
	}
	start := func() {
		u.upgrading.Store(true)
		attempt = make(chan outcome, 1)
		go func(c chan outcome) { c <- u.attempt() }(attempt)
	}
	for {
		if g.Next() {
			u.log.Info("running queued upgrade")
			start()
		}
		select {
		case <-ready:
			ready = nil
			g.Ready()
		case <-parent:
			parent = nil
			g.PreviousExited()
		case req := <-u.requests:
			u.log.Info("upgrade requested", "trigger", req.trigger)
			switch d := g.Request(req, req.trigger, req.wait); d.Verdict {
			case gate.Refuse:
				if d.Err == gate.ErrUpgradeInProgress && req.trigger == gate.Signal {
					u.log.Info("upgrade ignored", "reason", "upgrade in progress")
				}
				req.reply <- outcome{err: d.Err}
				u.observe(outcome{err: d.Err})
			case gate.Queue:
				if !d.Repeat {
					u.log.Info("upgrade queued", "reason", d.Reason)
				}
			case gate.Start:
				start()
			}
		case o := <-attempt:
			attempt = nil
			// Settled and counted first: the PID file is right again (and what
			// a killed new process left swept), and the metrics count it, when
			// the verdict is given.
			handed := u.settle(o)
			u.observe(o)
			reply(g.Done(), o)
			if handed {
				g.HandOff()
				return
			}
		case <-u.stopC:
			// The drain starts now, whatever runs: a running attempt is told
			// to give up, and ends on its own (Close waits for it).
			reply(g.Stop(), outcome{err: ErrStopping})
			close(u.abortC)
			if attempt == nil {
				u.stopTableflip()
				return
			}
			waiting := g.Done()
			u.finishing = make(chan struct{})
			go func(c chan outcome) {
				defer close(u.finishing)
				o := <-c
				handed := u.settle(o)
				u.observe(o)
				reply(waiting, o)
				// Unless the new process became ready at that very moment
				// (it then serves), this is a final stop.
				if !handed {
					u.stopTableflip()
				}
			}(attempt)
			return
		}
	}
}

// settle records an attempt's outcome; it reports whether a new generation took
// over.
func (u *Upgrader) settle(o outcome) bool {
	if o.err != nil {
		u.log.Error("upgrade failed", "kind", control.KindOf(o.err), "error", o.err.Error())
		if u.opts.PIDFile != "" {
			// The new process may have written it before it failed to signal
			// ready, or left its temporary file if it was killed.
			if err := pidfile.Write(u.opts.PIDFile, os.Getpid()); err != nil {
				u.log.Error("cannot rewrite pid file", "error", err)
			}
			pidfile.Sweep(u.opts.PIDFile)
		}
		// The next attempt's hello, queued now that this one's child is gone.
		u.mu.Lock()
		if u.children != nil && u.opts.Handover == nil && !isClosed(u.closingC) {
			u.children.prime(u.generation + 1)
		}
		u.mu.Unlock()
		return false
	}
	u.mu.Lock()
	u.handedTo = &o.res
	u.successorMoves = o.moves
	u.mu.Unlock()
	u.log.Info("upgrade succeeded", "new_pid", o.res.PID, "new_version", o.res.Version,
		"new_generation", o.res.Generation, "duration", o.res.Duration)
	return true
}

// status describes this generation now, for the control socket.
func (u *Upgrader) status() control.Status {
	st := control.Status{PID: os.Getpid(), Generation: u.generation, Version: u.opts.Version,
		Started: u.started.UTC(), Phase: gate.Serving}
	if u.opts.InFlight != nil {
		st.InFlight = u.opts.InFlight()
	}
	u.mu.Lock()
	st.Listeners = append([]control.ListenerInfo(nil), u.listeners...)
	st.LastUpgrade = u.last
	handed := u.handedTo != nil
	u.mu.Unlock()
	// From the facts the gate decides on, each set before anyone hears of
	// it (Ready returns, a verdict is given): a status asked right after
	// never sees the phase before.
	switch {
	case handed:
		st.Phase = gate.HandedOff
	case isClosed(u.stopC):
		st.Phase = gate.Stopping
	case !isClosed(u.readyC):
		st.Phase = gate.Starting
	case u.upgrading.Load():
		st.Phase = gate.Upgrading
	case !isClosed(u.parentC):
		st.Phase, st.PreviousPID = gate.DrainingPrevious, os.Getppid()
	}
	return st
}

// controller drives this generation from the control socket.
type controller struct{ u *Upgrader }

func (c controller) Status() control.Status { return c.u.status() }

func (c controller) Stop(ctx context.Context) (control.Drain, error) {
	c.u.Stop()
	select {
	case <-c.u.drainedC:
		d := c.u.drained
		out := control.Drain{Requests: d.Requests, Closed: d.ClosedIdle + d.ClosedAfterResponse + d.Hijacked + d.HTTP2,
			Moved: d.Moved, Cut: d.Cut, Running: d.Running,
			DurationMS: float64(d.Duration.Microseconds()) / 1000}
		if d.Err != nil {
			out.Error = d.Err.Error()
		}
		return out, nil
	case <-c.u.closingC:
		return control.Drain{}, errors.New("stopped, but the server reported no drain (it does not call Drained)")
	case <-ctx.Done():
		return control.Drain{}, context.Cause(ctx)
	}
}

func (c controller) Upgrade(ctx context.Context, wait bool) (control.Result, error) {
	res, err := c.u.request(ctx, gate.API, wait)
	return control.Result(res), err
}
