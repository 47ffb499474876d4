// run.go holds handoff run, which supervises any server on sockets handoff holds.
package main

import (
	"context"
	"flag"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/pidfile"
	"github.com/handoff-dev/handoff/internal/sockaddr"
	"github.com/handoff-dev/handoff/internal/supervisor"
	"github.com/handoff-dev/handoff/upgrader"
)

// runCmd is handoff run: supervise a program that is not written with package
// upgrader.
func runCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var listen listFlag
	fs.Var(&listen, "listen", "[NAME=]ADDR to listen on, host:port or unix:/path; repeatable; passed from fd 3 (default 127.0.0.1:8080)")
	pidFile := fs.String("pidfile", "", "write handoff's own PID here (it stays the same across upgrades)")
	controlPath := fs.String("control", "", "control socket for handoff upgrade and status (default: the PID file's path + .sock)")
	readyTimeout := fs.Duration("ready-timeout", upgrader.DefaultUpgradeTimeout, "how long a new child has to become ready")
	readyDelay := fs.Duration("ready-delay", 0, "count a child as ready after this long if it cannot notify (weaker)")
	drainTimeout := fs.Duration("drain-timeout", supervisor.DefaultDrainTimeout, "how long an old child may drain before SIGKILL")
	stopSignal := fs.String("stop-signal", "TERM", "signal that tells a child to drain and exit")
	logFormat := fs.String("log-format", "text", "text or json")
	instancesFlag := fs.String("instances", "1", "how many children serve at once on the same sockets, or max (one per CPU)")
	maxSurge := fs.Int("max-surge", 0, "during an upgrade, replace this many children at a time (0: the whole set at once)")
	metricsAddr := fs.String("metrics", "", "serve Prometheus metrics at /metrics on this address (handoff's and its children's)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	instances, ok := parseInstances(*instancesFlag)
	if !ok {
		return fail(stderr, exitUsage, "handoff run: --instances must be a number from 1, or max, not %q", *instancesFlag)
	}
	if *maxSurge < 0 {
		return fail(stderr, exitUsage, "handoff run: --max-surge must not be negative")
	}
	command := fs.Args()
	if len(command) == 0 {
		return fail(stderr, exitUsage, "handoff run: no command: handoff run [flags] -- CMD [ARGS...]")
	}
	sig, ok := signalByName(*stopSignal)
	if !ok {
		return fail(stderr, exitUsage, "handoff run: unknown --stop-signal %q", *stopSignal)
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		return fail(stderr, exitUsage, "handoff run: %v", err)
	}
	log = log.With("pid", os.Getpid())
	if len(listen) == 0 {
		listen = listFlag{defaultListen}
	}
	var addrs []string
	for _, spec := range listen {
		_, addr, found := strings.Cut(spec, "=")
		if !found {
			addr = spec
		}
		addrs = append(addrs, addr)
	}
	if err := checkListen(addrs); err != nil {
		return fail(stderr, exitUsage, "handoff run: %v", err)
	}
	if *readyTimeout <= 0 || *drainTimeout <= 0 {
		return fail(stderr, exitUsage, "handoff run: --ready-timeout and --drain-timeout must be positive")
	}
	ctlPath := defaultControl(*controlPath, *pidFile)

	var listeners []supervisor.Listener
	defer func() {
		for _, l := range listeners {
			l.File.Close()
		}
	}()
	for i, spec := range listen {
		name, addr, found := strings.Cut(spec, "=")
		if !found {
			name, addr = "listener"+strconv.Itoa(i), spec
		}
		network, address := sockaddr.Split(addr)
		f, bound, err := listenFile(network, address)
		if err != nil {
			return fail(stderr, exitListen, "handoff run: cannot listen on %s: %v", addr, err)
		}
		if network == "unix" {
			defer os.Remove(address)
		}
		listeners = append(listeners, supervisor.Listener{Name: name, File: f, Network: network, Addr: bound})
		log.Info("listening", "name", name, "network", network, "addr", bound)
	}
	if *pidFile != "" {
		if pid := pidfile.Running(*pidFile); pid != 0 {
			return fail(stderr, exitPIDFile, "handoff run: pid file %s names pid %d, which is running: another server was started with it", *pidFile, pid)
		}
		if err := pidfile.Write(*pidFile, os.Getpid()); err != nil {
			return fail(stderr, exitPIDFile, "handoff run: %v", err)
		}
		defer pidfile.Remove(*pidFile, os.Getpid())
	}
	supOpts := supervisor.Options{
		Command: command, Listeners: listeners, Shim: []string{"/proc/self/exe", supervisor.ShimCommand},
		ReadyTimeout: *readyTimeout, ReadyDelay: *readyDelay, DrainTimeout: *drainTimeout, StopSignal: sig,
		Instances: instances, MaxSurge: *maxSurge,
		Stdout: stdout, Stderr: stderr, Logger: log, Version: version,
	}
	var sup *supervisor.Supervisor
	if *metricsAddr != "" {
		msrv, mln, err := runMetrics(*metricsAddr, &supOpts, func() control.Status { return sup.Status() })
		if err != nil {
			return fail(stderr, exitListen, "handoff run: cannot listen on %s (--metrics): %v", *metricsAddr, err)
		}
		log.Info("metrics", "addr", mln.Addr().String())
		go msrv.Serve(mln)
		defer msrv.Close()
	}
	sup, err = supervisor.New(supOpts)
	if err != nil {
		return fail(stderr, exitUsage, "handoff run: %v", err)
	}
	if ctlPath != "" {
		ln, err := control.Listen(ctlPath)
		if err != nil {
			return fail(stderr, exitListen, "handoff run: %v", err)
		}
		served := make(chan struct{})
		go func() {
			defer close(served)
			control.Serve(ln, sup, log)
		}()
		defer func() {
			ln.Close()
			os.Remove(ctlPath)
			<-served
		}()
	}
	if os.Getpid() == 1 {
		log.Info("running as PID 1: reaping orphans and forwarding signals; the container lives across upgrades")
	}

	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigC := make(chan os.Signal, 16)
	signal.Notify(sigC, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	defer signal.Stop(sigC)
	go func() {
		for s := range sigC {
			switch s {
			case syscall.SIGHUP:
				sup.SignalUpgrade()
			case syscall.SIGTERM, syscall.SIGINT:
				if ctx.Err() == nil {
					log.Info("stop requested", "signal", s.String())
					stop()
				} else {
					log.Info("stop requested again: killing the children now", "signal", s.String())
					sup.Force()
				}
			default:
				sup.Signal(s.(syscall.Signal))
			}
		}
	}()
	if err := sup.Run(ctx); err != nil {
		return fail(stderr, exitFailure, "handoff run: %v", err)
	}
	return exitOK
}

// listenFile binds a listening socket and returns it as a file for children,
// with the address it is bound to.
func listenFile(network, addr string) (*os.File, string, error) {
	if network == "unix" {
		sockaddr.RemoveStale(addr)
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		return nil, "", err
	}
	defer ln.Close()
	if ul, ok := ln.(*net.UnixListener); ok {
		ul.SetUnlinkOnClose(false)
	}
	f, err := ln.(interface{ File() (*os.File, error) }).File()
	return f, ln.Addr().String(), err
}

// signalByName is the signal of --stop-signal: TERM, SIGTERM or term, among
// the signals a child may be told to stop with.
func signalByName(name string) (syscall.Signal, bool) {
	name = strings.TrimPrefix(strings.ToUpper(name), "SIG")
	for _, s := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT, syscall.SIGQUIT, syscall.SIGHUP,
		syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH} {
		if strings.TrimPrefix(unix.SignalName(s), "SIG") == name {
			return s, true
		}
	}
	return 0, false
}

// parseInstances reads --instances: a number from 1, or max for one per CPU.
func parseInstances(v string) (int, bool) {
	if v == "max" {
		return runtime.NumCPU(), true
	}
	n, err := strconv.Atoi(v)
	return n, err == nil && n >= 1 && n <= 1024
}
