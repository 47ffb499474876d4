package upgrader

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/moved"
	"github.com/handoff-dev/handoff/internal/pidfile"
	"github.com/handoff-dev/handoff/internal/sdnotify"
)

// DefaultUpgradeTimeout is how long a new process has to become ready when
// Options.UpgradeTimeout is zero.
const DefaultUpgradeTimeout = time.Minute

// DefaultAbortTimeout is how long a new process that was given up on may take
// to stop when Options.AbortTimeout is zero.
const DefaultAbortTimeout = 30 * time.Second

// Options configure an Upgrader. The zero value works: no PID file, the default
// upgrade timeout, no logs.
type Options struct {
	// PIDFile, if set, is written atomically with the ready generation's PID and
	// removed by a final stop. A relative path is taken against the starting
	// directory. New fails with ErrPIDFile if its directory is not writable.
	PIDFile string
	// UpgradeTimeout is how long a new process has to call Ready before it is
	// given up on and the upgrade fails with ErrTimeout. Zero means
	// DefaultUpgradeTimeout.
	UpgradeTimeout time.Duration
	// AbortTimeout is how long a new process that was given up on (not ready
	// within UpgradeTimeout, or a Stop during the upgrade) may take to stop: it
	// is told to, and may have accepted connections, which it drains like any
	// stopping generation. Then it is killed. A new process not built on this
	// package cannot be told, and is killed at once. Zero means
	// DefaultAbortTimeout.
	AbortTimeout time.Duration
	// Version is this binary's version, reported to the previous generation and
	// logged. Empty means "dev".
	Version string
	// Logger receives a line for every step of the lifecycle, with the keys "pid"
	// and "generation". Nil means no logs.
	Logger *slog.Logger
	// ControlPath, if set, is the path of a Unix socket (mode 0600, same user or
	// root only) that answers status and upgrade requests (see Ask). It survives
	// upgrades: the ready generation answers. Empty means no control socket.
	ControlPath string
	// Preflight, if set, are the arguments with which the new binary is run, and
	// must exit 0, before it is started to serve (like nginx -t). Nil means none.
	Preflight []string
	// InFlight, if set, reports the requests being served, for Status.
	InFlight func() int64
	// OnUpgrade, if set, is called with the outcome of every upgrade this
	// generation attempts and of every request it refuses (ErrUpgradeInProgress,
	// ErrParentDraining...), from the owner goroutine: it must not block.
	OnUpgrade func(Result, error)
	// StopAccepting, if set, is called once a new generation has said it is
	// ready, before anything else (Done is closed once its report has come,
	// normally within a millisecond, 2 s at most): it should
	// close this generation's listeners, so that the new one takes every
	// connection from then on, and must not block. server.Server's
	// StopAccepting does this; the drain starts after Done as before.
	StopAccepting func()
	// Handover, if set, is called when an upgrade starts; what it returns (at
	// most MaxHandover bytes) reaches the new generation, as Inherited: counters
	// that describe the service, say.
	Handover func() []byte
	// OnPreviousDrained, if set, is called in a new generation when its previous
	// generation reports, with Drained, what its drain did.
	OnPreviousDrained func(DrainReport)
	// HandleSignals, if set, does what the method of that name does, from the
	// start of New: the setup of the handlers is then off the critical path of
	// an upgrade, and a SIGTERM that arrives while the generation starts is
	// handled rather than killing it. The generations this one starts then
	// catch the signals from this package's init on (see EarlySignals), and
	// New acts on those that came before it.
	HandleSignals bool
	// MoveGCPercent, if above the garbage collector's percent (GOGC), raises
	// it to that (runtime/debug.SetGCPercent) while idle connections move:
	// in a new generation from the first connection that moves in (see Moved)
	// until its previous generation reports its drain or exits; in a draining
	// generation from its first move out (see Mover) to Close. Zero leaves
	// the collector alone, as does GOGC=off or a higher percent.
	//
	// A moved connection's memory (parked: its descriptor and a little
	// state; once its client sends, net/http's goroutine and buffers too)
	// stays live in the new generation as long as the connection: as
	// thousands arrive, the heap doubles again and again, and each doubling
	// starts a collection that finds little garbage but whose pauses and mark
	// work delay requests (their p99, on a loaded machine): with 100, a
	// generation taking 1000 connections a second into net/http collected at
	// 0.24, 0.46, 0.89 and 1.7 s (measured before they waited parked). In
	// the old generation what they leave is garbage of a process about to
	// exit. The percent applies to every allocation meanwhile: the heap may
	// grow to (1+MoveGCPercent/100) times what is live, so set GOMEMLIMIT
	// where memory is tight. The percent is put back to what it was when the
	// moves began: a program that sets it itself meanwhile loses its setting.
	MoveGCPercent int
}

// Result describes the generation that took over after a successful upgrade.
type Result struct {
	PID        int
	Version    string
	Generation int
	Duration   time.Duration // from the start of the upgrade to the new generation's Ready
}

// Upgrader runs one generation's lifecycle. Create it with New, once per process.
type Upgrader struct {
	tf         *tableflip.Upgrader
	opts       Options
	log        *slog.Logger
	binary     string
	generation int
	parent     *parentChannel

	requests chan request
	parentC  chan struct{} // closed when the previous generation has exited
	readyC   chan struct{} // closed by Ready
	stopC    chan struct{} // closed by Stop
	forcedC  chan struct{} // closed by a second SIGTERM/SIGINT
	doneC    chan struct{} // closed when the run loop has ended: handed off or stopped

	readyOnce, stopOnce, forceOnce, closeOnce sync.Once
	handover                                  sync.Mutex // held by Ready from its last check for a stop to tableflip's Ready, and by a signal's Stop

	abortC    chan struct{} // closed at Stop: a running attempt gives up
	drainedC  chan struct{} // closed by Drained
	closingC  chan struct{} // closed by Close: nobody waits for Drained any more
	drained   DrainReport
	inherited []byte
	finishing chan struct{} // closed when an attempt that outlived the run loop ended

	started   time.Time
	activated []activated            // from systemd, at first start, until claimed
	control   *net.UnixListener      // nil without Options.ControlPath
	upgrading atomic.Bool            // an attempt runs (for status, which reads it at once)
	accepting chan struct{}          // closed when the control socket's Serve has returned
	listeners []control.ListenerInfo // for status; guarded by mu
	sd        sdnotify.Notifier

	mu             sync.Mutex
	readyBegun     bool     // Ready is under way: a parent's abort comes too late
	aborted        bool     // the parent gave up on this generation before Ready
	created        []string // Unix socket paths this generation bound itself
	handedTo       *Result
	last           *control.Outcome
	children       *childChannel // made at the first upgrade
	moves          *movesOut     // made at the first upgrade
	successorMoves bool          // the generation that took over takes moved connections
	moved          *moved.Listener
	stderrPassed   bool       // the real stderr is registered with tableflip
	lastTee        *stderrTee // the successful attempt\'s, until its copy is done
	sigC           chan os.Signal
	sigSet         chan struct{}         // closed once sigC is notified
	stops          int                   // SIGTERMs and SIGINTs so far; only the goroutine that reads sigC touches it
	pidPrep        chan *pidfile.Pending // a new generation's PID file, written ahead; taken by takePIDPrep
}

// New starts this process's generation: it inherits the previous generation's
// listeners if there was one. Only one Upgrader may exist in a process.
func New(opts Options) (_ *Upgrader, err error) {
	var (
		pidPrep chan *pidfile.Pending
		sigC    chan os.Signal
		sigSet  chan struct{}
	)
	if sigC, sigSet = takeEarlySignals(opts.HandleSignals); sigC == nil && opts.HandleSignals {
		sigC, sigSet = notifySignals()
	}
	if sigC != nil {
		defer func() {
			if err != nil {
				stopSignals(sigC, sigSet)
			}
		}()
	}
	if opts.UpgradeTimeout <= 0 {
		opts.UpgradeTimeout = DefaultUpgradeTimeout
	}
	if opts.AbortTimeout <= 0 {
		opts.AbortTimeout = DefaultAbortTimeout
	}
	if opts.Version == "" {
		opts.Version = "dev"
	}
	wd, err := os.Getwd()
	if err != nil {
		return nil, fmt.Errorf("get working directory: %w", err)
	}
	binary, err := resolveBinary(os.Args[0], wd)
	if err != nil {
		return nil, err
	}
	if opts.PIDFile != "" {
		if !filepath.IsAbs(opts.PIDFile) {
			opts.PIDFile = filepath.Join(wd, opts.PIDFile)
		}
		// Checked at first start. A new generation (tableflip's marker is
		// set) writes its file meanwhile, to rename it into place at Ready:
		// off the critical path of the upgrade.
		if os.Getenv(tableflipEnv) == "" {
			if err := pidfile.CheckDir(opts.PIDFile); err != nil {
				return nil, err
			}
			if pid := pidfile.Running(opts.PIDFile); pid != 0 {
				return nil, fmt.Errorf("%w %s: it names pid %d, which is running: another server was started with it",
					ErrPIDFile, opts.PIDFile, pid)
			}
			pidfile.Sweep(opts.PIDFile)
		} else {
			pidPrep = make(chan *pidfile.Pending, 1)
			go func(path string) { pidPrep <- pidfile.Prepare(path, os.Getpid()) }(opts.PIDFile)
			defer func() {
				if err != nil { // New failed: this generation never writes its PID file
					(<-pidPrep).Discard()
				}
			}()
		}
	}

	// tableflip execs os.Args[0]; make it the path resolved now.
	os.Args[0] = binary
	// Our own timer gives a new process up at UpgradeTimeout (see waitReady);
	// tableflip's, later, is only the backstop for one that cannot be found.
	tf, err := tableflip.New(tableflip.Options{UpgradeTimeout: opts.UpgradeTimeout + opts.AbortTimeout + backstop})
	if err != nil {
		return nil, fmt.Errorf("start upgrader: %w", err)
	}
	scrubInherited(tf)
	var fromSystemd []activated
	if !tf.HasParent() {
		if fromSystemd, err = takeActivated(); err != nil {
			abandonTableflip(tf)
			return nil, err
		}
	}

	u := &Upgrader{
		sigC:       sigC,
		sigSet:     sigSet,
		pidPrep:    pidPrep,
		tf:         tf,
		opts:       opts,
		binary:     binary,
		generation: 1,
		requests:   make(chan request),
		parentC:    make(chan struct{}),
		readyC:     make(chan struct{}),
		stopC:      make(chan struct{}),
		forcedC:    make(chan struct{}),
		doneC:      make(chan struct{}),
		abortC:     make(chan struct{}),
		drainedC:   make(chan struct{}),
		closingC:   make(chan struct{}),
		started:    time.Now(),
		activated:  fromSystemd,
	}
	parent, h, err := claimParentChannel(tf)
	if err != nil {
		abandonTableflip(tf)
		return nil, err
	}
	if parent != nil {
		u.parent, u.generation, u.inherited = parent, h.Generation, h.Handover
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	u.log = logger.With("pid", os.Getpid(), "generation", u.generation)
	u.sd = sdnotify.Notifier{Log: u.log}
	if u.moved, err = u.claimMoves(); err != nil {
		u.log.Warn("cannot take moved connections", "error", err)
	}
	if u.parent != nil {
		go u.parent.open(u.log, u.abandoned) // off the critical path: it only matters if this one is given up on
	}
	if os.Getpid() == 1 {
		u.log.Warn("running as PID 1: after a handoff this process exits and the container ends with it; " +
			"run under an init (docker run --init, tini) or under `handoff run`")
	}
	for _, a := range u.activated {
		u.log.Info("socket from systemd", "name", a.name, "addr", a.addr().String())
	}
	if opts.ControlPath != "" {
		if u.control, err = u.listenControl(opts.ControlPath); err != nil {
			u.parent.close() // ends open's watch
			if u.moved != nil {
				u.moved.Close()
			}
			abandonTableflip(tf)
			return nil, fmt.Errorf("%w %s: %w", ErrControlSocket, opts.ControlPath, err)
		}
		u.accepting = make(chan struct{})
	}

	if tf.HasParent() {
		u.log.Info("started by previous generation", "parent_pid", os.Getppid(), "binary", binary)
		go func() {
			err := tf.WaitForParent(context.Background())
			if err != nil {
				u.log.Warn("previous generation exited uncleanly", "error", err)
			} else {
				u.log.Info("previous generation exited")
			}
			close(u.parentC)
		}()
	} else {
		close(u.parentC)
	}
	go u.run()
	if sigC != nil {
		u.takePending(sigC)
		go u.handleSignals(sigC)
	}
	return u, nil
}

// abandonTableflip ends tableflip when New fails. A new generation that fails
// there must not let tableflip stop: it would unlink the Unix socket paths the
// previous generation serves on (see stopTableflip).
func abandonTableflip(tf *tableflip.Upgrader) {
	if !tf.HasParent() {
		tf.Stop()
	}
}

// Generation is 1 for the first process and one more for each upgrade since.
func (u *Upgrader) Generation() int { return u.generation }

// Binary is the absolute path that an upgrade execs.
func (u *Upgrader) Binary() string { return u.binary }

// HasParent reports whether this generation was started by an upgrade.
func (u *Upgrader) HasParent() bool { return u.tf.HasParent() }

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}
