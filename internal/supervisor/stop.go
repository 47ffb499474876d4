package supervisor

import (
	"fmt"
	"maps"
	"strings"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
)

// ofInstance names c's instance in err when there is more than one.
func (s *Supervisor) ofInstance(c *child, err error) error {
	if s.opts.Instances == 1 {
		return err
	}
	return fmt.Errorf("instance %d: %w", c.instance, err)
}

func rangeN(n int) func(func(int) bool) {
	return func(yield func(int) bool) {
		for i := range n {
			if !yield(i) {
				return
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

func (s *Supervisor) scheduleRestart(instance int, restarts map[int]int) *time.Timer {
	delay := DefaultRestartDelay << min(restarts[instance], 10)
	delay = min(delay, DefaultMaxRestartDelay)
	restarts[instance]++
	s.log.Info("restart scheduled", "instance", instance, "in", delay, "attempt", restarts[instance])
	return time.AfterFunc(delay, func() { s.send(event{kind: evRestart, instance: instance}) })
}

// observe tells Options.OnUpgrade.
func (s *Supervisor) observe(o outcome) {
	if s.opts.OnUpgrade != nil {
		s.opts.OnUpgrade(o.res, o.err)
	}
}

// stopAll stops every child gracefully and waits for them; what it did
// answers Stop.
func (s *Supervisor) stopAll(cs set, refused []request) (err error) {
	began := time.Now()
	sum := control.Drain{Children: s.tracked()}
	defer func() {
		sum.DurationMS = float64(time.Since(began).Microseconds()) / 1000
		if err != nil {
			sum.Error = err.Error()
		}
		s.stopSum = sum
		close(s.stopped)
	}()
	for _, r := range refused {
		r.reply <- outcome{err: gate.ErrStopping}
	}
	s.sd.Stopping()
	// Every child may have accepted connections, a starting one too: each gets
	// its stop signal and drains.
	starting := maps.Clone(cs.starting)
	for _, m := range []map[int]*child{cs.serving, cs.starting} {
		for _, c := range m {
			s.log.Info("stopping child", "child_pid", c.pid, "instance", c.instance, "signal", s.opts.StopSignal.String())
			s.reaper.signal(c.pid, s.opts.StopSignal, false)
		}
	}
	// Nothing accepts for us any more: our copies of the sockets go, so that
	// once the children have closed theirs, a new connection is refused at
	// once rather than queued where no one will accept it.
	s.closeListeners()
	// Draining children have had their stop signal: a second one would make
	// some (Python, at exit) die by it. This stop's deadline covers them.
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
			if starting[c.pid] == nil && !clean {
				failed = append(failed, fmt.Sprintf("child %d: %s", c.pid, st))
			}
		case <-force:
			force, killed = nil, true // closed: once is enough
			sum.Killed += s.killAll("forced stop: killing the child's process group")
		case <-deadline.C:
			killed = true
			sum.Killed += s.killAll("child still running at the drain deadline: killing its process group")
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%w: %s", ErrChildFailed, strings.Join(failed, ", "))
	}
	return nil
}

// closeListeners closes the listening sockets (Options.Listeners).
func (s *Supervisor) closeListeners() {
	for _, l := range s.opts.Listeners {
		l.File.Close()
	}
}

// killAll kills every child's process group; it returns how many.
func (s *Supervisor) killAll(why string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for pid := range s.children {
		s.log.Warn(why, "child_pid", pid)
		s.reaper.signal(pid, syscall.SIGKILL, true)
	}
	return len(s.children)
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
