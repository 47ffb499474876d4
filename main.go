// Command handoff is a reference HTTP server that upgrades itself without
// downtime, and the operator's tool to prove it.
//
//	handoff serve --listen 127.0.0.1:8080 --pidfile /run/handoff.pid
//	kill -HUP "$(cat /run/handoff.pid)"   # after putting a new binary in place
//	handoff load --target 127.0.0.1:8080 --rate 1000 --duration 30s
//
// The files of this package are one command each: serve.go (handoff serve,
// a server built on package upgrader), run.go (handoff run, which supervises
// any server through internal/supervisor), control.go (handoff upgrade and
// handoff status, clients of the control socket), load.go (handoff load) and
// app.go (the reference application that serve runs). This file dispatches
// to them and holds what they share.
package main

import (
	"flag"
	"fmt"
	"github.com/handoff-dev/handoff/internal/sockaddr"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/handoff-dev/handoff/internal/supervisor"
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

// defaultListen is the address serve and run listen on without --listen.
const defaultListen = "127.0.0.1:8080"

const usage = `usage:
  handoff serve [flags]     serve HTTP; SIGHUP upgrades to the binary now at the same path
  handoff run [flags] -- CMD [ARGS...]
                            run any server on sockets handoff holds; SIGHUP starts a new CMD
                            and stops the old one once the new one is ready
  handoff upgrade [flags]   upgrade a running server and wait for the verdict
  handoff status [flags]    show a running server's generation, phase and last upgrade
  handoff stop [flags]      stop a running server gracefully; wait for its drain and say what it did
  handoff load [flags]      send a constant-rate load that never retries; exit 1 if any request failed
  handoff verify [flags]    prove it on a running server: a load, upgrades meanwhile, and a verdict
  handoff version           print the version
Run "handoff COMMAND -h" for a command's flags.
Exit codes: 0 ok, 1 failed (upgrade: the old process keeps serving; stop: the drain was cut), 2 bad usage,
3 cannot listen, 4 cannot write the PID file, 5 nothing answers on the control socket,
6 no verdict within --timeout, 7 busy (an upgrade runs or the previous generation drains).
`

// main is the only place that exits the process.
func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run dispatches the command line to a command and returns its exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	switch args[0] {
	case "serve", "run":
		// Until the signal handlers are in place, a SIGHUP (a reload sent too
		// early) must not kill the process, as its default action would.
		// A new generation catches it from before main already.
		if !upgrader.EarlySignals() {
			signal.Ignore(syscall.SIGHUP)
		}
	}
	switch args[0] {
	case "serve":
		return serveCmd(args[1:], stderr)
	case "load":
		return loadCmd(args[1:], stdout, stderr)
	case "upgrade":
		return upgradeCmd(args[1:], stdout, stderr)
	case "run":
		return runCmd(args[1:], stdout, stderr)
	case supervisor.ShimCommand:
		return supervisor.Shim(args[1:], stderr)
	case "status":
		return statusCmd(args[1:], stdout, stderr)
	case "stop":
		return stopCmd(args[1:], stdout, stderr)
	case "verify":
		return verifyCmd(args[1:], stdout, stderr)
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

// fail prints one line, format and its arguments, to stderr and returns code.
func fail(stderr io.Writer, code int, format string, a ...any) int {
	fmt.Fprintf(stderr, format+"\n", a...)
	return code
}

// checkListen rejects listen addresses that would bind something other than
// what was meant: an empty one (every interface, a random port) or an empty
// Unix path (an abstract socket).
func checkListen(specs []string) error {
	for _, spec := range specs {
		if _, addr := sockaddr.Split(spec); addr == "" {
			return fmt.Errorf("--listen %q: empty address", spec)
		}
	}
	return nil
}

// listFlag is a repeatable string flag.
type listFlag []string

// String returns the values joined with commas.
func (l *listFlag) String() string { return strings.Join(*l, ",") }

// Set adds a value.
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

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

// defaultControl is the control socket of --control and --pidfile: the
// explicit path, or else the PID file's path + .sock, or else none.
func defaultControl(controlPath, pidFile string) string {
	if controlPath == "" && pidFile != "" {
		return pidFile + ".sock"
	}
	return controlPath
}

// orUnexpected returns err, or else the error of fs's first unexpected
// argument.
func orUnexpected(err error, fs *flag.FlagSet) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("unexpected argument %q", fs.Arg(0))
}

// errString is err's message, or "" for nil.
func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}
