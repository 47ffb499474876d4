// load.go holds handoff load, a constant-rate load on this host that never retries.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os/signal"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/loadgen"
	"github.com/handoff-dev/handoff/internal/sockaddr"
)

// loadCmd is handoff load: send the load of its flags and print the result;
// the exit code is exitFailure if any request failed.
func loadCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	target := fs.String("target", defaultListen, "address to load, host:port or unix:/path (loopback only)")
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
		return fail(stderr, exitUsage, "handoff load: unexpected argument %q", fs.Arg(0))
	}
	cfg.Network, cfg.Addr = sockaddr.Split(*target)
	if cfg.Network == "tcp" && !isLoopback(cfg.Addr) {
		return fail(stderr, exitUsage, "handoff load: --target %s is not a loopback address; handoff load only loads this host", cfg.Addr)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	res, err := loadgen.Run(ctx, cfg)
	if err != nil {
		return fail(stderr, exitUsage, "handoff load: %v", err)
	}
	if *asJSON {
		json.NewEncoder(stdout).Encode(res)
	} else {
		fmt.Fprint(stdout, res.Summary())
	}
	if res.Failed > 0 {
		return exitFailure
	}
	return exitOK
}

// isLoopback reports whether addr, host:port, names this host: localhost or
// a loopback IP.
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
