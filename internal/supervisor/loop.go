package supervisor

import (
	"context"
	"fmt"
	"strings"
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
	kind   eventKind
	pid    int
	status syscall.WaitStatus
	how    string
}

// loop owns the children: events, requests and ctx become its decisions, and
// the gate decides on upgrade requests.
func (s *Supervisor) loop(ctx context.Context) error {
	g := gate.New[request](false)
	var (
		generation int
		current    *child // serving
		starting   *child // not ready yet: an upgrade's new child, or a restart
		draining   *child // told to stop
		restarts   int
		restartAt  *time.Timer
		lastStart  time.Time
		attemptAt  time.Time
	)
	startChild := func(restart bool) error {
		generation++
		c, err := s.spawn(generation)
		if err != nil {
			return err
		}
		c.restart = restart
		starting, lastStart = c, time.Now()
		if !restart {
			attemptAt = lastStart
		}
		s.track(c)
		s.log.Info("child started", "child_pid", c.pid, "generation", generation, "command", s.opts.Command)
		time.AfterFunc(s.opts.ReadyTimeout, func() { s.send(event{kind: evReadyTimeout, pid: c.pid}) })
		if s.opts.ReadyDelay > 0 {
			time.AfterFunc(s.opts.ReadyDelay, func() { s.send(event{kind: evReady, pid: c.pid, how: "ready delay"}) })
		}
		return nil
	}
	// answer ends the running attempt with o.
	answer := func(o outcome) {
		for _, r := range g.Done() {
			r.reply <- o
		}
		if o.err != nil {
			s.setLast(o)
			s.sd.Failed(o.err)
		}
	}
	begin := func() {
		s.sd.Reloading()
		if err := startChild(false); err != nil {
			answer(outcome{err: err})
		}
	}
	restart := func() {
		if current != nil || starting != nil {
			return
		}
		if err := startChild(true); err != nil {
			s.log.Error("cannot restart child", "error", err)
			restartAt = s.scheduleRestart(&restarts)
		}
	}
	if err := startChild(false); err != nil {
		return fmt.Errorf("%w: %w", ErrChildFailed, err)
	}
	first := true

	for {
		if g.Next() {
			s.log.Info("running queued upgrade")
			begin()
		}
		s.setPhase(g.Phase(), current, draining)
		select {
		case <-ctx.Done():
			if restartAt != nil {
				restartAt.Stop()
			}
			refused := g.Stop()
			if g.Attempting() {
				refused = append(refused, g.Done()...)
			}
			s.setPhase(g.Phase(), current, draining)
			return s.stopAll(current, starting, draining, refused)

		case req := <-s.requests:
			s.log.Info("upgrade requested", "trigger", req.trigger)
			switch d := g.Request(req, req.trigger, req.wait); d.Verdict {
			case gate.Refuse:
				if d.Err == gate.ErrUpgradeInProgress && req.trigger == gate.Signal {
					s.log.Info("upgrade ignored", "reason", "upgrade in progress")
				}
				req.reply <- outcome{err: d.Err}
			case gate.Queue:
				if !d.Repeat {
					s.log.Info("upgrade queued", "reason", d.Reason)
				}
			case gate.Start:
				begin()
			}

		case ev := <-s.events:
			switch ev.kind {
			case evReady:
				if starting == nil || ev.pid != starting.pid {
					continue
				}
				c := starting
				starting = nil
				s.setChildPhase(c, control.ChildServing)
				res := control.Result{PID: c.pid, Generation: c.generation, Version: s.opts.Version,
					Duration: time.Since(attemptAt)}
				s.log.Info("child ready", "child_pid", c.pid, "how", ev.how, "duration", res.Duration)
				if old := current; old != nil {
					s.log.Info("draining old child", "child_pid", old.pid, "signal", s.opts.StopSignal.String())
					s.stopChild(old)
					draining = old
					g.Draining()
				}
				current = c
				g.Ready()
				s.sd.Ready(0, fmt.Sprintf("serving: child %d", c.pid))
				switch {
				case first:
					first = false
					s.log.Info("ready")
				case !c.restart:
					s.log.Info("upgrade succeeded", "new_pid", c.pid, "generation", c.generation)
					s.setLast(outcome{res: res})
					answer(outcome{res: res})
				}

			case evReadyTimeout:
				if starting == nil || ev.pid != starting.pid {
					continue
				}
				// It may have accepted connections: it is stopped like an old
				// child (stop signal, drain, SIGKILL at the drain deadline), and
				// the verdict is given now.
				c := starting
				starting, c.timedOut = nil, true
				err := &control.TimeoutError{PID: c.pid, Stderr: c.tail.Lines()}
				s.log.Error("upgrade failed", "kind", control.KindOf(err), "error", err.Error(), "child_pid", c.pid,
					"signal", s.opts.StopSignal.String())
				s.stopChild(c)
				draining = c
				g.Draining()
				if first {
					s.reaper.signal(c.pid, syscall.SIGKILL, true)
					return fmt.Errorf("%w: %w", ErrChildFailed, err)
				}
				if !c.restart {
					answer(outcome{err: err})
				}
				if current == nil {
					restart()
				}

			case evDrainTimeout:
				if draining != nil && ev.pid == draining.pid {
					s.log.Warn("old child still running at the drain deadline: killing its process group", "child_pid", ev.pid)
					s.reaper.signal(ev.pid, syscall.SIGKILL, true)
				}

			case evRestart:
				restartAt = nil
				restart()

			case evExit:
				c := s.untrack(ev.pid)
				if c == nil {
					continue
				}
				c.close()
				switch c {
				case starting:
					starting = nil
					err := exitError(c, ev.status)
					s.log.Error("upgrade failed", "kind", control.KindOf(err), "error", err.Error(), "child_pid", c.pid)
					if first {
						return fmt.Errorf("%w: %w", ErrChildFailed, err)
					}
					if c.restart {
						restartAt = s.scheduleRestart(&restarts)
						continue
					}
					answer(outcome{err: err})
					if current == nil {
						// The serving child died during this upgrade: never stay
						// without one.
						s.log.Error("no child serves: restarting the last good command now")
						restart()
					}
				case draining:
					draining = nil
					g.PreviousExited()
					s.log.Info("old child exited", "child_pid", c.pid, "status", statusString(ev.status))
				case current:
					current = nil
					g.Lost()
					s.log.Error("child died while serving: restarting it", "child_pid", c.pid,
						"status", statusString(ev.status), "stderr", c.tail.Lines())
					if time.Since(lastStart) > 10*time.Second {
						restarts = 0
					}
					// While an upgrade's child starts, its outcome decides: it
					// serves, or the restart happens when it fails.
					restartAt = s.scheduleRestart(&restarts)
				}
			}
		}
	}
}

// stopChild sends c its stop signal and arms the drain deadline.
func (s *Supervisor) stopChild(c *child) {
	s.setChildPhase(c, control.ChildDraining)
	s.reaper.signal(c.pid, s.opts.StopSignal, false)
	pid := c.pid
	time.AfterFunc(s.opts.DrainTimeout, func() { s.send(event{kind: evDrainTimeout, pid: pid}) })
}

func (s *Supervisor) scheduleRestart(restarts *int) *time.Timer {
	delay := DefaultRestartDelay << min(*restarts, 10)
	delay = min(delay, DefaultMaxRestartDelay)
	*restarts++
	s.log.Info("restart scheduled", "in", delay, "attempt", *restarts)
	return time.AfterFunc(delay, func() { s.send(event{kind: evRestart}) })
}

// stopAll stops every child gracefully and waits for them.
func (s *Supervisor) stopAll(current, starting, draining *child, refused []request) error {
	for _, r := range refused {
		r.reply <- outcome{err: gate.ErrStopping}
	}
	s.sd.Stopping()
	// Every child may have accepted connections, a starting one too: each gets
	// its stop signal and drains.
	for _, c := range []*child{current, starting, draining} {
		if c != nil {
			s.log.Info("stopping child", "child_pid", c.pid, "signal", s.opts.StopSignal.String())
			s.reaper.signal(c.pid, s.opts.StopSignal, false)
		}
	}
	deadline := time.NewTimer(s.opts.DrainTimeout)
	defer deadline.Stop()
	force := s.forceC
	var failed []string
	killed := false
	for s.tracked() > 0 {
		select {
		case ev := <-s.events:
			if ev.kind != evExit {
				continue
			}
			c := s.untrack(ev.pid)
			if c == nil {
				continue
			}
			c.close()
			st := statusString(ev.status)
			s.log.Info("child exited", "child_pid", c.pid, "status", st)
			// A drain cut at the deadline (or by a second signal) is still a
			// clean stop, as for handoff serve; a child that failed on its
			// own is not.
			clean := ev.status.Exited() && ev.status.ExitStatus() == 0 ||
				ev.status.Signaled() && (ev.status.Signal() == s.opts.StopSignal || killed && ev.status.Signal() == syscall.SIGKILL)
			if c != starting && !clean {
				failed = append(failed, fmt.Sprintf("child %d: %s", c.pid, st))
			}
		case <-force:
			force, killed = nil, true // closed: once is enough
			s.killAll("forced stop: killing the child's process group")
		case <-deadline.C:
			killed = true
			s.killAll("child still running at the drain deadline: killing its process group")
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%w: %s", ErrChildFailed, strings.Join(failed, ", "))
	}
	return nil
}

// killAll kills every child's process group.
func (s *Supervisor) killAll(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for pid := range s.children {
		s.log.Warn(why, "child_pid", pid)
		s.reaper.signal(pid, syscall.SIGKILL, true)
	}
}

func exitError(c *child, ws syscall.WaitStatus) error {
	if c.timedOut {
		return &control.TimeoutError{PID: c.pid, Stderr: c.tail.Lines()}
	}
	code := -1
	if ws.Exited() {
		code = ws.ExitStatus()
	}
	return &control.ExitError{PID: c.pid, Status: statusString(ws), Code: code, Stderr: c.tail.Lines()}
}

func statusString(ws syscall.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exit status %d", ws.ExitStatus())
	case ws.Signaled():
		return "signal: " + ws.Signal().String()
	}
	return fmt.Sprintf("wait status %d", ws)
}
