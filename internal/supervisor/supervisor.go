// Package supervisor gives zero-downtime restarts to servers that are not written
// in Go, or not with package upgrader: `handoff run -- CMD`.
//
// The supervisor holds the listening sockets for the whole of its life and
// starts CMD with them after the systemd socket-activation convention
// (descriptors from 3, LISTEN_FDS, LISTEN_FDNAMES, and LISTEN_PID equal to the
// child's own PID, set by a tiny exec shim since os/exec cannot). A child says it
// is ready by sd_notify("READY=1") on the NOTIFY_SOCKET the supervisor gives it,
// or, where a runtime cannot send datagrams (Node.js), by writing "READY=1\n" to
// the descriptor named by HANDOFF_READY_FD; Options.ReadyDelay is the weaker
// fallback for programs that can do neither.
//
// An upgrade starts a new child on the same sockets; once it is ready, the old
// child gets its stop signal and, after the drain timeout, SIGKILL to its whole
// process group. A new child that exits or hangs before it is ready is killed
// and the old one keeps serving. The invariants of package upgrader hold: at most
// one child starting, at most one draining, the old one told to leave only after
// the new one is ready, SIGHUPs during an upgrade coalesced, one during a drain
// queued. A child that dies while serving is restarted with backoff. The
// supervisor reaps every process, orphans included, so it can be PID 1.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/handoff-dev/handoff/internal/sdnotify"
)

// Defaults for the zero values of Options.
const (
	DefaultReadyTimeout    = time.Minute
	DefaultDrainTimeout    = 30 * time.Second
	DefaultRestartDelay    = 100 * time.Millisecond
	DefaultMaxRestartDelay = 10 * time.Second
)

// ShimCommand is the hidden subcommand of the handoff binary that sets
// LISTEN_PID to its own PID and execs the rest of its arguments (see Shim).
const ShimCommand = "__listen-exec"

// Listener is a socket handed to every child.
type Listener struct {
	Name    string   // LISTEN_FDNAMES entry
	File    *os.File // the listening socket
	Network string   // for Status: "tcp" or "unix"
	Addr    string   // for Status: the bound address
}

// Options configure a Supervisor.
type Options struct {
	// Command is the program and its arguments. Required.
	Command []string
	// Listeners are passed from fd 3 on, in this order.
	Listeners []Listener
	// Shim is the argv prefix that execs Command with LISTEN_PID set, normally
	// {"/proc/self/exe", ShimCommand}. Required.
	Shim []string
	// ReadyTimeout is how long a child has to become ready. Zero means
	// DefaultReadyTimeout.
	ReadyTimeout time.Duration
	// ReadyDelay, if set, counts a child as ready once it has run this long
	// without saying so: a weaker guarantee, for programs that cannot notify.
	ReadyDelay time.Duration
	// DrainTimeout is how long an old child may take to exit after its stop
	// signal before its process group is killed. Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration
	// StopSignal is sent to a child to make it drain and exit. Zero means SIGTERM.
	StopSignal syscall.Signal
	// Stdout and Stderr receive the children's output, each line prefixed with
	// "[pid N] ". Nil means os.Stdout and os.Stderr.
	Stdout, Stderr io.Writer
	// Logger receives the supervisor's own lines (child PIDs under "child_pid").
	// Nil means none.
	Logger *slog.Logger
	// Version is reported by Status. Empty means "dev".
	Version string
}

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

type request struct {
	trigger gate.Trigger
	wait    bool
	reply   chan outcome
}

type outcome struct {
	res control.Result
	err error
}

// Supervisor runs and upgrades one program. Create it with New and call Run.
type Supervisor struct {
	opts   Options
	log    *slog.Logger
	dir    string // notify sockets live here
	reaper *reaper

	events    chan event
	requests  chan request
	quit      chan struct{} // closed when Run returns
	forceC    chan struct{} // closed by Force
	forceOnce sync.Once

	sd sdnotify.Notifier

	mu       sync.Mutex
	status   control.Status
	children map[int]*child
}

// New checks opts; Run starts the program.
func New(opts Options) (*Supervisor, error) {
	if len(opts.Command) == 0 {
		return nil, errors.New("supervisor: no command")
	}
	if len(opts.Shim) == 0 {
		return nil, errors.New("supervisor: no shim")
	}
	if opts.ReadyTimeout <= 0 {
		opts.ReadyTimeout = DefaultReadyTimeout
	}
	if opts.DrainTimeout <= 0 {
		opts.DrainTimeout = DefaultDrainTimeout
	}
	if opts.StopSignal == 0 {
		opts.StopSignal = syscall.SIGTERM
	}
	if opts.Stdout == nil {
		opts.Stdout = os.Stdout
	}
	if opts.Stderr == nil {
		opts.Stderr = os.Stderr
	}
	if opts.Version == "" {
		opts.Version = "dev"
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Supervisor{
		opts:     opts,
		log:      log,
		sd:       sdnotify.Notifier{Log: log},
		events:   make(chan event),
		requests: make(chan request),
		quit:     make(chan struct{}),
		forceC:   make(chan struct{}),
		children: make(map[int]*child),
		status: control.Status{PID: os.Getpid(), Version: opts.Version, Started: time.Now().UTC(),
			Phase: gate.Starting, Listeners: listenerInfo(opts.Listeners)},
	}, nil
}

func listenerInfo(ls []Listener) []control.ListenerInfo {
	var out []control.ListenerInfo
	for _, l := range ls {
		out = append(out, control.ListenerInfo{Network: l.Network, Addr: l.Addr})
	}
	return out
}

func (s *Supervisor) send(ev event) {
	select {
	case s.events <- ev:
	case <-s.quit:
	}
}

// Upgrade starts a new child and blocks until it is ready (the old one is then
// told to stop), exits, or times out; ctx bounds only the wait. It fails at
// once with gate.ErrUpgradeInProgress while another child is starting; while an
// old child still drains or no child serves, it waits when wait is set and
// fails (gate.ErrParentDraining, gate.ErrNotReady) otherwise.
func (s *Supervisor) Upgrade(ctx context.Context, wait bool) (control.Result, error) {
	return s.request(ctx, gate.API, wait)
}

// SignalUpgrade is what SIGHUP does: an upgrade, ignored while one runs, queued
// while an old child drains. It does not wait.
func (s *Supervisor) SignalUpgrade() {
	go s.request(context.Background(), gate.Signal, true)
}

func (s *Supervisor) request(ctx context.Context, trigger gate.Trigger, wait bool) (control.Result, error) {
	req := request{trigger: trigger, wait: wait, reply: make(chan outcome, 1)}
	select {
	case s.requests <- req:
	case <-s.quit:
		return control.Result{}, gate.ErrStopping
	case <-ctx.Done():
		return control.Result{}, context.Cause(ctx)
	}
	select {
	case o := <-req.reply:
		return o.res, o.err
	case <-s.quit:
		return control.Result{}, gate.ErrStopping
	case <-ctx.Done():
		return control.Result{}, context.Cause(ctx)
	}
}

// Status describes the supervisor and its children.
func (s *Supervisor) Status() control.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status
	st.Children = nil
	for _, c := range s.children {
		st.Children = append(st.Children, control.ChildStatus{PID: c.pid, Phase: c.phase, Started: c.started.UTC()})
	}
	slices.SortFunc(st.Children, func(a, b control.ChildStatus) int { return a.Started.Compare(b.Started) })
	return st
}

// ErrChildFailed is returned by Run when the program cannot be started at all,
// or when it could not be stopped cleanly.
var ErrChildFailed = errors.New("child failed")

// Run starts the program, waits for it to be ready, and supervises it until ctx
// ends; it then stops every child gracefully (the stop signal, SIGKILL after the
// drain timeout) and returns. It returns an error wrapping ErrChildFailed if the
// first child never became ready, or if a child had to be killed or exited with
// an error at the stop.
func (s *Supervisor) Run(ctx context.Context) error {
	dir, err := os.MkdirTemp("", "handoff-run-")
	if err != nil {
		return fmt.Errorf("create notify directory: %w", err)
	}
	defer os.RemoveAll(dir)
	s.dir = dir
	s.reaper = newReaper(func(pid int) { s.log.Debug("reaped orphan", "orphan_pid", pid) })
	defer s.reaper.stop()
	defer close(s.quit)
	return s.loop(ctx)
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

func (s *Supervisor) setChildPhase(c *child, phase control.ChildPhase) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c.phase = phase
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

func (s *Supervisor) setPhase(phase gate.Phase, current, draining *child) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.status.Phase, s.status.PreviousPID = phase, 0
	if draining != nil {
		s.status.PreviousPID = draining.pid
	}
	if current != nil {
		s.status.Generation = current.generation
	}
}

func (s *Supervisor) setLast(o outcome) {
	res := control.NewOutcome(o.res, o.err)
	s.mu.Lock()
	s.status.LastUpgrade = &res
	s.mu.Unlock()
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
