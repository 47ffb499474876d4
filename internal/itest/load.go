package itest

import (
	"bytes"
	"encoding/json"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/loadgen"
)

// Load is the load tool (handoff-v1 load, internal/loadgen) running against
// a server, started by [StartLoad].
type Load struct {
	tb      testing.TB
	cmd     *exec.Cmd
	stdout  bytes.Buffer // written by exec's copier; read once exited is closed
	stderr  bytes.Buffer
	rate    int
	started time.Time
	exited  chan struct{}
}

// StartLoad runs handoff-v1 load --target addr --rate rate --duration 120s
// --json extra... in its own process group, and returns once it holds
// connections to the server at addr. The test's cleanup kills its group and
// waits (10s) for it to be reaped.
func StartLoad(tb testing.TB, addr string, rate int, extra ...string) *Load {
	tb.Helper()
	args := append([]string{"load", "--target", addr, "--rate", strconv.Itoa(rate), "--duration", "120s", "--json"}, extra...)
	l := &Load{tb: tb, rate: rate, exited: make(chan struct{})}
	l.cmd = exec.Command(Binary(tb, "handoff-v1"), args...)
	l.cmd.Env = CleanEnv(nil)
	l.cmd.Stdout = &l.stdout
	l.cmd.Stderr = &l.stderr
	l.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	l.cmd.WaitDelay = 5 * time.Second
	if err := l.cmd.Start(); err != nil {
		tb.Fatalf("start load tool: %v", err)
	}
	l.started = time.Now()
	go func() {
		_ = l.cmd.Wait() // the output is copied in full when it returns
		close(l.exited)
	}()
	pid := l.cmd.Process.Pid
	tb.Cleanup(func() {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if !WaitChan(l.exited, 10*time.Second) {
			tb.Errorf("load tool %d not reaped 10s after SIGKILL", pid)
		}
	})
	_, portStr, err := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	if err != nil || port == 0 {
		tb.Fatalf("load target %q has no port", addr)
	}
	// The request floor of Check counts from when requests flow.
	Eventually(tb, 10*time.Second, func() bool { return ServerConns(port) > 0 }, "load tool connections to port %d", port)
	l.started = time.Now()
	return l
}

// Stop sends SIGINT, waits (60s at most) for the load tool to exit and decodes
// its JSON result. It also returns for how long requests were being sent.
func (l *Load) Stop() (*loadgen.Result, time.Duration) {
	l.tb.Helper()
	sent := time.Since(l.started)
	if err := l.cmd.Process.Signal(syscall.SIGINT); err != nil {
		state := "still running"
		if WaitChan(l.exited, 10*time.Second) {
			state = l.cmd.ProcessState.String()
		}
		l.tb.Fatalf("SIGINT load tool: %v (%s)", err, state)
	}
	if !WaitChan(l.exited, 60*time.Second) {
		l.tb.Fatalf("load tool did not exit within 60s of SIGINT")
	}
	var res loadgen.Result
	if err := json.NewDecoder(bytes.NewReader(l.stdout.Bytes())).Decode(&res); err != nil {
		l.tb.Fatalf("decoding load tool JSON: %v\nexit: %v\nstdout: %.2000s\nstderr: %.2000s",
			err, l.cmd.ProcessState, l.stdout.String(), l.stderr.String())
	}
	return &res, sent
}

// Check asserts, on the result of [Load.Stop], that the load ran (requests
// above 80% of rate*sent) and that no request failed; the load tool must then
// have exited 0.
func (l *Load) Check(tb testing.TB, res *loadgen.Result, sent time.Duration) {
	tb.Helper()
	tb.Logf("load: %d requests, %d ok, %d failed in %v; latency ms p50 %.1f p99 %.1f max %.1f; %d pids",
		res.Requests, res.OK, res.Failed, sent.Round(time.Millisecond), res.Latency.P50, res.Latency.P99, res.Latency.Max, len(res.PIDs))
	if res.Failed != 0 || res.OK != res.Requests {
		tb.Errorf("load: %d of %d requests failed (ok %d); failures by kind %v; first errors:\n%s",
			res.Failed, res.Requests, res.OK, res.Failures, strings.Join(res.Errors, "\n"))
	}
	floor := 0.8 * float64(l.rate) * sent.Seconds()
	if float64(res.Requests) < floor {
		tb.Errorf("load: only %d requests in %v at %d/s, want at least %.0f", res.Requests, sent, l.rate, floor)
	}
	if code := l.cmd.ProcessState.ExitCode(); res.Failed == 0 && code != 0 {
		tb.Errorf("load tool exited %d with zero failures, want 0; stderr: %s", code, l.stderr.String())
	}
}

// StopAndCheck is [Load.Stop] then [Load.Check].
func (l *Load) StopAndCheck(tb testing.TB) *loadgen.Result {
	tb.Helper()
	res, sent := l.Stop()
	l.Check(tb, res, sent)
	return res
}

// PIDStat returns the load tool's statistics for pid.
func PIDStat(res *loadgen.Result, pid int) (loadgen.PIDStat, bool) {
	for _, p := range res.PIDs {
		if p.PID == pid {
			return p, true
		}
	}
	return loadgen.PIDStat{}, false
}
