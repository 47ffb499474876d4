// Command handoff is a reference HTTP server that upgrades itself without
// downtime, and the operator's tool to prove it.
//
//	handoff serve --listen 127.0.0.1:8080 --pidfile /run/handoff.pid
//	kill -HUP "$(cat /run/handoff.pid)"   # after putting a new binary in place
//	handoff load --target 127.0.0.1:8080 --rate 1000 --duration 30s
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/loadgen"
	"github.com/handoff-dev/handoff/internal/pidfile"
	"github.com/handoff-dev/handoff/internal/sockaddr"
	"github.com/handoff-dev/handoff/internal/supervisor"
	"github.com/handoff-dev/handoff/server"
	"github.com/handoff-dev/handoff/upgrader"
)

// version is set at build time: go build -ldflags "-X main.version=v1.2.3".
var version = "dev"

// Exit codes.
const (
	exitOK      = 0 // served and stopped cleanly, or the command succeeded
	exitFailure = 1 // a runtime error; for load: some requests failed
	exitUsage   = 2 // bad command line
	exitListen  = 3 // cannot listen on an address
	exitPIDFile = 4 // cannot write the PID file
	exitNoReply = 5 // upgrade, status: nothing answers on the control socket
	exitTimeout = 6 // upgrade: no outcome within --timeout (the upgrade may still finish)
	exitBusy    = 7 // upgrade: another upgrade runs, or the previous generation still drains: retry, or --wait
)

const maxSlowMS = 60000

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

const usage = `usage:
  handoff serve [flags]     serve HTTP; SIGHUP upgrades to the binary now at the same path
  handoff run [flags] -- CMD [ARGS...]
                            run any server on sockets handoff holds; SIGHUP starts a new CMD
                            and stops the old one once the new one is ready
  handoff upgrade [flags]   upgrade a running server and wait for the verdict
  handoff status [flags]    show a running server's generation, phase and last upgrade
  handoff load [flags]      send a constant-rate load that never retries; exit 1 if any request failed
  handoff version           print the version
Run "handoff COMMAND -h" for a command's flags.
Exit codes: 0 ok, 1 failed (upgrade: the old process keeps serving), 2 bad usage,
3 cannot listen, 4 cannot write the PID file, 5 nothing answers on the control socket,
6 no verdict within --timeout, 7 busy (an upgrade runs or the previous generation drains).
`

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "serve", "run":
		// Until the signal handlers are in place, a SIGHUP (a reload sent too
		// early) must not kill the process, as its default action would.
		signal.Ignore(syscall.SIGHUP)
	}
	switch args[0] {
	case "serve":
		return serve(args[1:], stderr)
	case "load":
		return load(args[1:], stdout, stderr)
	case "upgrade":
		return upgrade(args[1:], stdout, stderr)
	case "run":
		return runCmd(args[1:], stdout, stderr)
	case supervisor.ShimCommand:
		return supervisor.Shim(args[1:], stderr)
	case "status":
		return status(args[1:], stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, version)
		return exitOK
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return exitOK
	}
	fmt.Fprintf(stderr, "handoff: unknown command %q\n%s", args[0], usage)
	return exitUsage
}

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func serve(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var listen listFlag
	fs.Var(&listen, "listen", "address to serve on, host:port or unix:/path; repeatable (default 127.0.0.1:8080)")
	pidFile := fs.String("pidfile", "", "write the serving process's PID here")
	upgradeTimeout := fs.Duration("upgrade-timeout", upgrader.DefaultUpgradeTimeout, "how long a new process has to become ready")
	drainTimeout := fs.Duration("drain-timeout", 30*time.Second, "how long the old process may take to finish its requests")
	logFormat := fs.String("log-format", "text", "text or json")
	controlPath := fs.String("control", "", "control socket for handoff upgrade and status (default: the PID file's path + .sock)")
	preflight := fs.Bool("preflight", false, "before an upgrade, run the new binary with these flags and --check; a failure stops the upgrade")
	check := fs.Bool("check", false, "check the flags and what they name, print the verdict and exit (0 when fine)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "handoff serve: unexpected argument %q\n", fs.Arg(0))
		return exitUsage
	}
	if *upgradeTimeout <= 0 || *drainTimeout <= 0 {
		fmt.Fprintln(stderr, "handoff serve: --upgrade-timeout and --drain-timeout must be positive")
		return exitUsage
	}
	base, err := newLogger(*logFormat, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "handoff serve: %v\n", err)
		return exitUsage
	}
	if len(listen) == 0 {
		listen = listFlag{"127.0.0.1:8080"}
	}
	if *controlPath == "" && *pidFile != "" {
		*controlPath = *pidFile + ".sock"
	}
	srv := &server.Server{Handler: newMux()}
	opts := upgrader.Options{
		PIDFile:        *pidFile,
		UpgradeTimeout: *upgradeTimeout,
		Version:        version,
		ControlPath:    *controlPath,
		InFlight:       srv.InFlight,
	}
	if *preflight {
		opts.Preflight = append(append([]string{"serve"}, args...), "--check")
	}
	if *check {
		return checkServe(opts, listen, stderr)
	}

	opts.Logger = base
	upg, err := upgrader.New(opts)
	if err != nil {
		fmt.Fprintf(stderr, "handoff serve: %v\n", err)
		switch {
		case errors.Is(err, upgrader.ErrPIDFile):
			return exitPIDFile
		case errors.Is(err, upgrader.ErrControlSocket):
			return exitListen
		}
		return exitFailure
	}
	defer upg.Close()
	upg.HandleSignals()
	log := base.With("pid", os.Getpid(), "generation", upg.Generation())

	srv.Logger = log
	serveErr := make(chan error, len(listen))
	for _, spec := range listen {
		network, addr := sockaddr.Split(spec)
		ln, err := upg.Listen(network, addr)
		if err != nil {
			fmt.Fprintf(stderr, "handoff serve: cannot %v\n", err)
			return exitListen
		}
		log.Info("listening", "network", network, "addr", ln.Addr().String())
		go func() { serveErr <- srv.Serve(ln) }()
	}
	if err := upg.Ready(); err != nil {
		fmt.Fprintf(stderr, "handoff serve: %v\n", err)
		if errors.Is(err, upgrader.ErrPIDFile) {
			return exitPIDFile
		}
		return exitFailure
	}

	code := exitOK
	select {
	case <-upg.Done():
	case err := <-serveErr:
		log.Error("serving failed", "error", err)
		upg.Stop()
		code = exitFailure
	}
	reason := "stop"
	if upg.HandedOff() != nil {
		reason = "upgrade"
	}
	log.Info("draining", "reason", reason, "in_flight", srv.InFlight(), "timeout", *drainTimeout)
	ctx, cancel := upg.DrainContext(context.Background(), *drainTimeout)
	defer cancel()
	rep, err := srv.Drain(ctx)
	level := slog.LevelInfo
	if err != nil {
		level = slog.LevelWarn
	}
	log.Log(ctx, level, "drained", "requests", rep.Requests, "closed_idle", rep.ClosedIdle,
		"closed_after_response", rep.ClosedAfterResponse, "hijacked", rep.Hijacked, "cut", rep.Cut,
		"duration", rep.Duration, "cause", errString(err))
	return code
}

// newLogger makes the slog logger of --log-format.
func newLogger(format string, w io.Writer) (*slog.Logger, error) {
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, nil)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, nil)), nil
	}
	return nil, fmt.Errorf("--log-format must be text or json, not %q", format)
}

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
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	command := fs.Args()
	if len(command) == 0 {
		fmt.Fprintln(stderr, "handoff run: no command: handoff run [flags] -- CMD [ARGS...]")
		return exitUsage
	}
	sig, ok := signalByName(*stopSignal)
	if !ok {
		fmt.Fprintf(stderr, "handoff run: unknown --stop-signal %q\n", *stopSignal)
		return exitUsage
	}
	log, err := newLogger(*logFormat, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "handoff run: %v\n", err)
		return exitUsage
	}
	log = log.With("pid", os.Getpid())
	if len(listen) == 0 {
		listen = listFlag{"127.0.0.1:8080"}
	}
	if *controlPath == "" && *pidFile != "" {
		*controlPath = *pidFile + ".sock"
	}
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
			fmt.Fprintf(stderr, "handoff run: cannot listen on %s: %v\n", addr, err)
			return exitListen
		}
		if network == "unix" {
			defer os.Remove(address)
		}
		listeners = append(listeners, supervisor.Listener{Name: name, File: f, Network: network, Addr: bound})
		log.Info("listening", "name", name, "network", network, "addr", bound)
	}
	if *pidFile != "" {
		if err := pidfile.Write(*pidFile, os.Getpid()); err != nil {
			fmt.Fprintf(stderr, "handoff run: %v\n", err)
			return exitPIDFile
		}
		defer pidfile.Remove(*pidFile, os.Getpid())
	}
	sup, err := supervisor.New(supervisor.Options{
		Command: command, Listeners: listeners, Shim: []string{"/proc/self/exe", supervisor.ShimCommand},
		ReadyTimeout: *readyTimeout, ReadyDelay: *readyDelay, DrainTimeout: *drainTimeout, StopSignal: sig,
		Stdout: stdout, Stderr: stderr, Logger: log, Version: version,
	})
	if err != nil {
		fmt.Fprintf(stderr, "handoff run: %v\n", err)
		return exitUsage
	}
	if *controlPath != "" {
		ln, err := control.Listen(*controlPath)
		if err != nil {
			fmt.Fprintf(stderr, "handoff run: %v\n", err)
			return exitListen
		}
		served := make(chan struct{})
		go func() {
			defer close(served)
			control.Serve(ln, sup, log)
		}()
		defer func() {
			ln.Close()
			os.Remove(*controlPath)
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
		fmt.Fprintf(stderr, "handoff run: %v\n", err)
		return exitFailure
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

// checkServe is --check: what serve would need, without binding or writing.
func checkServe(opts upgrader.Options, listen []string, stderr io.Writer) int {
	fail := func(code int, format string, a ...any) int {
		fmt.Fprintf(stderr, "handoff serve --check: "+format+"\n", a...)
		return code
	}
	for _, spec := range listen {
		network, addr := sockaddr.Split(spec)
		if network == "unix" {
			if fi, err := os.Stat(filepath.Dir(addr)); err != nil || !fi.IsDir() {
				return fail(exitListen, "--listen %s: directory %s does not exist", spec, filepath.Dir(addr))
			}
		} else if _, err := net.ResolveTCPAddr(network, addr); err != nil {
			return fail(exitListen, "--listen %s: %v", spec, err)
		}
	}
	if err := upgrader.Check(opts); err != nil {
		if errors.Is(err, upgrader.ErrPIDFile) {
			return fail(exitPIDFile, "%v", err)
		}
		return fail(exitFailure, "%v", err)
	}
	fmt.Fprintf(stderr, "handoff serve --check: ok (version %s)\n", version)
	return exitOK
}

// controlFlags are the flags that find a running server's control socket.
func controlFlags(fs *flag.FlagSet) func() (string, error) {
	controlPath := fs.String("control", "", "the server's control socket")
	pidFile := fs.String("pidfile", "", "the server's PID file; the control socket is beside it (FILE.sock)")
	return func() (string, error) {
		switch {
		case *controlPath != "":
			return *controlPath, nil
		case *pidFile != "":
			return *pidFile + ".sock", nil
		}
		return "", errors.New("--control PATH or --pidfile FILE is required")
	}
}

func upgrade(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff upgrade", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := controlFlags(fs)
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the verdict")
	wait := fs.Bool("wait", false, "if the previous generation is still draining, wait for it instead of failing")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	sock, err := path()
	if err != nil || fs.NArg() > 0 {
		fmt.Fprintf(stderr, "handoff upgrade: %v\n", orUnexpected(err, fs))
		return exitUsage
	}
	ctx, cancel := context.WithTimeoutCause(context.Background(), *timeout,
		fmt.Errorf("no verdict within %v; the upgrade may still finish: run handoff status", *timeout))
	defer cancel()
	ans, err := control.Ask(ctx, sock, control.Request{Cmd: control.CmdUpgrade, Wait: *wait})
	if code, done := askFailed("upgrade", err, ctx, stderr); done {
		return code
	}
	if *asJSON {
		json.NewEncoder(stdout).Encode(ans)
	}
	o := ans.Upgrade
	if ans.OK {
		if !*asJSON {
			fmt.Fprintf(stdout, "upgraded: pid %d -> %d, version %s, generation %d, ready in %.1f ms\n",
				ans.PID, o.PID, o.Version, o.Generation, o.DurationMS)
		}
		return exitOK
	}
	if !*asJSON {
		fmt.Fprintf(stderr, "upgrade failed: %s\n", ans.Error)
		if o != nil && o.ExitStatus != "" {
			fmt.Fprintf(stderr, "  new process %d: %s\n", o.PID, o.ExitStatus)
		}
		if o != nil && len(o.Stderr) > 0 {
			fmt.Fprintf(stderr, "  its last lines of output:\n")
			for _, l := range o.Stderr {
				fmt.Fprintf(stderr, "    %s\n", l)
			}
		}
		switch {
		case ans.Kind == control.KindStopping || ans.Kind == control.KindHandedOff:
		case ans.Kind.Busy():
			fmt.Fprintf(stderr, "pid %d keeps serving; try again later, or use --wait\n", ans.PID)
		default:
			fmt.Fprintf(stderr, "pid %d keeps serving\n", ans.PID)
		}
	}
	if ans.Kind.Busy() {
		return exitBusy
	}
	return exitFailure
}

func status(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := controlFlags(fs)
	timeout := fs.Duration("timeout", 10*time.Second, "how long to wait for the answer")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	sock, err := path()
	if err != nil || fs.NArg() > 0 {
		fmt.Fprintf(stderr, "handoff status: %v\n", orUnexpected(err, fs))
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	ans, err := control.Ask(ctx, sock, control.Request{Cmd: control.CmdStatus})
	if code, done := askFailed("status", err, ctx, stderr); done {
		return code
	}
	if *asJSON {
		json.NewEncoder(stdout).Encode(ans.Status)
		return exitOK
	}
	st := ans.Status
	fmt.Fprintf(stdout, "pid %d, generation %d, version %s, up since %s\n", st.PID, st.Generation, st.Version,
		st.Started.Format(time.RFC3339))
	fmt.Fprintf(stdout, "phase: %s", st.Phase)
	if st.PreviousPID != 0 {
		fmt.Fprintf(stdout, " (previous generation %d still draining)", st.PreviousPID)
	}
	fmt.Fprintf(stdout, "\nin flight: %d requests\n", st.InFlight)
	for _, l := range st.Listeners {
		fmt.Fprintf(stdout, "listening: %s %s\n", l.Network, l.Addr)
	}
	for _, c := range st.Children {
		fmt.Fprintf(stdout, "child: pid %d, %s since %s\n", c.PID, c.Phase, c.Started.Format(time.RFC3339))
	}
	if o := st.LastUpgrade; o != nil {
		verdict := "ok"
		if !o.OK {
			verdict = "failed: " + o.Error
		}
		fmt.Fprintf(stdout, "last upgrade: %s, %s\n", o.At.Format(time.RFC3339), verdict)
	}
	return exitOK
}

// askFailed maps a failed control request to an exit code.
func askFailed(cmd string, err error, ctx context.Context, stderr io.Writer) (int, bool) {
	switch {
	case err == nil:
		return 0, false
	case errors.Is(err, control.ErrNoAnswer):
		fmt.Fprintf(stderr, "handoff %s: %v (is handoff serve or handoff run running with --control or --pidfile?)\n", cmd, err)
		return exitNoReply, true
	case ctx.Err() != nil:
		fmt.Fprintf(stderr, "handoff %s: %v\n", cmd, err)
		return exitTimeout, true
	}
	fmt.Fprintf(stderr, "handoff %s: %v\n", cmd, err)
	return exitFailure, true
}

func orUnexpected(err error, fs *flag.FlagSet) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("unexpected argument %q", fs.Arg(0))
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// newMux is the reference application.
func newMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "Hello World !!!")
	})
	mux.HandleFunc("GET /hello/{name}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello %s!!!", r.PathValue("name"))
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > maxSlowMS {
			http.Error(w, fmt.Sprintf("ms must be an integer from 0 to %d", maxSlowMS), http.StatusBadRequest)
			return
		}
		t := time.NewTimer(time.Duration(ms) * time.Millisecond)
		defer t.Stop()
		select {
		case <-t.C:
			fmt.Fprintf(w, "slept %d ms", ms)
		case <-r.Context().Done():
		}
	})
	pid := strconv.Itoa(os.Getpid())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", pid)
		w.Header().Set("Handoff-Version", version)
		mux.ServeHTTP(w, r)
	})
}

func load(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	target := fs.String("target", "127.0.0.1:8080", "address to load, host:port or unix:/path (loopback only)")
	var cfg loadgen.Config
	fs.IntVar(&cfg.Rate, "rate", 1000, "requests per second")
	fs.DurationVar(&cfg.Duration, "duration", 10*time.Second, "how long to send; SIGINT stops earlier")
	fs.IntVar(&cfg.Conns, "conns", 16, "pooled keep-alive connections at most")
	fs.Float64Var(&cfg.NewConnFraction, "new-conn-fraction", 0, "share of requests sent on a new connection")
	fs.Float64Var(&cfg.SlowFraction, "slow-fraction", 0, "share of requests sent to /slow")
	fs.DurationVar(&cfg.Slow, "slow", 800*time.Millisecond, "how long a slow request takes")
	fs.StringVar(&cfg.Path, "path", "/", "path of ordinary requests")
	fs.DurationVar(&cfg.Timeout, "timeout", 0, "per-request timeout (default 10s plus --slow)")
	fs.BoolVar(&cfg.Samples, "samples", false, "include one sample per request in the JSON output")
	asJSON := fs.Bool("json", false, "print the result as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "handoff load: unexpected argument %q\n", fs.Arg(0))
		return exitUsage
	}
	cfg.Network, cfg.Addr = sockaddr.Split(*target)
	if cfg.Network == "tcp" && !isLoopback(cfg.Addr) {
		fmt.Fprintf(stderr, "handoff load: --target %s is not a loopback address; handoff load only loads this host\n", cfg.Addr)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := loadgen.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "handoff load: %v\n", err)
		return exitUsage
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.Encode(res)
	} else {
		fmt.Fprint(stdout, res.Summary())
	}
	if res.Failed > 0 {
		return exitFailure
	}
	return exitOK
}

func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
