package supervisor

import (
	"context"
	"fmt"
	"slices"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
)

type eventKind int

const (
	evReady eventKind = iota
	evExit
	evReadyTimeout
	evDrainTimeout
	evRestart
)

type event struct {
	kind     eventKind
	pid      int
	instance int // evRestart
	status   syscall.WaitStatus
	how      string
}

// set is the loop's view of the children. serving has one child per instance
// at most; starting holds an upgrade's new children and restarts; draining the
// children told to stop.
type set struct {
	serving  map[int]*child // by instance
	starting map[int]*child // by PID
	draining map[int]*child // by PID
}

// rollout is one replacement of the whole set: the first start, or an
// upgrade. Instances are replaced MaxSurge at a time (a batch): a batch's new
// children all become ready, then its old ones are told to stop, and the next
// batch starts once they have exited.
type rollout struct {
	generation int
	first      bool           // the first start: nothing to replace, nobody to answer
	pending    []int          // instances not started yet
	batch      map[int]*child // instance -> new child of the running batch
	ready      map[int]bool   // instances of the batch that are ready
	started    time.Time
	firstPID   int // the first new child, for the verdict
}

// loop owns the children: events, requests and ctx become its decisions, and
// the gate decides on upgrade requests.
func (s *Supervisor) loop(ctx context.Context) error {
	g := gate.New[request](false)
	cs := set{serving: map[int]*child{}, starting: map[int]*child{}, draining: map[int]*child{}}
	var (
		roll       *rollout
		generation int             // of the serving set
		restarts   = map[int]int{} // consecutive restarts, by instance
		lastStart  = map[int]time.Time{}
		timers     = map[int]*time.Timer{} // pending restarts, by instance
		// instances whose restart waits for the drain of a restart that was
		// not ready in time: restarts of a child that hangs do not pile up
		afterDrain = map[int]bool{}
	)
	n := s.opts.Instances
	surge := s.opts.MaxSurge
	if surge <= 0 || surge > n {
		surge = n
	}
	spawn := func(instance, gen int, restart bool) (*child, error) {
		c, err := s.spawn(gen, instance)
		if err != nil {
			return nil, err
		}
		c.restart = restart
		if restart {
			c.restarts = restarts[instance]
		}
		cs.starting[c.pid] = c
		lastStart[instance] = time.Now()
		s.track(c)
		s.log.Info("child started", "child_pid", c.pid, "instance", instance, "generation", gen, "command", s.opts.Command)
		time.AfterFunc(s.opts.ReadyTimeout, func() { s.send(event{kind: evReadyTimeout, pid: c.pid}) })
		if s.opts.ReadyDelay > 0 {
			time.AfterFunc(s.opts.ReadyDelay, func() { s.send(event{kind: evReady, pid: c.pid, how: "ready delay"}) })
		}
		return c, nil
	}
	// answer ends the running attempt with o.
	answer := func(o outcome) {
		waiting := g.Done()
		if o.err != nil {
			s.setLast(o)
			s.sd.Failed(o.err)
		}
		// Status first: a client that hears the verdict and asks for the
		// status sees the phase after it.
		s.setStatus(g.Phase(), generation, cs)
		for _, r := range waiting {
			r.reply <- o
		}
		s.observe(o)
	}
	stop := func(c *child, why string) {
		delete(cs.starting, c.pid)
		s.log.Info(why, "child_pid", c.pid, "instance", c.instance, "signal", s.opts.StopSignal.String())
		s.stopChild(c)
		cs.draining[c.pid] = c
		g.Draining()
	}
	restart := func(instance int) {
		if timers[instance] != nil {
			timers[instance].Stop()
			delete(timers, instance)
		}
		if cs.serving[instance] != nil || roll != nil && roll.batch[instance] != nil {
			return
		}
		for _, c := range cs.starting {
			if c.instance == instance {
				return
			}
		}
		for _, c := range cs.draining {
			if c.instance == instance && c.restart && c.timedOut {
				afterDrain[instance] = true
				return
			}
		}
		if _, err := spawn(instance, generation, true); err != nil {
			s.log.Error("cannot restart child", "instance", instance, "error", err)
			timers[instance] = s.scheduleRestart(instance, restarts)
		}
	}
	// startBatch starts the next instances of the rollout; it reports a
	// failure to start one.
	startBatch := func() error {
		k := min(surge, len(roll.pending))
		if roll.first {
			k = len(roll.pending) // nothing to replace: all at once
		}
		insts := roll.pending[:k]
		roll.pending = roll.pending[k:]
		roll.batch, roll.ready = map[int]*child{}, map[int]bool{}
		for _, inst := range insts {
			c, err := spawn(inst, roll.generation, false)
			if err != nil {
				return err
			}
			roll.batch[inst] = c
			if roll.firstPID == 0 {
				roll.firstPID = c.pid
			}
		}
		return nil
	}
	// fail ends the rollout: the new children of the running batch may have
	// accepted connections, so they are stopped gracefully; the old set keeps
	// serving, and an instance left with no child restarts at once.
	fail := func(failed *child, err error) error {
		r := roll
		roll = nil
		for _, c := range r.batch {
			if _, ok := cs.starting[c.pid]; ok {
				stop(c, "stopping the failed upgrade's new child")
			}
		}
		attrs := []any{"kind", control.KindOf(err), "error", err.Error()}
		if failed != nil {
			attrs = append(attrs, "child_pid", failed.pid, "instance", failed.instance)
		}
		s.log.Error("upgrade failed", attrs...)
		if r.first {
			return fmt.Errorf("%w: %w", ErrChildFailed, err)
		}
		answer(outcome{err: err})
		for inst := range n {
			if cs.serving[inst] == nil {
				restart(inst)
			}
		}
		return nil
	}
	begin := func(first bool) error {
		roll = &rollout{generation: generation + 1, first: first, pending: slices.Collect(rangeN(n)), started: time.Now()}
		if !first {
			s.sd.Reloading()
		}
		if err := startBatch(); err != nil {
			return fail(nil, err)
		}
		return nil
	}
	// promote makes a ready batch serve and stops the children it replaces.
	promote := func() {
		for inst, c := range roll.batch {
			delete(cs.starting, c.pid)
			s.setReady(c)
			if old := cs.serving[inst]; old != nil {
				stop(old, "draining old child")
			}
			for _, r := range cs.starting { // a restart of this instance is not needed any more
				if r.instance == inst && r.restart {
					stop(r, "stopping a restart made unneeded by the upgrade")
				}
			}
			cs.serving[inst] = c
		}
		first := roll.first
		roll.batch, roll.ready = nil, nil
		if !first {
			g.Ready()
		}
	}
	// advance moves the rollout on: the next batch once the drains are over,
	// or the end.
	advance := func() error {
		if roll == nil || roll.batch != nil {
			return nil
		}
		if len(roll.pending) > 0 {
			if len(cs.draining) > 0 {
				return nil // within --max-surge: the next batch waits for the drains
			}
			if err := startBatch(); err != nil {
				return fail(nil, err)
			}
			return nil
		}
		r := roll
		roll = nil
		generation = r.generation
		res := control.Result{PID: r.firstPID, Generation: r.generation, Version: s.opts.Version, Duration: time.Since(r.started)}
		s.sd.Ready(0, fmt.Sprintf("serving: %d of %d children, generation %d", len(cs.serving), n, generation))
		if r.first {
			g.Ready()
			s.log.Info("ready", "instances", n)
			return nil
		}
		s.log.Info("upgrade succeeded", "new_pid", r.firstPID, "generation", r.generation, "instances", n, "duration", res.Duration)
		s.setLast(outcome{res: res})
		answer(outcome{res: res})
		return nil
	}

	// handle turns one event into decisions.
	handle := func(ev event) error {
		var err error
		switch ev.kind {
		case evReady:
			c := cs.starting[ev.pid]
			if c == nil {
				return nil
			}
			s.log.Info("child ready", "child_pid", c.pid, "instance", c.instance, "how", ev.how,
				"duration", time.Since(c.started))
			if c.restart {
				delete(cs.starting, c.pid)
				if cs.serving[c.instance] != nil {
					stop(c, "stopping a restart made unneeded")
					return nil
				}
				s.setReady(c)
				cs.serving[c.instance] = c
				g.Ready()
				s.sd.Ready(0, fmt.Sprintf("serving: %d of %d children, generation %d", len(cs.serving), n, generation))
				return nil
			}
			if roll == nil || roll.batch[c.instance] != c {
				return nil
			}
			roll.ready[c.instance] = true
			if len(roll.ready) == len(roll.batch) {
				promote()
				err = advance()
			}

		case evReadyTimeout:
			c := cs.starting[ev.pid]
			if c == nil {
				return nil
			}
			c.timedOut = true
			terr := &control.TimeoutError{PID: c.pid, Stderr: c.tail.Lines(), Stopped: true}
			// It may have accepted connections: it is stopped like an old
			// child (stop signal, drain, SIGKILL at the drain deadline).
			stop(c, "child not ready in time: stopping it")
			if c.restart {
				timers[c.instance] = s.scheduleRestart(c.instance, restarts)
			} else if roll != nil && roll.batch[c.instance] == c {
				err = fail(c, s.ofInstance(c, terr))
			}

		case evDrainTimeout:
			if c := cs.draining[ev.pid]; c != nil {
				s.log.Warn("child still running at the drain deadline: killing its process group", "child_pid", ev.pid)
				s.reaper.signal(ev.pid, syscall.SIGKILL, true)
			}

		case evRestart:
			delete(timers, ev.instance)
			restart(ev.instance)

		case evExit:
			c := s.untrack(ev.pid)
			if c == nil {
				return nil
			}
			c.close()
			switch {
			case cs.draining[c.pid] == c:
				delete(cs.draining, c.pid)
				s.log.Info("old child exited", "child_pid", c.pid, "instance", c.instance, "status", statusString(ev.status))
				if afterDrain[c.instance] && c.restart && c.timedOut {
					delete(afterDrain, c.instance)
					restart(c.instance)
				}
				if len(cs.draining) == 0 {
					g.PreviousExited()
					err = advance()
				}
			case cs.starting[c.pid] == c:
				delete(cs.starting, c.pid)
				xerr := exitError(c, ev.status)
				if c.restart {
					s.log.Error("restarted child failed", "child_pid", c.pid, "instance", c.instance, "error", xerr.Error())
					timers[c.instance] = s.scheduleRestart(c.instance, restarts)
				} else if roll != nil && roll.batch[c.instance] == c {
					err = fail(c, s.ofInstance(c, xerr))
				}
			case cs.serving[c.instance] == c:
				delete(cs.serving, c.instance)
				if len(cs.serving) == 0 {
					g.Lost()
				}
				s.log.Error("child died while serving: restarting it", "child_pid", c.pid, "instance", c.instance,
					"status", statusString(ev.status), "stderr", c.tail.Lines())
				if time.Since(lastStart[c.instance]) > 10*time.Second {
					restarts[c.instance] = 0
				}
				// While an upgrade's new child for this instance starts, its
				// outcome decides: it serves, or the restart happens at once
				// when it fails.
				if roll == nil || roll.batch[c.instance] == nil {
					if len(cs.serving) == 0 {
						restart(c.instance) // nothing serves: no backoff
					} else {
						timers[c.instance] = s.scheduleRestart(c.instance, restarts)
					}
				}
			}
		}
		return err
	}

	if err := begin(true); err != nil {
		return err
	}
	stopping := false
	for {
		if roll == nil && g.Next() {
			s.log.Info("running queued upgrade")
			if err := begin(false); err != nil {
				return err
			}
		}
		s.setStatus(g.Phase(), generation, cs)
		select {
		case <-ctx.Done():
			stopping = true
		case <-s.stopC:
			stopping = true
		case req := <-s.requests:
			s.log.Info("upgrade requested", "trigger", req.trigger)
			switch d := g.Request(req, req.trigger, req.wait); d.Verdict {
			case gate.Refuse:
				if d.Err == gate.ErrUpgradeInProgress && req.trigger == gate.Signal {
					s.log.Info("upgrade ignored", "reason", "upgrade in progress")
				}
				req.reply <- outcome{err: d.Err}
				s.observe(outcome{err: d.Err})
			case gate.Queue:
				if !d.Repeat {
					s.log.Info("upgrade queued", "reason", d.Reason)
				}
			case gate.Start:
				if err := begin(false); err != nil {
					return err
				}
			}
		case ev := <-s.events:
			if err := handle(ev); err != nil {
				s.stopAll(cs, nil)
				return err
			}
		}
		if stopping {
			for _, t := range timers {
				t.Stop()
			}
			refused := g.Stop()
			if g.Attempting() {
				refused = append(refused, g.Done()...)
			}
			s.setStatus(g.Phase(), generation, cs)
			return s.stopAll(cs, refused)
		}
	}
}
