package main_test

// Integration tests of the operator's side: the control socket (handoff
// upgrade, handoff status), its permissions, sd_notify, socket activation,
// --preflight and --check, and the PID 1 warning. Like integration_test.go
// they drive the real binaries built by bins, every process in its own
// process group that cleanup kills and waits for, traffic to 127.0.0.1 only.
// Helpers of this file are prefixed with ctl so as not to collide with
// other test files of the package.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/control"
)

// ctlCLITimeout bounds every handoff upgrade/status run (exec.CommandContext).
const ctlCLITimeout = 30 * time.Second

// ---------------------------------------------------------------------------
// Starting a server with extra flags, environment, descriptors or a wrapper:
// startServer with serverOpts{cleanEnv: true, ...}.

// ctlEnv is the test's environment without systemd's variables, plus extra.
func ctlEnv(extra []string) []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES":
			continue
		}
		env = append(env, kv)
	}
	return append(env, extra...)
}

// ctlPublicDir makes a directory under os.TempDir() with mode 0755 (t.TempDir
// and its parents are 0700), removed at cleanup.
func ctlPublicDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "handoff-ctl-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	return dir
}

// ---------------------------------------------------------------------------
// Running the CLI.

type ctlResult struct {
	args   []string
	code   int
	stdout string
	stderr string
	took   time.Duration
}

func (r ctlResult) String() string {
	return fmt.Sprintf("handoff %s: exit %d after %v\nstdout: %s\nstderr: %s",
		strings.Join(r.args, " "), r.code, r.took.Round(time.Millisecond), r.stdout, r.stderr)
}

// ctlProc is a CLI run that may still be going.
type ctlProc struct {
	args     []string
	done     chan struct{}
	res      ctlResult
	timedOut bool
}

// ctlStartCLI runs bin args... (as cred when non-nil) in its own process
// group under exec.CommandContext with timeout; the context's end SIGKILLs the
// group. Cleanup kills and reaps it if it is still running.
func ctlStartCLI(tb testing.TB, cred *syscall.Credential, timeout time.Duration, bin string, args ...string) *ctlProc {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	cmd := exec.CommandContext(ctx, bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	cmd.Dir = filepath.Dir(bin)
	cmd.Env = ctlEnv(nil)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: cred}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	started := time.Now()
	if err := cmd.Start(); err != nil {
		cancel()
		tb.Fatalf("start %s %s: %v", bin, strings.Join(args, " "), err)
	}
	pgid := cmd.Process.Pid
	p := &ctlProc{args: args, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		defer cancel()
		_ = cmd.Wait()
		p.timedOut = ctx.Err() != nil
		p.res = ctlResult{args: args, code: cmd.ProcessState.ExitCode(), stdout: stdout.String(),
			stderr: stderr.String(), took: time.Since(started)}
	}()
	tb.Cleanup(func() {
		select {
		case <-p.done:
			return
		default:
		}
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		if !waitChan(p.done, 10*time.Second) {
			tb.Errorf("handoff %s (pid %d) not reaped 10s after SIGKILL", strings.Join(args, " "), pgid)
		}
	})
	return p
}

// wait waits (bounded) for the run to end and returns its result; a run
// killed at its context's deadline fails the test.
func (p *ctlProc) wait(tb testing.TB, timeout time.Duration) ctlResult {
	tb.Helper()
	if !waitChan(p.done, timeout) {
		tb.Fatalf("handoff %s still running after %v", strings.Join(p.args, " "), timeout)
	}
	if p.timedOut {
		tb.Fatalf("handoff %s was killed at the end of its context:\n%v", strings.Join(p.args, " "), p.res)
	}
	return p.res
}

func (p *ctlProc) finished() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// ctlCLI runs bins/handoff-v1 args... to completion (bounded).
func ctlCLI(tb testing.TB, args ...string) ctlResult {
	tb.Helper()
	bin := filepath.Join(bins(tb), "handoff-v1")
	return ctlStartCLI(tb, nil, ctlCLITimeout, bin, args...).wait(tb, ctlCLITimeout+15*time.Second)
}

// ctlUpgrade runs handoff upgrade --pidfile F extra...
func ctlUpgrade(tb testing.TB, s *server, extra ...string) ctlResult {
	tb.Helper()
	r := ctlCLI(tb, append([]string{"upgrade", "--pidfile", s.pidfile}, extra...)...)
	tb.Logf("%s", r)
	return r
}

// ctlStatus runs handoff status --pidfile F --json; it must exit 0.
func ctlStatus(tb testing.TB, s *server) control.Status {
	tb.Helper()
	r := ctlCLI(tb, "status", "--pidfile", s.pidfile, "--json")
	if r.code != 0 {
		tb.Fatalf("handoff status: %v", r)
	}
	var st control.Status
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		tb.Fatalf("handoff status --json: %v\n%v", err, r)
	}
	return st
}

// ctlStatusOf polls handoff status until pid answers: right after a handoff
// the old generation may still answer one last request on the shared socket.
func ctlStatusOf(tb testing.TB, s *server, pid int) control.Status {
	tb.Helper()
	var st control.Status
	eventually(tb, 10*time.Second, func() bool { st = ctlStatus(tb, s); return st.PID == pid },
		"handoff status to be answered by pid %d (last answer from %d)", pid, st.PID)
	return st
}

func ctlJSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

var ctlUpgradedRE = regexp.MustCompile(`^upgraded: pid (\d+) -> (\d+), version (\S+), generation (\d+), ready in ([0-9]+(?:\.[0-9]+)?) ms\n$`)

type ctlUpgraded struct {
	oldPID, newPID, generation int
	version                    string
	readyMS                    float64
}

// ctlParseUpgraded parses handoff upgrade's success line.
func ctlParseUpgraded(tb testing.TB, r ctlResult) ctlUpgraded {
	tb.Helper()
	m := ctlUpgradedRE.FindStringSubmatch(r.stdout)
	if m == nil {
		tb.Fatalf("handoff upgrade stdout %q does not match %s\n%v", r.stdout, ctlUpgradedRE, r)
	}
	var u ctlUpgraded
	u.oldPID, _ = strconv.Atoi(m[1])
	u.newPID, _ = strconv.Atoi(m[2])
	u.version = m[3]
	u.generation, _ = strconv.Atoi(m[4])
	u.readyMS, _ = strconv.ParseFloat(m[5], 64)
	return u
}

// ctlGoodUpgrade deploys version and runs handoff upgrade (extra flags
// appended); it checks the verdict (exit 0, old pid, new pid = PID file,
// version, generation), waits for the new generation to serve and the old one
// to exit, and returns the new pid.
func ctlGoodUpgrade(t *testing.T, s *server, version string, generation int, extra ...string) int {
	t.Helper()
	old := s.pid()
	s.deploy(version)
	r := ctlUpgrade(t, s, extra...)
	if r.code != 0 {
		t.Fatalf("upgrade to %s: exit %d, want 0\n%v", version, r.code, r)
	}
	if r.stderr != "" {
		t.Errorf("upgrade to %s: unexpected stderr %q", version, r.stderr)
	}
	u := ctlParseUpgraded(t, r)
	filePID, err := s.readPID()
	switch {
	case err != nil:
		t.Errorf("PID file right after handoff upgrade exited 0: %v", err)
	case u.newPID != filePID:
		t.Errorf("handoff upgrade names new pid %d, the PID file names %d", u.newPID, filePID)
	}
	if u.oldPID != old {
		t.Errorf("handoff upgrade names old pid %d, want %d", u.oldPID, old)
	}
	if u.newPID == old || u.newPID <= 1 {
		t.Fatalf("handoff upgrade names new pid %d (old %d)", u.newPID, old)
	}
	if u.version != version {
		t.Errorf("handoff upgrade names version %q, want %q", u.version, version)
	}
	if u.generation != generation {
		t.Errorf("handoff upgrade names generation %d, want %d", u.generation, generation)
	}
	if u.readyMS <= 0 || u.readyMS > 30000 {
		t.Errorf("handoff upgrade: ready in %v ms, want within (0, 30000]", u.readyMS)
	}
	s.waitServing(u.newPID, version, 10*time.Second)
	s.version = version
	return u.newPID
}

// ctlNoLog fails when a line with msg (and pred) was logged from mark on.
func ctlNoLog(t *testing.T, s *server, mark int, msg string, pred func(logLine) bool, why string) {
	t.Helper()
	if l, _, ok := s.logs.first(mark, msg, pred); ok {
		t.Errorf("%s: unexpected log line %s", why, l.raw)
	}
}

// ctlKillInGroup SIGKILLs pid after checking that it belongs to the server's
// process group and is not one of the server generations given.
func ctlKillInGroup(t *testing.T, s *server, pid int, notOneOf ...int) {
	t.Helper()
	st, ok := readStat(pid)
	if !ok || st.pgrp != s.pgid || pid <= 1 {
		t.Fatalf("refusing to kill pid %d: not in the server's process group %d (stat %+v, found %v)", pid, s.pgid, st, ok)
	}
	for _, p := range notOneOf {
		if p == pid {
			t.Fatalf("refusing to kill pid %d: it is a server generation", pid)
		}
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill(%d, SIGKILL): %v", pid, err)
	}
}

// ---------------------------------------------------------------------------
// 1. handoff upgrade's verdicts, under load.

func TestUpgradeVerdict(t *testing.T) {
	s := startServer(t, serverOpts{upgradeTimeout: "2s"})
	p1 := s.pid()
	load := startLoad(t, s.bins, s.addr, loadRate, loadArgs()...)

	// A good binary: exit 0, the new pid is the PID file's.
	p2 := ctlGoodUpgrade(t, s, "v2", 2)
	s.waitGone(p1, 20*time.Second)
	s.checkOneProcess(t, p2)
	s.checkListener(t, p2)

	exitLine := regexp.MustCompile(`(?m)^upgrade failed: new process (\d+) exited before ready: exit status 1$`)
	hangLine := regexp.MustCompile(`(?m)^upgrade failed: new process (\d+) timed out before ready and was killed$`)
	cases := []struct {
		name    string
		install func()
		kind    string
		// check inspects handoff upgrade's stderr beyond the common lines
		// and returns the new process's pid when one was started.
		check  func(t *testing.T, stderr string) int
		forked bool
	}{
		{
			name: "missing",
			install: func() {
				if err := os.Remove(s.live); err != nil {
					t.Fatal(err)
				}
			},
			kind: "binary-missing",
			check: func(t *testing.T, stderr string) int {
				want := "upgrade failed: binary missing: " + s.live + ": no such file or directory\n"
				if !strings.HasPrefix(stderr, want) {
					t.Errorf("stderr does not start with %q:\n%s", want, stderr)
				}
				return 0
			},
		},
		{
			name:    "not-executable",
			install: func() { s.deployFile(filepath.Join(s.bins, "handoff-v3"), 0o644) },
			kind:    "binary-not-executable",
			check: func(t *testing.T, stderr string) int {
				first := firstLine(stderr)
				if !strings.HasPrefix(first, "upgrade failed: ") || !strings.Contains(first, s.live) ||
					!strings.Contains(first, "binary not executable") {
					t.Errorf("first stderr line %q, want \"upgrade failed: ...%s...binary not executable...\"", first, s.live)
				}
				return 0
			},
		},
		{
			name:    "exits-1",
			install: func() { s.deployFile(filepath.Join(s.bins, "exit1"), 0o755) },
			kind:    "exited",
			forked:  true,
			check: func(t *testing.T, stderr string) int {
				m := exitLine.FindStringSubmatch(stderr)
				if m == nil {
					t.Errorf("stderr has no line matching %s:\n%s", exitLine, stderr)
					return 0
				}
				n, _ := strconv.Atoi(m[1])
				for _, want := range []string{
					fmt.Sprintf("\n  new process %d: exit status 1\n", n),
					"\n  its last lines of output:\n",
					fmt.Sprintf("\n    testdata-exit1: pid %d failing on purpose\n", n),
				} {
					if !strings.Contains(stderr, want) {
						t.Errorf("stderr lacks %q:\n%s", want, stderr)
					}
				}
				return n
			},
		},
		{
			name:    "hangs",
			install: func() { s.deployFile(filepath.Join(s.bins, "hang"), 0o755) },
			kind:    "timeout",
			forked:  true,
			check: func(t *testing.T, stderr string) int {
				if !strings.Contains(firstLine(stderr), "timed out") {
					t.Errorf("first stderr line %q does not contain \"timed out\"", firstLine(stderr))
				}
				m := hangLine.FindStringSubmatch(stderr)
				if m == nil {
					t.Errorf("stderr has no line matching %s:\n%s", hangLine, stderr)
					return 0
				}
				n, _ := strconv.Atoi(m[1])
				if want := fmt.Sprintf("\n    testdata-hang: pid %d blocking forever\n", n); !strings.Contains(stderr, want) {
					t.Errorf("stderr lacks the hanging process's own line %q:\n%s", want, stderr)
				}
				return n
			},
		},
	}
	for _, c := range cases {
		mark := s.logs.mark()
		c.install()
		r := ctlUpgrade(t, s)
		if r.code != 1 {
			t.Errorf("%s: handoff upgrade exit %d, want 1\n%v", c.name, r.code, r)
		}
		if r.stdout != "" {
			t.Errorf("%s: handoff upgrade stdout %q, want empty", c.name, r.stdout)
		}
		newPID := c.check(t, r.stderr)
		if want := fmt.Sprintf("pid %d keeps serving\n", p2); !strings.HasSuffix(r.stderr, want) {
			t.Errorf("%s: stderr does not end with %q:\n%s", c.name, want, r.stderr)
		}
		if c.name == "hangs" && (r.took < 2*time.Second || r.took > 10*time.Second) {
			t.Errorf("%s: verdict after %v with --upgrade-timeout 2s, want 2s..10s", c.name, r.took)
		}
		if p, err := s.readPID(); err != nil || p != p2 {
			t.Errorf("%s: PID file after a failed upgrade: pid %d err %v, want %d unchanged", c.name, p, err, p2)
		}
		s.waitServing(p2, "v2", 5*time.Second)
		s.checkOneProcess(t, p2)
		if newPID != 0 && alive(newPID) {
			t.Errorf("%s: the failed new process %d is still alive", c.name, newPID)
		}
		ctlNoLog(t, s, mark, "upgrade succeeded", nil, c.name)
		if !c.forked {
			ctlNoLog(t, s, mark, "starting new generation", nil, c.name+": nothing may be forked for a binary that cannot run")
		}
		st := ctlStatusOf(t, s, p2)
		if st.Phase != "serving" || st.LastUpgrade == nil || st.LastUpgrade.OK || string(st.LastUpgrade.Kind) != c.kind ||
			(newPID != 0 && st.LastUpgrade.PID != newPID) {
			t.Errorf("%s: status after the failure: %s, want phase serving, last_upgrade ok=false kind=%s pid=%d",
				c.name, ctlJSON(st), c.kind, newPID)
		}
	}

	// Finally a good binary upgrades.
	p3 := ctlGoodUpgrade(t, s, "v3", 3)
	s.waitGone(p2, 20*time.Second)
	s.checkOneProcess(t, p3)
	s.checkListener(t, p3)

	res, sent := load.stop()
	checkLoad(t, load, res, sent)
	for _, g := range []struct {
		pid     int
		version string
	}{{p1, "v1"}, {p2, "v2"}, {p3, "v3"}} {
		if ps, ok := pidStat(res, g.pid); !ok || ps.Count == 0 || ps.Version != g.version {
			t.Errorf("load tool: pid %d (%s) answered %+v (found %v), want some requests with its version", g.pid, g.version, ps, ok)
		}
	}
}

// ---------------------------------------------------------------------------
// 2. An upgrade asked while the previous generation drains; status phases.

func TestUpgradeDuringDrain(t *testing.T) {
	s := startServer(t, serverOpts{upgradeTimeout: "60s"})
	p1 := s.pid()

	st := ctlStatusOf(t, s, p1)
	if st.Phase != "serving" || st.Generation != 1 || st.Version != "v1" || st.PreviousPID != 0 || st.LastUpgrade != nil {
		t.Errorf("status of a fresh server: %s, want phase serving, generation 1, v1, no previous_pid or last_upgrade", ctlJSON(st))
	}
	if len(st.Listeners) != 1 || st.Listeners[0] != (control.ListenerInfo{Network: "tcp", Addr: s.addr}) {
		t.Errorf("status listeners %+v, want [{tcp %s}]", st.Listeners, s.addr)
	}

	// A slow request keeps generation 1 draining after the first upgrade.
	slow := startRequest(t, s.addr, s.port, "/slow?ms=4000", 30*time.Second)
	p2 := ctlGoodUpgrade(t, s, "v2", 2)
	if !alive(p1) {
		t.Fatalf("precondition: pid %d exited before the checks during its drain (4s request in flight)", p1)
	}

	st = ctlStatusOf(t, s, p2)
	if st.Phase != "draining-previous" || st.PreviousPID != p1 || st.Generation != 2 || st.Version != "v2" {
		t.Errorf("status while pid %d drains: %s, want phase draining-previous, previous_pid %d, generation 2, v2", p1, ctlJSON(st), p1)
	}

	// Without --wait: refused at once.
	s.deploy("v3")
	mark := s.logs.mark()
	r := ctlUpgrade(t, s)
	if r.code != 7 || !strings.HasPrefix(r.stderr, "upgrade failed: previous generation still draining\n") ||
		!strings.HasSuffix(r.stderr, fmt.Sprintf("pid %d keeps serving; try again later, or use --wait\n", p2)) {
		t.Errorf("upgrade without --wait during the drain: exit %d, want 7 (busy) with \"upgrade failed: previous generation still draining\" and \"pid %d keeps serving; try again later, or use --wait\"\n%v", r.code, p2, r)
	}
	r = ctlUpgrade(t, s, "--json")
	var ans control.Answer
	if err := json.Unmarshal([]byte(r.stdout), &ans); err != nil || r.code != 7 || ans.OK || ans.Kind != "draining" || ans.PID != p2 {
		t.Errorf("upgrade --json during the drain: exit %d, answer %s (%v), want exit 7, ok=false, kind draining, pid %d\n%v", r.code, ctlJSON(ans), err, p2, r)
	}
	ctlNoLog(t, s, mark, "starting new generation", nil, "refused upgrade during the drain")
	if !alive(p1) {
		t.Fatalf("precondition: pid %d exited before the --wait upgrade was asked", p1)
	}

	// With --wait: blocks until generation 1 exits, then upgrades.
	mark = s.logs.mark()
	waiting := ctlStartCLI(t, nil, ctlCLITimeout, filepath.Join(s.bins, "handoff-v1"), "upgrade", "--pidfile", s.pidfile, "--wait")
	s.logs.waitLog(t, mark, "upgrade queued", func(l logLine) bool {
		return l.pid() == p2 && l.str("reason") == "previous generation still draining"
	}, 10*time.Second)
	if waiting.finished() {
		t.Errorf("upgrade --wait returned while pid %d was still draining: %v", p1, waiting.res)
	}
	if !alive(p1) {
		t.Fatalf("precondition: pid %d exited before the --wait upgrade was queued", p1)
	}
	// While it waits, no third generation may appear as long as p1 lives.
	var prev map[int]bool
	eventually(t, 30*time.Second, func() bool {
		p1Alive := alive(p1)
		if p, err := s.readPID(); err == nil && p != p1 && p != p2 && p1Alive {
			t.Errorf("PID file names %d while pid %d still drains", p, p1)
			return true
		}
		var ps []int
		if ps, prev = steady(prev, s.procs(), func(p int) int { return p }); len(ps) > 2 {
			t.Errorf("%d live processes %v while an upgrade waits for the drain", len(ps), ps)
			return true
		}
		return waiting.finished()
	}, "handoff upgrade --wait to return")
	r = waiting.wait(t, time.Second)
	t.Logf("%s", r)
	if r.code != 0 {
		t.Fatalf("upgrade --wait: exit %d, want 0\n%v", r.code, r)
	}
	u := ctlParseUpgraded(t, r)
	p3 := u.newPID
	if filePID, err := s.readPID(); err != nil || filePID != p3 {
		t.Errorf("PID file names %d (%v), handoff upgrade --wait names %d", filePID, err, p3)
	}
	if u.oldPID != p2 || p3 == p1 || p3 == p2 || u.version != "v3" || u.generation != 3 {
		t.Errorf("upgrade --wait: %+v, want pid %d -> a third pid, version v3, generation 3", u, p2)
	}
	if alive(p1) {
		t.Errorf("pid %d still alive after the --wait upgrade returned", p1)
	}
	s.waitServing(p3, "v3", 10*time.Second)
	s.version = "v3"

	// Order in the shared output: p1's last line, p2 learns that it exited,
	// p2 runs the queued upgrade, and only then does p3 appear. The lines are
	// written a moment apart from what the test has seen so far: wait for each.
	s.logs.waitLog(t, 0, "exiting", pidIs(p1), 10*time.Second)
	s.logs.waitLog(t, mark, "previous generation exited", pidIs(p2), 10*time.Second)
	s.logs.waitLog(t, mark, "running queued upgrade", pidIs(p2), 10*time.Second)
	s.logs.waitLog(t, 0, "ready", pidIs(p3), 10*time.Second)
	_, p1Idx := s.logs.find(0, "", pidIs(p1))
	_, exitIdx := s.logs.find(0, "exiting", pidIs(p1))
	_, goneIdx := s.logs.find(mark, "previous generation exited", pidIs(p2))
	_, runIdx := s.logs.find(mark, "running queued upgrade", pidIs(p2))
	_, p3Idx := s.logs.find(0, "", pidIs(p3))
	_, readyIdx := s.logs.find(0, "ready", pidIs(p3))
	switch {
	case len(p1Idx) == 0 || len(exitIdx) == 0 || len(goneIdx) == 0 || len(runIdx) == 0 || len(p3Idx) == 0 || len(readyIdx) == 0:
		t.Errorf("missing log lines: p1 %d lines, p1 exiting %v, p2 previous generation exited %v, p2 running queued upgrade %v, p3 %d lines, p3 ready %v",
			len(p1Idx), exitIdx, goneIdx, runIdx, len(p3Idx), readyIdx)
	case !(exitIdx[0] < goneIdx[0] && goneIdx[0] < runIdx[0] && runIdx[0] < p3Idx[0] && p1Idx[len(p1Idx)-1] < p3Idx[0] && p3Idx[0] <= readyIdx[0]):
		t.Errorf("log order: p1 exiting line %d, p2 previous generation exited %d, running queued upgrade %d, p1's last line %d, p3's first line %d, p3 ready %d: the third generation did not wait for the first to exit",
			exitIdx[0], goneIdx[0], runIdx[0], p1Idx[len(p1Idx)-1], p3Idx[0], readyIdx[0])
	}
	s.waitSlowThenSettled(t, slow, p1, p2, p3)

	st = ctlStatusOf(t, s, p3)
	if st.Phase != "serving" || st.PreviousPID != 0 || st.Generation != 3 || st.Version != "v3" {
		t.Errorf("status after the drain: %s, want phase serving, generation 3, v3, no previous_pid", ctlJSON(st))
	}
	t.Logf("status of the third generation after its predecessor drained: %s", ctlJSON(st))

	// A hanging upgrade, asked in the background by a client that gives up
	// after 2s (exit 6): the attempt goes on, status says "upgrading", and a
	// second request is refused as in progress.
	mark = s.logs.mark()
	s.deployFile(filepath.Join(s.bins, "hang"), 0o755)
	bg := ctlStartCLI(t, nil, ctlCLITimeout, filepath.Join(s.bins, "handoff-v1"), "upgrade", "--pidfile", s.pidfile, "--timeout", "2s")
	hangMarker := regexp.MustCompile(`^testdata-hang: pid (\d+) blocking forever$`)
	hl := s.logs.waitLog(t, mark, "", func(l logLine) bool { return hangMarker.MatchString(l.raw) }, 15*time.Second)
	hangPID, _ := strconv.Atoi(hangMarker.FindStringSubmatch(hl.raw)[1])
	st = ctlStatusOf(t, s, p3)
	if st.Phase != "upgrading" || st.Generation != 3 {
		t.Errorf("status during a hanging upgrade: %s, want phase upgrading, generation 3", ctlJSON(st))
	}
	r = ctlUpgrade(t, s, "--json")
	ans = control.Answer{}
	if err := json.Unmarshal([]byte(r.stdout), &ans); err != nil || r.code != 7 || ans.OK || ans.Kind != "in-progress" {
		t.Errorf("upgrade --json during a running upgrade: exit %d, answer %s (%v), want exit 7 (busy), kind in-progress\n%v", r.code, ctlJSON(ans), err, r)
	}
	r = bg.wait(t, 20*time.Second)
	t.Logf("%s", r)
	if r.code != 6 || !strings.Contains(r.stderr, "no verdict within 2s") {
		t.Errorf("background upgrade --timeout 2s of a hanging binary: exit %d, want 6 with \"no verdict within 2s\"\n%v", r.code, r)
	}
	if st = ctlStatusOf(t, s, p3); st.Phase != "upgrading" {
		t.Errorf("status after the client gave up: %s, want phase upgrading (the attempt goes on)", ctlJSON(st))
	}
	// End the attempt: kill the hanging process.
	ctlKillInGroup(t, s, hangPID, p1, p2, p3)
	fail := s.logs.waitLog(t, mark, "upgrade failed", pidIs(p3), 15*time.Second)
	if fail.str("kind") != "exited" {
		t.Errorf("upgrade failed log after killing the hanging process: %s, want kind exited", fail.raw)
	}
	st = ctlStatusOf(t, s, p3)
	if lu := st.LastUpgrade; st.Phase != "serving" || st.PreviousPID != 0 || lu == nil || lu.OK || lu.Kind != "exited" ||
		lu.PID != hangPID || lu.ExitStatus != "signal: killed" || lu.At.IsZero() {
		t.Errorf("status after the failed upgrade: %s, want phase serving, last_upgrade ok=false kind=exited pid=%d exit_status \"signal: killed\"", ctlJSON(st), hangPID)
	}
	if p, err := s.readPID(); err != nil || p != p3 {
		t.Errorf("PID file after the failed upgrade: %d (%v), want %d", p, err, p3)
	}
	s.waitServing(p3, "v3", 5*time.Second)
	s.checkOneProcess(t, p3)
}

// ---------------------------------------------------------------------------
// 3. The control socket refuses other users.

func TestControlSocketPermissions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: running handoff status as uid 65534 needs root (SysProcAttr.Credential); euid is", os.Geteuid())
	}
	dir := ctlPublicDir(t)
	s := startServer(t, serverOpts{cleanEnv: true, dir: dir})
	pid := s.pid()
	sock := s.pidfile + ".sock"
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatalf("control socket: %v", err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket %s has mode %v, want a socket with permissions 0600", sock, fi.Mode())
	}

	cli := filepath.Join(dir, "handoff-cli")
	copyFile(t, filepath.Join(s.bins, "handoff-v1"), cli, 0o755)
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534}
	asNobody := func(args ...string) ctlResult {
		t.Helper()
		r := ctlStartCLI(t, nobody, ctlCLITimeout, cli, args...).wait(t, ctlCLITimeout+15*time.Second)
		t.Logf("as uid 65534: %s", r)
		return r
	}
	// Precondition: uid 65534 can run the binary at all.
	if r := asNobody("version"); r.code != 0 || strings.TrimSpace(r.stdout) != "v1" {
		t.Fatalf("precondition: uid 65534 cannot run %s version: %v", cli, r)
	}

	// Mode 0600: the kernel refuses the connection.
	mark := s.logs.mark()
	r := asNobody("status", "--pidfile", s.pidfile)
	if r.code != 5 || !strings.Contains(r.stderr, "permission denied") || !strings.Contains(r.stderr, "no answer on control socket") {
		t.Errorf("status as uid 65534 on a 0600 socket: exit %d, want 5 with \"no answer on control socket\" and \"permission denied\"\n%v", r.code, r)
	}
	ctlNoLog(t, s, mark, "control request refused", nil, "the kernel refused uid 65534; the server saw nothing")

	// Mode 0666: the server refuses the peer. The client writes its request
	// while the server may already be answering and closing, so the verdict
	// is asked several times: every one must be the server's refusal.
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	wantRefusal := "permission denied: uid 65534 may not use this control socket"
	refused := func(what string, runs int, args ...string) {
		t.Helper()
		codes := map[int]int{}
		var bad []ctlResult
		for range runs {
			r := ctlStartCLI(t, nobody, ctlCLITimeout, cli, args...).wait(t, ctlCLITimeout+15*time.Second)
			codes[r.code]++
			if r.code != 1 || !strings.Contains(r.stderr, wantRefusal) || r.stdout != "" {
				bad = append(bad, r)
			}
		}
		t.Logf("%s as uid 65534 on a 0666 socket, %d runs: exit codes %v", what, runs, codes)
		if len(bad) > 0 {
			t.Errorf("%s as uid 65534 on a 0666 socket: %d of %d runs were not exit 1 with %q and no stdout (exit codes %v); first:\n%v",
				what, len(bad), runs, wantRefusal, codes, bad[0])
		}
	}
	refused("status", 20, "status", "--pidfile", s.pidfile)
	l := s.logs.waitLog(t, mark, "control request refused", pidIs(pid), 5*time.Second)
	if l.str("level") != "WARN" || !strings.Contains(l.str("error"), "uid 65534") {
		t.Errorf("refusal log line: %s, want level WARN and an error naming uid 65534", l.raw)
	}
	if !poll(5*time.Second, func() bool {
		ls, _ := s.logs.find(mark, "control request refused", pidIs(pid))
		return len(ls) >= 20
	}) {
		t.Errorf("fewer than 20 control request refused log lines for 20 status requests of uid 65534")
	}
	if ls, _ := s.logs.find(mark, "control request refused", pidIs(pid)); len(ls) != 20 {
		t.Errorf("%d control request refused log lines for 20 status requests of uid 65534", len(ls))
	}

	// An upgrade asked by uid 65534 is refused too, and nothing happens.
	s.deploy("v2")
	mark = s.logs.mark()
	refused("upgrade --json", 5, "upgrade", "--pidfile", s.pidfile, "--json")
	s.logs.waitLog(t, mark, "control request refused", pidIs(pid), 5*time.Second)
	ctlNoLog(t, s, mark, "upgrade requested", nil, "upgrade refused to uid 65534")
	ctlNoLog(t, s, mark, "starting new generation", nil, "upgrade refused to uid 65534")
	if p, err := s.readPID(); err != nil || p != pid {
		t.Errorf("PID file after a refused upgrade: %d (%v), want %d", p, err, pid)
	}

	// The server keeps serving and answering root.
	resp, err := get(s.addr, "/")
	if err != nil || resp.status != 200 || resp.body != "Hello World !!!" || resp.pid != pid {
		t.Errorf("GET / after the refusals: %+v %v, want 200 \"Hello World !!!\" from pid %d", resp, err, pid)
	}
	if st := ctlStatus(t, s); st.PID != pid || st.Phase != "serving" {
		t.Errorf("status as root after the refusals: %s, want pid %d serving", ctlJSON(st), pid)
	}
	s.checkOneProcess(t, pid)
}

// ---------------------------------------------------------------------------
// 4. sd_notify: the exact sequence of messages and their senders.

type ctlNotifyMsg struct {
	pid  int
	text string
}

type ctlNotifySocket struct {
	path string
	conn *net.UnixConn
	done chan struct{}

	mu   sync.Mutex
	msgs []ctlNotifyMsg
	errs []string
}

// ctlListenNotify makes a unixgram socket with SO_PASSCRED and records every
// datagram with its sender's PID until cleanup closes it.
func ctlListenNotify(t *testing.T) *ctlNotifySocket {
	t.Helper()
	n := &ctlNotifySocket{path: filepath.Join(t.TempDir(), "notify.sock"), done: make(chan struct{})}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n.conn = conn
	raw, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) }); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	go func() {
		defer close(n.done)
		buf := make([]byte, 64<<10)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)*4)
		for {
			nb, noob, flags, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return // closed at cleanup
			}
			m := ctlNotifyMsg{text: string(buf[:nb])}
			var problem string
			if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
				problem = fmt.Sprintf("truncated datagram (flags %#x)", flags)
			}
			scms, err := unix.ParseSocketControlMessage(oob[:noob])
			if err != nil {
				problem = "parse control message: " + err.Error()
			}
			for i := range scms {
				if cred, err := unix.ParseUnixCredentials(&scms[i]); err == nil {
					m.pid = int(cred.Pid)
				}
			}
			if m.pid == 0 && problem == "" {
				problem = "no sender credentials"
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, m)
			if problem != "" {
				n.errs = append(n.errs, fmt.Sprintf("%q: %s", m.text, problem))
			}
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		if !waitChan(n.done, 5*time.Second) {
			t.Errorf("notify socket reader did not stop")
		}
	})
	return n
}

func (n *ctlNotifySocket) snapshot() ([]ctlNotifyMsg, []string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]ctlNotifyMsg(nil), n.msgs...), append([]string(nil), n.errs...)
}

// flush sends a sentinel datagram from the test and waits until it is read:
// every datagram queued before it has been recorded. It returns them.
func (n *ctlNotifySocket) flush(t *testing.T) []ctlNotifyMsg {
	t.Helper()
	sentinel := fmt.Sprintf("TEST-FLUSH-%d", time.Now().UnixNano())
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(sentinel)); err != nil {
		t.Fatal(err)
	}
	var msgs []ctlNotifyMsg
	eventually(t, 10*time.Second, func() bool {
		msgs, _ = n.snapshot()
		for i, m := range msgs {
			if m.text == sentinel {
				msgs = msgs[:i]
				return true
			}
		}
		return false
	}, "the sentinel datagram on the notify socket")
	return msgs
}

func TestNotifySequence(t *testing.T) {
	ns := ctlListenNotify(t)
	s := startServer(t, serverOpts{cleanEnv: true, env: []string{"NOTIFY_SOCKET=" + ns.path}})
	p1 := s.pid()

	p2 := ctlGoodUpgrade(t, s, "v2", 2)
	s.waitGone(p1, 20*time.Second)

	s.deployFile(filepath.Join(s.bins, "exit1"), 0o755)
	r := ctlUpgrade(t, s)
	if r.code != 1 || !strings.Contains(r.stderr, "exit status 1") {
		t.Errorf("upgrade to exit1: exit %d, want 1 with \"exit status 1\"\n%v", r.code, r)
	}

	s.signal(p2, syscall.SIGTERM)
	eventually(t, 15*time.Second, func() bool { return !alive(p2) }, "pid %d to exit after SIGTERM", p2)
	if !waitChan(s.exited, 10*time.Second) {
		t.Fatalf("first process not reaped")
	}
	var nowTS unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &nowTS); err != nil {
		t.Fatal(err)
	}
	nowUsec := uint64(nowTS.Nano() / 1000)
	msgs := ns.flush(t)
	_, problems := ns.snapshot()
	for _, p := range problems {
		t.Errorf("notify datagram: %s", p)
	}

	var lastMono uint64
	// sd_notify assignments are newline-separated; go-systemd ends
	// MONOTONIC_USEC with a newline, which systemd ignores: one trailing
	// newline is allowed.
	reloading := func(text string) error {
		lines := strings.Split(strings.TrimSuffix(text, "\n"), "\n")
		if len(lines) != 2 || lines[0] != "RELOADING=1" {
			return errors.New("want exactly RELOADING=1\\nMONOTONIC_USEC=N")
		}
		v, ok := strings.CutPrefix(lines[1], "MONOTONIC_USEC=")
		n, err := strconv.ParseUint(v, 10, 64)
		if !ok || err != nil || n == 0 {
			return fmt.Errorf("MONOTONIC_USEC %q is not an integer > 0", lines[1])
		}
		if n > nowUsec || n <= lastMono {
			return fmt.Errorf("MONOTONIC_USEC %d not in (previous %d, now %d]", n, lastMono, nowUsec)
		}
		lastMono = n
		return nil
	}
	exact := func(want string) func(string) error {
		return func(text string) error {
			if text != want {
				return fmt.Errorf("want %q", want)
			}
			return nil
		}
	}
	failed := func(text string) error {
		if !strings.HasPrefix(text, "STATUS=upgrade failed: ") || strings.Contains(text, "\n") || !strings.Contains(text, "exit status 1") {
			return errors.New(`want one line "STATUS=upgrade failed: ...exit status 1..."`)
		}
		return nil
	}
	want := []struct {
		pid   int
		what  string
		check func(string) error
	}{
		{p1, "gen 1 ready", exact(fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=serving: generation 1, version v1", p1))},
		{p1, "gen 1 reloading", reloading},
		{p2, "gen 2 ready", exact(fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=serving: generation 2, version v2", p2))},
		{p2, "gen 2 reloading", reloading},
		{p2, "gen 2 upgrade failed", failed},
		{p2, "gen 2 ready again", exact("READY=1")},
		{p2, "gen 2 stopping", exact("STOPPING=1")},
	}
	var got strings.Builder
	for i, m := range msgs {
		fmt.Fprintf(&got, "  %d. pid %d: %q\n", i+1, m.pid, m.text)
	}
	t.Logf("notify datagrams (p1 %d, p2 %d):\n%s", p1, p2, got.String())
	if len(msgs) != len(want) {
		t.Errorf("%d notify datagrams, want %d", len(msgs), len(want))
	}
	for i := 0; i < len(want) && i < len(msgs); i++ {
		w, m := want[i], msgs[i]
		if m.pid != w.pid {
			t.Errorf("datagram %d (%s): sent by pid %d, want %d: %q", i+1, w.what, m.pid, w.pid, m.text)
		}
		if err := w.check(m.text); err != nil {
			t.Errorf("datagram %d (%s): %q: %v", i+1, w.what, m.text, err)
		}
	}
	for _, m := range msgs {
		if m.pid == p1 && strings.Contains(m.text, "STOPPING=1") {
			t.Errorf("generation 1 (pid %d), which handed off, sent STOPPING=1: %q", p1, m.text)
		}
	}
}

// ---------------------------------------------------------------------------
// 5. Socket activation.

func TestSocketActivation(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	port := ln.Addr().(*net.TCPAddr).Port
	f, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var stt unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &stt); err != nil {
		t.Fatal(err)
	}
	inode := stt.Ino
	if ins := listenInodes(port); len(ins) != 1 || ins[0] != inode {
		t.Fatalf("precondition: LISTEN inodes on %s %v, want the test's socket [%d]", addr, ins, inode)
	}

	s := startServer(t, serverOpts{
		cleanEnv:   true,
		listen:     addr,
		extraFiles: []*os.File{f},
		wrap:       []string{"/bin/sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec "$0" "$@"`},
	})
	// From now on only the server holds the socket.
	f.Close()
	ln.Close()
	p1 := s.pid()
	if p1 != s.cmd.Process.Pid {
		t.Fatalf("PID file names %d, the started process is %d: the wrapper did not exec", p1, s.cmd.Process.Pid)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p1))
	if err != nil || !bytes.Contains(env, []byte(fmt.Sprintf("\x00LISTEN_PID=%d\x00", p1))) {
		t.Fatalf("precondition: /proc/%d/environ lacks LISTEN_PID=%d (%v)", p1, p1, err)
	}

	sd := s.logs.waitLog(t, 0, "socket from systemd", pidIs(p1), 5*time.Second)
	if sd.str("name") != "http" || sd.str("addr") != addr {
		t.Errorf("socket from systemd log: %s, want name http addr %s", sd.raw, addr)
	}
	ctlNoLog(t, s, 0, "socket from systemd not used by any listener: closing it", nil, "the passed socket matches --listen")
	if s.addr != addr || s.inode != inode {
		t.Errorf("server listens on %s inode %d, want the test's socket %s inode %d", s.addr, s.inode, addr, inode)
	}
	s.checkListener(t, p1)
	if resp, err := get(s.addr, "/"); err != nil || resp.status != 200 || resp.pid != p1 {
		t.Errorf("GET / with only the server holding the socket: %+v %v, want 200 from %d", resp, err, p1)
	}

	mark := s.logs.mark()
	p2 := ctlGoodUpgrade(t, s, "v2", 2)
	s.waitGone(p1, 20*time.Second)
	s.checkListener(t, p2)
	s.checkOneProcess(t, p2)
	ctlNoLog(t, s, mark, "socket from systemd", nil, "the second generation inherits the socket from the first, not from systemd")
	if l, _, ok := s.logs.first(mark, "listening", pidIs(p2)); !ok || l.str("addr") != addr {
		t.Errorf("second generation listening log: %s (found %v), want addr %s", l.raw, ok, addr)
	}
	env2, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p2))
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range bytes.Split(env2, []byte{0}) {
		if bytes.HasPrefix(kv, []byte("LISTEN_")) {
			t.Errorf("second generation (pid %d) has %s in its environment: LISTEN_* leaked across the upgrade", p2, kv)
		}
	}
	if resp, err := get(s.addr, "/hello/systemd"); err != nil || resp.status != 200 || resp.pid != p2 || resp.body != "Hello systemd!!!" {
		t.Errorf("GET /hello/systemd after the upgrade: %+v %v, want 200 from %d", resp, err, p2)
	}
}

// ---------------------------------------------------------------------------
// 6. --preflight and --check.

func TestPreflight(t *testing.T) {
	s := startServer(t, serverOpts{cleanEnv: true, args: []string{"--preflight"}})
	p1 := s.pid()

	mark := s.logs.mark()
	s.deployFile(filepath.Join(s.bins, "exit1"), 0o755)
	r := ctlUpgrade(t, s, "--json")
	var ans control.Answer
	if err := json.Unmarshal([]byte(r.stdout), &ans); err != nil {
		t.Fatalf("upgrade --json: %v\n%v", err, r)
	}
	if r.code != 1 || ans.OK || ans.Kind != "preflight" || ans.PID != p1 || !strings.HasPrefix(ans.Error, "preflight check failed: exit status 1") {
		t.Errorf("preflight of exit1: exit %d, answer %s, want exit 1, ok=false, kind preflight, pid %d, error \"preflight check failed: exit status 1...\"", r.code, r.stdout, p1)
	}
	if o := ans.Upgrade; o == nil || o.Kind != "preflight" || o.ExitStatus != "exit status 1" ||
		len(o.Stderr) == 0 || !strings.HasPrefix(o.Stderr[len(o.Stderr)-1], "testdata-exit1: pid ") {
		t.Errorf("preflight outcome: %s, want kind preflight, exit_status \"exit status 1\", output ending with the exit1 line", ctlJSON(ans.Upgrade))
	}
	pf := s.logs.waitLog(t, mark, "preflight", pidIs(p1), 5*time.Second)
	if !strings.Contains(pf.raw, `"--check"`) || !strings.Contains(pf.raw, `"--preflight"`) {
		t.Errorf("preflight log line does not show the check arguments: %s", pf.raw)
	}
	fl := s.logs.waitLog(t, mark, "upgrade failed", pidIs(p1), 5*time.Second)
	if fl.str("kind") != "preflight" {
		t.Errorf("upgrade failed log: %s, want kind preflight", fl.raw)
	}
	ctlNoLog(t, s, mark, "starting new generation", nil, "failed preflight")
	ctlNoLog(t, s, mark, "started by previous generation", nil, "failed preflight")
	if p, err := s.readPID(); err != nil || p != p1 {
		t.Errorf("PID file after a failed preflight: %d (%v), want %d", p, err, p1)
	}
	s.waitServing(p1, "v1", 5*time.Second)
	s.checkOneProcess(t, p1)

	mark = s.logs.mark()
	p2 := ctlGoodUpgrade(t, s, "v2", 2)
	s.logs.waitLog(t, mark, "preflight", pidIs(p1), 5*time.Second)
	s.waitGone(p1, 20*time.Second)
	s.checkListener(t, p2)
	s.checkOneProcess(t, p2)

	// serve --check: exit 0 without binding or writing anything; 4 when the
	// PID file's directory is missing.
	dir := t.TempDir()
	pidfile := filepath.Join(dir, "x.pid")
	r = ctlCLI(t, "serve", "--check", "--listen", "127.0.0.1:0", "--pidfile", pidfile)
	t.Logf("%s", r)
	if r.code != 0 || !strings.Contains(r.stderr, "ok (version v1)") {
		t.Errorf("serve --check: exit %d, want 0 with \"ok (version v1)\"\n%v", r.code, r)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("serve --check left files in %s: %v (%v), want none (no PID file, no control socket)", dir, ents, err)
	}
	r = ctlCLI(t, "serve", "--check", "--listen", "127.0.0.1:0", "--pidfile", filepath.Join(dir, "missing", "x.pid"))
	t.Logf("%s", r)
	if r.code != 4 || !strings.Contains(r.stderr, "cannot write pid file") {
		t.Errorf("serve --check with a PID file in a missing directory: exit %d, want 4 with \"cannot write pid file\"\n%v", r.code, r)
	}
}

// ---------------------------------------------------------------------------
// 7. The PID 1 warning.

func TestPID1Warning(t *testing.T) {
	b := bins(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("skipped: no unshare command to run handoff as PID 1 of a PID namespace")
	}
	probe := ctlStartCLI(t, nil, 15*time.Second, unshare, "--pid", "--fork", "--mount-proc", "true").wait(t, 30*time.Second)
	if probe.code != 0 {
		t.Skipf("skipped: unshare --pid --fork --mount-proc true does not work here (needs root or user namespaces): %v", probe)
	}

	cmd := exec.Command(unshare, "--pid", "--fork", filepath.Join(b, "handoff-v1"), "serve",
		"--listen", "127.0.0.1:0", "--log-format", "json")
	cmd.Dir = t.TempDir()
	cmd.Env = ctlEnv(nil)
	logs, exited := startPiped(t, cmd, "server output", 100)
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		waitGroupGone(t, pgid, exited, logs, "unshare")
	})

	w := logs.waitLog(t, 0, "", func(l logLine) bool { return strings.Contains(l.msg(), "running as PID 1") }, 15*time.Second)
	t.Logf("PID 1 warning: %s", w.raw)
	if w.str("level") != "WARN" || w.pid() != 1 {
		t.Errorf("PID 1 log line: %s, want level WARN from pid 1", w.raw)
	}
	l := logs.waitLog(t, 0, "listening", nil, 15*time.Second)
	logs.waitLog(t, 0, "ready", nil, 15*time.Second)
	resp, err := get(l.str("addr"), "/healthz")
	if err != nil || resp.status != 200 || resp.pid != 1 {
		t.Errorf("GET /healthz from the server in its PID namespace: %+v %v, want 200 with Handoff-Pid 1", resp, err)
	}
}
