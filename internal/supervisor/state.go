package supervisor

import (
	"context"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
)

func (s *Supervisor) send(ev event) {
	select {
	case s.events <- ev:
	case <-s.quit:
	}
}

func (s *Supervisor) setChildPhase(c *child, phase control.ChildPhase) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.phase, c.since = phase, time.Now()
}

func (s *Supervisor) track(c *child) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.children[c.pid] = c
}

func (s *Supervisor) untrack(pid int) *child {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.children[pid]
	delete(s.children, pid)
	return c
}

func (s *Supervisor) tracked() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.children)
}

func (s *Supervisor) setStatus(phase gate.Phase, generation int, cs set) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.status.Phase, s.status.PreviousPID, s.status.Generation = phase, 0, generation
	for _, c := range cs.draining {
		if s.status.PreviousPID == 0 || c.pid < s.status.PreviousPID {
			s.status.PreviousPID = c.pid
		}
	}
}

// setReady records that c serves.
func (s *Supervisor) setReady(c *child) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.phase, c.readyAt = control.ChildServing, time.Now()
	c.since = c.readyAt
}

func (s *Supervisor) setLast(o outcome) {
	res := control.NewOutcome(o.res, o.err)
	s.mu.Lock()
	s.status.LastUpgrade = &res
	s.mu.Unlock()
}

// Stop stops every child gracefully, as the end of Run's context does, and
// blocks until they have exited (or ctx ends); it returns what the stop did.
func (s *Supervisor) Stop(ctx context.Context) (control.Drain, error) {
	s.stopOnce.Do(func() { close(s.stopC) })
	select {
	case <-s.stopped:
		return s.stopSum, nil
	case <-ctx.Done():
		return control.Drain{}, context.Cause(ctx)
	}
}

// Force makes a stop in progress kill the children at once instead of waiting
// for them to drain (handoff run's answer to a second SIGTERM).
func (s *Supervisor) Force() {
	s.forceOnce.Do(func() { close(s.forceC) })
}

// Signal forwards sig to the serving child (handoff run forwards SIGUSR1,
// SIGUSR2 and SIGWINCH this way).
func (s *Supervisor) Signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.children {
		if c.phase == control.ChildServing {
			s.reaper.signal(c.pid, sig, false)
		}
	}
}

// killGroup kills what is left of an exited child's process group (the group
// outlives its leader while members remain, so the id is not reused meanwhile).
func killGroup(pid int) {
	if pid > 1 {
		syscall.Kill(-pid, syscall.SIGKILL)
	}
}
