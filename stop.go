// stop.go holds handoff stop: a graceful stop through the control socket.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
)

// stopCmd is handoff stop: ask a running server (serve or run) to stop
// gracefully, wait for its drain and print what it did. It exits 0 when the
// drain finished, 1 when it was cut at its deadline.
func stopCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff stop", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path, timeout := controlFlags(fs, 2*time.Minute, "the drain to end")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	sock, err := path()
	if err != nil || fs.NArg() > 0 {
		return fail(stderr, exitUsage, "handoff stop: %v", orUnexpected(err, fs))
	}
	ctx, cancel := context.WithTimeoutCause(context.Background(), *timeout,
		fmt.Errorf("the drain did not end within %v; it goes on: run handoff status", *timeout))
	defer cancel()
	ans, err := control.Ask(ctx, sock, control.Request{Cmd: control.CmdStop})
	if code, done := askFailed("stop", err, ctx, stderr); done {
		return code
	}
	if *asJSON {
		json.NewEncoder(stdout).Encode(ans)
	}
	d := ans.Stop
	if !ans.OK || d == nil {
		if !*asJSON {
			fmt.Fprintf(stderr, "handoff stop: %s\n", ans.Error)
		}
		return exitFailure
	}
	if !*asJSON {
		fmt.Fprintf(stdout, "stopped: pid %d, drained in %.1f ms: %d requests answered, %d connections closed",
			ans.PID, d.DurationMS, d.Requests, d.Closed)
		if d.Children > 0 {
			fmt.Fprintf(stdout, ", %d children stopped", d.Children)
		}
		fmt.Fprintf(stdout, ", %d cut\n", d.Cut+d.Killed)
		if !d.Clean() {
			fmt.Fprintf(stderr, "handoff stop: the drain was cut short: %s\n", orString(d.Error, "children killed at the deadline"))
		}
	}
	if !d.Clean() {
		return exitFailure
	}
	return exitOK
}

func orString(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
