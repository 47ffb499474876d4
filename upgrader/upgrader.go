package upgrader

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/handoff-dev/handoff/internal/pidfile"
	"github.com/handoff-dev/handoff/internal/sdnotify"
	"github.com/handoff-dev/handoff/internal/sockaddr"
	"github.com/handoff-dev/handoff/internal/tail"
)

// DefaultUpgradeTimeout is how long a new process has to become ready when
// Options.UpgradeTimeout is zero.
const DefaultUpgradeTimeout = time.Minute

// DefaultAbortTimeout is how long a new process that was given up on may take
// to stop when Options.AbortTimeout is zero.
const DefaultAbortTimeout = 30 * time.Second

// reportTimeout bounds the wait for a ready child's report; it was sent before
// the child signalled readiness, so it is normally there already.
const reportTimeout = 2 * time.Second

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

	abortC    chan struct{} // closed at Stop: a running attempt gives up
	finishing chan struct{} // closed when an attempt that outlived the run loop ended

	started   time.Time
	activated []activated            // from systemd, at first start, until claimed
	control   *net.UnixListener      // nil without Options.ControlPath
	phase     atomic.Value           // gate.Phase, stored by the run loop
	accepting chan struct{}          // closed when the control socket's Serve has returned
	listeners []control.ListenerInfo // for status; guarded by mu
	sd        sdnotify.Notifier

	mu           sync.Mutex
	readyBegun   bool     // Ready is under way: a parent's abort comes too late
	aborted      bool     // the parent gave up on this generation before Ready
	created      []string // Unix socket paths this generation bound itself
	handedTo     *Result
	last         *control.Outcome
	children     *childChannel // made at the first upgrade
	stderrPassed bool          // the real stderr is registered with tableflip
	sigC         chan os.Signal
}

type request struct {
	ctx     context.Context
	trigger gate.Trigger
	wait    bool // wait for a draining previous generation instead of failing
	reply   chan outcome
}

type outcome struct {
	res Result
	err error
}

// New starts this process's generation: it inherits the previous generation's
// listeners if there was one. Only one Upgrader may exist in a process.
func New(opts Options) (*Upgrader, error) {
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
		if err := pidfile.CheckDir(opts.PIDFile); err != nil {
			return nil, err
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
		started:    time.Now(),
		activated:  fromSystemd,
	}
	parent, h, err := claimParentChannel(tf)
	if err != nil {
		abandonTableflip(tf)
		return nil, err
	}
	if parent != nil {
		u.parent, u.generation = parent, h.Generation
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	u.log = logger.With("pid", os.Getpid(), "generation", u.generation)
	u.sd = sdnotify.Notifier{Log: u.log}
	u.phase.Store(gate.Starting)
	if u.parent != nil {
		if err := u.parent.sendStarted(); err != nil {
			u.log.Warn("cannot tell the previous generation this one started", "error", err)
		} else {
			go u.parent.watch(u.abandoned)
		}
	}
	if os.Getpid() == 1 {
		u.log.Warn("running as PID 1: after a handoff this process exits and the container ends with it; " +
			"run under an init (docker run --init, tini) or under `handoff run`")
	}
	for _, a := range u.activated {
		u.log.Info("socket from systemd", "name", a.name, "addr", a.ln.Addr().String())
	}
	if opts.ControlPath != "" {
		if u.control, err = u.listenControl(opts.ControlPath); err != nil {
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

// Listen returns the listener for network ("tcp", "tcp4", "tcp6" or "unix") and
// addr inherited from the previous generation, or creates one. The same network
// and addr strings must be used in every generation: they are the key.
func (u *Upgrader) Listen(network, addr string) (net.Listener, error) {
	ln, err := u.listen(network, addr)
	if err == nil {
		u.mu.Lock()
		u.listeners = append(u.listeners, control.ListenerInfo{Network: network, Addr: ln.Addr().String()})
		u.mu.Unlock()
	}
	return ln, err
}

func (u *Upgrader) listen(network, addr string) (net.Listener, error) {
	if ln, err := u.tf.Listener(network, addr); ln != nil || err != nil {
		return ln, err
	}
	if ln, err := u.claimActivated(network, addr); ln != nil || err != nil {
		return ln, err
	}
	if network == "unix" {
		sockaddr.RemoveStale(addr)
	}
	// tableflip formats the callback's error with %s; keep ours, so that
	// errors.Is(err, syscall.EADDRINUSE) works.
	var lerr error
	ln, err := u.tf.ListenWithCallback(network, addr, func(network, addr string) (net.Listener, error) {
		ln, err := new(net.ListenConfig).Listen(context.Background(), network, addr)
		lerr = err
		return ln, err
	})
	if lerr != nil {
		err = lerr
	}
	if err != nil {
		return nil, fmt.Errorf("listen on %s %s: %w", network, addr, err)
	}
	if network == "unix" {
		u.mu.Lock()
		u.created = append(u.created, addr)
		u.mu.Unlock()
	}
	return ln, nil
}

// listenControl opens the control socket (inherited after an upgrade), mode 0600.
func (u *Upgrader) listenControl(path string) (*net.UnixListener, error) {
	ln, err := u.listen("unix", path)
	if err != nil {
		return nil, err
	}
	return control.Chmod(ln.(*net.UnixListener), path)
}

// claimActivated returns the socket systemd passed for network and addr, and
// registers it to be handed on under that key.
func (u *Upgrader) claimActivated(network, addr string) (net.Listener, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, a := range u.activated {
		if !sameAddr(network, addr, a) {
			continue
		}
		u.activated = append(u.activated[:i], u.activated[i+1:]...)
		if err := u.tf.AddListener(network, addr, a.ln.(tableflip.Listener)); err != nil {
			a.ln.Close()
			return nil, fmt.Errorf("hand on socket from systemd: %w", err)
		}
		return a.ln, nil
	}
	return nil, nil
}

// ListenPacket is Listen for datagram sockets ("udp", "udp4", "udp6", "unixgram").
func (u *Upgrader) ListenPacket(network, addr string) (net.PacketConn, error) {
	var lerr error
	pc, err := u.tf.ListenPacketWithCallback(network, addr, func(network, addr string) (net.PacketConn, error) {
		pc, err := new(net.ListenConfig).ListenPacket(context.Background(), network, addr)
		lerr = err
		return pc, err
	})
	if lerr != nil {
		err = lerr
	}
	if err != nil {
		return nil, fmt.Errorf("listen on %s %s: %w", network, addr, err)
	}
	return pc, nil
}

// Ready says that the application has initialised and can serve. It writes the
// PID file, tells the previous generation, which then stops accepting and
// drains, and closes inherited descriptors that nobody claimed.
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
		if u.opts.PIDFile != "" {
			if err = pidfile.Write(u.opts.PIDFile, os.Getpid()); err != nil {
				return
			}
		}
		if err = restoreStderr(u.tf); err != nil {
			return
		}
		// The report goes first: the parent reads it once tableflip says ready.
		if err = u.parent.sendReport(report{PID: os.Getpid(), Version: u.opts.Version, Generation: u.generation}); err != nil {
			u.log.Warn("cannot report to previous generation", "error", err)
			err = nil
		}
		if err = u.tf.Ready(); err != nil {
			err = fmt.Errorf("signal ready: %w", err)
			return
		}
		close(u.readyC)
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
	})
	return err
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
		u.phase.Store(g.Phase())
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
		attempt = make(chan outcome, 1)
		go func(c chan outcome) { c <- u.attempt() }(attempt)
	}
	for {
		if g.Next() {
			u.log.Info("running queued upgrade")
			start()
		}
		u.phase.Store(g.Phase())
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
			case gate.Queue:
				if !d.Repeat {
					u.log.Info("upgrade queued", "reason", d.Reason)
				}
			case gate.Start:
				start()
			}
		case o := <-attempt:
			attempt = nil
			reply(g.Done(), o)
			if u.settle(o) {
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
				reply(waiting, o)
				// Unless the new process became ready at that very moment
				// (it then serves), this is a final stop.
				if !u.settle(o) {
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
			// The new process may have written it before it failed to signal ready.
			if err := pidfile.Write(u.opts.PIDFile, os.Getpid()); err != nil {
				u.log.Error("cannot rewrite pid file", "error", err)
			}
		}
		return false
	}
	u.mu.Lock()
	u.handedTo = &o.res
	u.mu.Unlock()
	u.log.Info("upgrade succeeded", "new_pid", o.res.PID, "new_version", o.res.Version,
		"new_generation", o.res.Generation, "duration", o.res.Duration)
	return true
}

// attempt runs one upgrade; it is the only caller of tableflip's Upgrade.
func (u *Upgrader) attempt() (o outcome) {
	started := time.Now()
	u.sd.Reloading()
	defer func() {
		out := control.NewOutcome(control.Result(o.res), o.err)
		u.mu.Lock()
		u.last = &out
		u.mu.Unlock()
		if o.err != nil {
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
	if err := ch.prepare(hello{Generation: u.generation + 1}); err != nil {
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
	if err != nil {
		return outcome{err: withStderr(err, lines)}
	}
	res := Result{Generation: u.generation + 1, Duration: time.Since(started)}
	if r, err := ch.readReport(reportTimeout); err != nil {
		u.log.Warn("new generation is ready but sent no report", "error", err)
	} else {
		res.PID, res.Version = r.PID, r.Version
	}
	return outcome{res: res}
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
	go func() { res <- u.tableflipUpgrade() }()
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
			return gaveUp(err, why, pid)
		case <-time.After(u.opts.AbortTimeout):
			u.log.Warn("the new process did not stop in time: killing it", "new_pid", pid)
		}
	}
	killHolders(link, unix.SIGKILL)
	return gaveUp(<-res, why, pid)
}

// gaveUp is the outcome of an attempt given up on for why: err is tableflip's
// answer once the new process (pid, if known) ended.
func gaveUp(err, why error, pid int) error {
	if err == nil {
		return nil // it became ready at the last moment, and serves
	}
	var exit *ExitError
	if errors.As(err, &exit) {
		pid = exit.PID
	}
	if why == ErrTimeout {
		return &TimeoutError{PID: pid}
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
	if !u.stderrPassed {
		if err := u.tf.AddFile(stderrName, os.Stderr); err != nil {
			return nil, fmt.Errorf("pass stderr: %w", err)
		}
		u.stderrPassed = true
	}
	return captureStderr()
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
	out, err := cmd.CombinedOutput()
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

func (u *Upgrader) closeActivated() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, a := range u.activated {
		u.log.Warn("socket from systemd not used by any listener: closing it", "name", a.name, "addr", a.ln.Addr().String())
		a.ln.Close()
	}
	u.activated = nil
}

// status describes this generation now, for the control socket.
func (u *Upgrader) status() control.Status {
	st := control.Status{PID: os.Getpid(), Generation: u.generation, Version: u.opts.Version,
		Started: u.started.UTC(), Phase: u.phase.Load().(gate.Phase)}
	if u.opts.InFlight != nil {
		st.InFlight = u.opts.InFlight()
	}
	u.mu.Lock()
	st.Listeners = append([]control.ListenerInfo(nil), u.listeners...)
	st.LastUpgrade = u.last
	handed := u.handedTo != nil
	u.mu.Unlock()
	switch {
	case handed:
		st.Phase = gate.HandedOff
	case isClosed(u.stopC):
		st.Phase = gate.Stopping
	case st.Phase == gate.DrainingPrevious:
		st.PreviousPID = os.Getppid()
	}
	return st
}

// controller drives this generation from the control socket.
type controller struct{ u *Upgrader }

func (c controller) Status() control.Status { return c.u.status() }

func (c controller) Upgrade(ctx context.Context, wait bool) (control.Result, error) {
	res, err := c.u.request(ctx, gate.API, wait)
	return control.Result(res), err
}

func isClosed(c chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (u *Upgrader) childChannel() (*childChannel, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.children == nil {
		ch, err := newChildChannel(u.tf)
		if err != nil {
			return nil, err
		}
		u.children = ch
	}
	return u.children, nil
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
// the second close Forced. It returns at once; Close undoes it.
func (u *Upgrader) HandleSignals() {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.sigC != nil {
		return
	}
	u.sigC = make(chan os.Signal, 16)
	signal.Notify(u.sigC, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	go func(c chan os.Signal) {
		stops := 0
		for sig := range c {
			switch sig {
			case syscall.SIGHUP:
				go u.signalUpgrade()
			default:
				stops++
				u.log.Info("stop requested", "signal", sig.String(), "count", stops)
				if stops == 1 {
					u.Stop()
				} else {
					u.forceOnce.Do(func() { close(u.forcedC) })
				}
			}
		}
	}(u.sigC)
}

func (u *Upgrader) signalUpgrade() {
	// Queued requests are answered when the loop ends, so this never outlives it.
	_, _ = u.request(context.Background(), gate.Signal, true)
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
// Call it last, after the drain.
func (u *Upgrader) Close() error {
	var err error
	u.closeOnce.Do(func() {
		u.mu.Lock()
		if u.sigC != nil {
			signal.Stop(u.sigC)
			close(u.sigC)
		}
		u.mu.Unlock()
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
		u.children.Close()
		handed := u.handedTo != nil
		u.mu.Unlock()
		if u.opts.PIDFile != "" && !handed {
			err = pidfile.Remove(u.opts.PIDFile, os.Getpid())
		}
		u.log.Info("exiting")
	})
	return err
}
