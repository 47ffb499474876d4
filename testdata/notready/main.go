// Command notready is a broken "new version" of handoff serve used by the
// fault-injection tests (failure_test.go): exec'd by an upgrade with serve's
// arguments, it takes the same listeners (and the control socket, PIDFILE.sock)
// through package upgrader, serves the routes of the reference application on
// them, and never calls Ready. When the previous generation gives up on it (its
// --upgrade-timeout), or at a stop, upgrader's Done closes: it then drains what
// it accepted with server.Drain and exits 0.
//
// With --notready-mode panic it panics right after taking the listeners,
// before serving: a new generation that crashes holding the sockets. With
// --notready-mode ready-on-usr1 it calls Ready when it gets SIGUSR1, and logs
// what Ready returned. With --notready-mode new-after-sigterm it waits for a
// SIGTERM before it even calls upgrader.New (with Options.HandleSignals), then
// calls Ready at once, and logs what Ready returned: package upgrader must have
// caught that SIGTERM too (see upgrader.EarlySignals), and fail Ready.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/refapp"
	"github.com/handoff-dev/handoff/server"
	"github.com/handoff-dev/handoff/upgrader"
)

// version is the Handoff-Version of every answer.
const version = "notready"

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	if len(args) > 0 && args[0] == "serve" {
		args = args[1:]
	}
	fs := flag.NewFlagSet("notready", flag.ContinueOnError)
	var listen listFlag
	fs.Var(&listen, "listen", "address, host:port or unix:/path; repeatable")
	pidFile := fs.String("pidfile", "", "PID file (the control socket is beside it, +.sock)")
	control := fs.String("control", "", "control socket")
	drainTimeout := fs.Duration("drain-timeout", 30*time.Second, "how long the drain may take")
	fs.Duration("upgrade-timeout", time.Minute, "ignored")
	fs.String("log-format", "json", "ignored: always JSON")
	fs.Bool("preflight", false, "ignored")
	check := fs.Bool("check", false, "print ok and exit 0")
	mode := fs.String("notready-mode", "notready", "notready (serve, never ready), panic (panic after taking the listeners), ready-on-usr1 (call Ready at SIGUSR1) or new-after-sigterm (call New once a SIGTERM came, then Ready)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *check {
		fmt.Fprintln(os.Stderr, "testdata-notready --check: ok")
		return 0
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil)).With("pid", os.Getpid())
	ctlPath := *control
	if ctlPath == "" && *pidFile != "" {
		ctlPath = *pidFile + ".sock"
	}
	if *mode == "new-after-sigterm" {
		term := make(chan os.Signal, 1)
		signal.Notify(term, syscall.SIGTERM)
		log.Info("waiting for SIGTERM to call New", "early_signals", upgrader.EarlySignals())
		<-term
		// Stop waits for the delivery under way: every channel that wants
		// SIGTERM has it by then.
		signal.Stop(term)
	}
	srv := &server.Server{Handler: mux()}
	upg, err := upgrader.New(upgrader.Options{PIDFile: *pidFile, ControlPath: ctlPath, Version: version,
		Logger: log, InFlight: srv.InFlight, HandleSignals: *mode == "new-after-sigterm"})
	if err != nil {
		fmt.Fprintf(os.Stderr, "testdata-notready: %v\n", err)
		return 1
	}
	defer upg.Close()
	upg.HandleSignals()
	srv.Logger = log

	var specs []string
	for _, spec := range listen {
		network, addr := "tcp", spec
		if p, ok := strings.CutPrefix(spec, "unix:"); ok {
			network, addr = "unix", p
		}
		ln, err := upg.Listen(network, addr)
		if err != nil {
			fmt.Fprintf(os.Stderr, "testdata-notready: %v\n", err)
			return 3
		}
		specs = append(specs, ln.Addr().String())
		defer ln.Close()
		go srv.Serve(ln)
	}
	if *mode == "panic" {
		panic(fmt.Sprintf("testdata-notready: pid %d panics on purpose holding %v", os.Getpid(), specs))
	}
	if *mode == "ready-on-usr1" || *mode == "new-after-sigterm" {
		if *mode == "ready-on-usr1" {
			usr1 := make(chan os.Signal, 1)
			signal.Notify(usr1, syscall.SIGUSR1)
			log.Info("waiting for SIGUSR1 to call Ready")
			<-usr1
		}
		if err := upg.Ready(); err != nil {
			log.Info("ready failed", "error", err.Error())
			upg.Stop() // as handoff serve does: it drains what it accepted and exits
		} else {
			log.Info("ready")
		}
	}
	log.Info("serving, never ready", "listeners", specs)
	fmt.Fprintf(os.Stderr, "testdata-notready: pid %d serving, never ready\n", os.Getpid())

	<-upg.Done()
	log.Info("draining", "in_flight", srv.InFlight())
	ctx, cancel := upg.DrainContext(context.Background(), *drainTimeout)
	defer cancel()
	rep, err := srv.Drain(ctx)
	cause := ""
	if err != nil {
		cause = err.Error()
	}
	log.Info("drained", "requests", rep.Requests, "cut", rep.Cut, "closed_idle", rep.ClosedIdle, "cause", cause)
	return 0
}

// mux answers like the reference application (app.go): /, /hello/{name},
// /healthz and /slow?ms=N, with Handoff-Pid and Handoff-Version headers.
func mux() http.Handler {
	m := http.NewServeMux()
	m.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "Hello World !!!") })
	m.HandleFunc("GET /hello/{name}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello %s!!!", r.PathValue("name"))
	})
	m.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	m.HandleFunc("GET /slow", refapp.Slow)
	pid := strconv.Itoa(os.Getpid())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", pid)
		w.Header().Set("Handoff-Version", version)
		m.ServeHTTP(w, r)
	})
}
