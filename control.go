// control.go holds handoff upgrade and handoff status, the clients of a server's control socket.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
)

// controlFlags are the flags that find a running server's control socket and
// bound the wait for its answer; the function they return gives the socket's
// path once the flags are parsed, or why they are wrong.
func controlFlags(fs *flag.FlagSet, timeout time.Duration, what string) (func() (string, error), *time.Duration) {
	controlPath := fs.String("control", "", "the server's control socket")
	pidFile := fs.String("pidfile", "", "the server's PID file; the control socket is beside it (FILE.sock)")
	wait := fs.Duration("timeout", timeout, "how long to wait for "+what)
	return func() (string, error) {
		path := defaultControl(*controlPath, *pidFile)
		switch {
		case path == "":
			return "", errors.New("--control PATH or --pidfile FILE is required")
		case *wait <= 0:
			return "", errors.New("--timeout must be positive")
		}
		return path, nil
	}, wait
}

// upgradeCmd is handoff upgrade: ask a running server to upgrade and print
// its verdict.
func upgradeCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff upgrade", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path, timeout := controlFlags(fs, 2*time.Minute, "the verdict")
	wait := fs.Bool("wait", false, "if the previous generation is still draining, wait for it instead of failing")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	sock, err := path()
	if err != nil || fs.NArg() > 0 {
		return fail(stderr, exitUsage, "handoff upgrade: %v", orUnexpected(err, fs))
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
		switch {
		case o == nil || o.ExitStatus == "":
		case o.PID == 0: // the preflight check, before any new process
			fmt.Fprintf(stderr, "  the preflight check: %s\n", o.ExitStatus)
		default:
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
		case ans.Kind == control.KindInProgress:
			fmt.Fprintf(stderr, "pid %d keeps serving; that upgrade's verdict comes first (handoff status shows it): try again after it\n", ans.PID)
		case ans.Kind == control.KindDraining:
			fmt.Fprintf(stderr, "pid %d keeps serving; try again later, or use --wait to start once the drain is over\n", ans.PID)
		case ans.Kind == control.KindNotReady:
			fmt.Fprintf(stderr, "pid %d is still starting: use --wait to upgrade once it serves\n", ans.PID)
		default:
			fmt.Fprintf(stderr, "pid %d keeps serving\n", ans.PID)
		}
	}
	if ans.Kind.Busy() {
		return exitBusy
	}
	return exitFailure
}

// statusCmd is handoff status: print a running server's generation, phase,
// listeners, children and last upgrade.
func statusCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path, timeout := controlFlags(fs, 10*time.Second, "the answer")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	sock, err := path()
	if err != nil || fs.NArg() > 0 {
		return fail(stderr, exitUsage, "handoff status: %v", orUnexpected(err, fs))
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
		since := c.Since
		if since.IsZero() {
			since = c.Started
		}
		fmt.Fprintf(stdout, "child: pid %d, instance %d, generation %d, %s since %s", c.PID, c.Instance, c.Generation, c.Phase, since.Format(time.RFC3339))
		if !c.Ready.IsZero() {
			fmt.Fprintf(stdout, ", ready in %.1f ms", float64(c.Ready.Sub(c.Started).Microseconds())/1000)
		}
		if c.Restarts > 0 {
			fmt.Fprintf(stdout, ", %d restarts", c.Restarts)
		}
		fmt.Fprintln(stdout)
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

// askFailed maps a failed control request to an exit code, after printing
// why; done is false if err is nil.
func askFailed(cmd string, err error, ctx context.Context, stderr io.Writer) (code int, done bool) {
	switch {
	case err == nil:
		return 0, false
	case errors.Is(err, control.ErrNoAnswer):
		return fail(stderr, exitNoReply, "handoff %s: %v (is handoff serve or handoff run running with --control or --pidfile?)", cmd, err), true
	case ctx.Err() != nil:
		return fail(stderr, exitTimeout, "handoff %s: %v", cmd, err), true
	}
	return fail(stderr, exitFailure, "handoff %s: %v", cmd, err), true
}
