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
// process group. A new child that exits before it is ready is reported and the
// old one keeps serving; one not ready within the ready timeout may have
// accepted connections, so it is stopped the same graceful way. Upgrade
// requests go through internal/gate, as package upgrader's do: at most one
// child starting, at most one draining, the old one told to leave only after
// the new one is ready, SIGHUPs during an upgrade coalesced, one during a drain
// queued. A child that dies while serving is restarted with backoff, and at
// once if an upgrade that was running meanwhile fails: handoff run never stays
// without a serving child. Children get their stop signal if the supervisor
// dies (PR_SET_PDEATHSIG). The supervisor reaps every process, orphans
// included, so it can be PID 1.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"strconv"
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
	File    *os.File // the listening socket; Run puts it in non-blocking mode
	Network string   // for Status: "tcp" or "unix"
	Addr    string   // for Status: the bound address
}

// Options configure a Supervisor.
type Options struct {
	// Command is the program and its arguments. Required.
	Command []string
	// Listeners are passed from fd 3 on, in this order. Run puts them in
	// non-blocking mode, and closes them when it stops.
	Listeners []Listener
	// Shim is the argv prefix that execs Command with LISTEN_PID set, normally
	// {"/proc/self/exe", ShimCommand}. Required.
	Shim []string
	// Instances is how many children serve at once, on the same sockets (each
	// with its instance number in HANDOFF_INSTANCE). Zero means 1.
	Instances int
	// MaxSurge bounds the extra children during an upgrade: instances are
	// replaced this many at a time, the next ones once the replaced children
	// have exited. Zero means all at once (the new set is ready before any old
	// child is told to stop).
	MaxSurge int
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
	// OnUpgrade, if set, is called with the outcome of every upgrade and of
	// every refused request, from the owner goroutine: it must not block.
	OnUpgrade func(control.Result, error)
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

	spawned int // children started, for unique notify socket names

	listenerLinks map[string]bool // "socket:[inode]" of each listener, as /proc shows it

	stopC    chan struct{} // closed by Stop: a stop as if ctx ended
	stopOnce sync.Once
	stopped  chan struct{} // closed when the children are stopped; stopSum says how
	stopSum  control.Drain

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
	if opts.Instances <= 0 {
		opts.Instances = 1
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
		stopC:    make(chan struct{}),
		stopped:  make(chan struct{}),
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
		cst := control.ChildStatus{PID: c.pid, Instance: c.instance, Generation: c.generation, Phase: c.phase,
			Since: c.since.UTC(), Started: c.started.UTC(), Restarts: c.restarts}
		if !c.readyAt.IsZero() {
			cst.Ready = c.readyAt.UTC()
		}
		st.Children = append(st.Children, cst)
	}
	slices.SortFunc(st.Children, func(a, b control.ChildStatus) int {
		if a.Instance != b.Instance {
			return a.Instance - b.Instance
		}
		return a.Started.Compare(b.Started)
	})
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
	if err := nonblock(s.opts.Listeners); err != nil {
		return err
	}
	s.listenerLinks = map[string]bool{}
	for _, l := range s.opts.Listeners {
		if fd, err := rawFd(l.File); err == nil {
			if link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(fd))); err == nil {
				s.listenerLinks[link] = true
			}
		}
	}
	dir, lock, err := makeNotifyDir(os.TempDir())
	if err != nil {
		return fmt.Errorf("create notify directory: %w", err)
	}
	defer lock.Close() // after the removal: a sweeper must not take it first
	defer os.RemoveAll(dir)
	s.dir = dir
	s.reaper = newReaper(func(pid int) { s.log.Debug("reaped orphan", "orphan_pid", pid) })
	defer s.reaper.stop()
	defer close(s.quit)
	return s.loop(ctx)
}
