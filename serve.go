// serve.go holds handoff serve, the reference server on package upgrader, and --check.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/handoff-dev/handoff/internal/sockaddr"
	"github.com/handoff-dev/handoff/server"
	"github.com/handoff-dev/handoff/upgrader"
)

// serveCmd is handoff serve: serve the reference application until a stop, or
// until a new process has taken over after an upgrade, then drain.
func serveCmd(args []string, stderr io.Writer) int {
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
	tlsCert := fs.String("tls-cert", "", "serve HTTPS (and HTTP/2) on every --listen with this certificate (PEM); read by each generation, so an upgrade rotates it")
	tlsKey := fs.String("tls-key", "", "the key of --tls-cert (PEM)")
	metricsAddr := fs.String("metrics", "", "serve Prometheus metrics at /metrics on this address, handed over like --listen")
	moveRate := fs.Int("move-rate", server.DefaultMoveRate, "idle keep-alive connections moved to the new generation per second at a handoff (0: all at once)")
	moveGC := fs.Int("move-gc-percent", defaultMoveGC(), "garbage collector percent while idle connections move, in both generations, if above GOGC (0: leave the collector alone; the default is 0 when GOGC is set)")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if fs.NArg() > 0 {
		return fail(stderr, exitUsage, "handoff serve: unexpected argument %q", fs.Arg(0))
	}
	if *upgradeTimeout <= 0 || *drainTimeout <= 0 {
		return fail(stderr, exitUsage, "handoff serve: --upgrade-timeout and --drain-timeout must be positive")
	}
	if *moveRate < 0 {
		return fail(stderr, exitUsage, "handoff serve: --move-rate must be 0 (all at once) or positive")
	}
	if *moveGC < 0 {
		return fail(stderr, exitUsage, "handoff serve: --move-gc-percent must be 0 (leave the collector alone) or positive")
	}
	base, err := newLogger(*logFormat, stderr)
	if err != nil {
		return fail(stderr, exitUsage, "handoff serve: %v", err)
	}
	if len(listen) == 0 {
		listen = listFlag{defaultListen}
	}
	if err := checkListen(listen); err != nil {
		return fail(stderr, exitUsage, "handoff serve: %v", err)
	}
	if (*tlsCert == "") != (*tlsKey == "") {
		return fail(stderr, exitUsage, "handoff serve: --tls-cert and --tls-key go together")
	}
	hub := newWSHub()
	httpSrv := &http.Server{Handler: newMux(hub)}
	if *tlsCert != "" {
		// Each generation reads the files: an upgrade is how certificates rotate.
		prefix := "handoff serve: "
		if *check {
			prefix = "handoff serve --check: "
		}
		cert, err := tls.LoadX509KeyPair(*tlsCert, *tlsKey)
		if err != nil {
			return fail(stderr, exitFailure, prefix+"load certificate: %v", err)
		}
		// Outside its dates, every client refuses it. --check (and so
		// --preflight) refuses to deploy it; a server started with it says so.
		if now := time.Now(); cert.Leaf != nil && (now.After(cert.Leaf.NotAfter) || now.Before(cert.Leaf.NotBefore)) {
			msg := fmt.Sprintf("certificate %s is not valid now: valid from %s to %s", *tlsCert,
				cert.Leaf.NotBefore.UTC().Format(time.RFC3339), cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
			if *check {
				return fail(stderr, exitFailure, prefix+"%s", msg)
			}
			base.Warn(msg)
		}
		httpSrv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	} else {
		var p http.Protocols // plaintext: HTTP/1.1, and HTTP/2 with prior knowledge (h2c)
		p.SetHTTP1(true)
		p.SetUnencryptedHTTP2(true)
		httpSrv.Protocols = &p
	}
	srv := &server.Server{HTTP: httpSrv, MoveRate: *moveRate}
	if *moveRate == 0 {
		srv.MoveRate = -1
	}
	srv.RegisterOnDrain(hub.closeAll)
	opts := upgrader.Options{
		PIDFile:        *pidFile,
		UpgradeTimeout: *upgradeTimeout,
		AbortTimeout:   *drainTimeout,
		Version:        version,
		ControlPath:    defaultControl(*controlPath, *pidFile),
		InFlight:       srv.InFlight,
		StopAccepting:  srv.StopAccepting,
		HandleSignals:  true,
		MoveGCPercent:  *moveGC,
	}
	if *preflight {
		opts.Preflight = append(append([]string{"serve"}, args...), "--check")
	}
	if *check {
		return checkServe(opts, listen, stderr)
	}

	opts.Logger = base
	sm := newServeMetrics(*metricsAddr, srv, &opts)
	upg, err := upgrader.New(opts)
	if err != nil {
		code := exitFailure
		switch {
		case errors.Is(err, upgrader.ErrPIDFile):
			code = exitPIDFile
		case errors.Is(err, upgrader.ErrControlSocket):
			code = exitListen
		}
		return fail(stderr, code, "handoff serve: %v", err)
	}
	defer upg.Close()
	log := base.With("pid", os.Getpid(), "generation", upg.Generation())

	httpSrv.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelWarn)
	// Every listener first: a generation that cannot take them all serves on
	// none, so it has accepted nothing when it exits.
	var lns []net.Listener
	for _, spec := range listen {
		network, addr := sockaddr.Split(spec)
		ln, err := upg.Listen(network, addr)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return fail(stderr, exitListen, "handoff serve: cannot %v", err)
		}
		log.Info("listening", "network", network, "addr", ln.Addr().String())
		lns = append(lns, ln)
	}
	if ml := upg.Moved(); ml != nil {
		lns = append(lns, ml) // idle connections the previous generation moves here
	}
	serveErr := make(chan error, len(lns)+1)
	if sm != nil {
		addr, err := sm.listen(upg)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			return fail(stderr, exitListen, "handoff serve: cannot %v (--metrics)", err)
		}
		log.Info("metrics", "addr", addr.String())
	}
	for _, ln := range lns {
		if httpSrv.TLSConfig != nil && ln != upg.Moved() {
			go func() { serveErr <- srv.ServeTLS(ln, "", "") }()
		} else {
			go func() { serveErr <- srv.Serve(ln) }()
		}
	}
	code := exitOK
	if err := upg.Ready(); err != nil {
		// It served already: what it accepted is drained below, like any stop.
		code = exitFailure
		if errors.Is(err, upgrader.ErrPIDFile) {
			code = exitPIDFile
		}
		fmt.Fprintf(stderr, "handoff serve: %v\n", err)
		upg.Stop()
	} else {
		sm.serve(serveErr)
	}

	select {
	case <-upg.Done():
	case err := <-serveErr:
		if errors.Is(err, server.ErrDraining) {
			<-upg.Done() // StopAccepting: a new generation took over, and Done follows
			break
		}
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
	// The metrics endpoint stops answering here at once, so that a scrape never
	// sees this generation's older values once the next one serves.
	metricsDrained := make(chan struct{})
	go func() {
		defer close(metricsDrained)
		sm.drain(ctx)
	}()
	defer func() { <-metricsDrained }()
	var rep server.Report
	if m := upg.Mover(); m != nil {
		rep, err = srv.DrainTo(ctx, m) // idle connections move to the new generation
	} else {
		rep, err = srv.Drain(ctx)
	}
	level := slog.LevelInfo
	if err != nil {
		level = slog.LevelWarn
	}
	upg.Drained(upgrader.DrainReport{Requests: rep.Requests, ClosedIdle: rep.ClosedIdle,
		ClosedAfterResponse: rep.ClosedAfterResponse, Hijacked: rep.Hijacked, HTTP2: rep.HTTP2, Moved: rep.Moved,
		Cut: rep.Cut, Running: rep.Running, Duration: rep.Duration, Err: err})
	log.Log(ctx, level, "drained", "requests", rep.Requests, "closed_idle", rep.ClosedIdle,
		"closed_after_response", rep.ClosedAfterResponse, "hijacked", rep.Hijacked, "cut", rep.Cut, "running", rep.Running, "moved", rep.Moved, "http2", rep.HTTP2,
		"duration", rep.Duration, "cause", errString(err))
	return code
}

// checkServe is --check: what serve would need, without binding or writing.
func checkServe(opts upgrader.Options, listen []string, stderr io.Writer) int {
	const prefix = "handoff serve --check: "
	for _, spec := range listen {
		network, addr := sockaddr.Split(spec)
		if network == "unix" {
			if fi, err := os.Stat(filepath.Dir(addr)); err != nil || !fi.IsDir() {
				return fail(stderr, exitListen, prefix+"--listen %s: directory %s does not exist", spec, filepath.Dir(addr))
			}
		} else if _, err := net.ResolveTCPAddr(network, addr); err != nil {
			return fail(stderr, exitListen, prefix+"--listen %s: %v", spec, err)
		}
	}
	if err := upgrader.Check(opts); err != nil {
		if errors.Is(err, upgrader.ErrPIDFile) {
			return fail(stderr, exitPIDFile, prefix+"%v", err)
		}
		return fail(stderr, exitFailure, prefix+"%v", err)
	}
	fmt.Fprintf(stderr, prefix+"ok (version %s)\n", version)
	return exitOK
}

// defaultMoveGC is --move-gc-percent's default: 400, or 0 when the operator
// set GOGC (for memory, say), which then holds during moves too.
func defaultMoveGC() int {
	if os.Getenv("GOGC") != "" {
		return 0
	}
	return 400
}
