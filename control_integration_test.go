package main_test

// Integration tests of the operator's side: the control socket (handoff
// upgrade, handoff status), its permissions, sd_notify, socket activation,
// --preflight and --check, and the PID 1 warning (see helpers_test.go for
// the harness).

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/itest"
)

// settledStatus polls handoff status (10s) until pid answers in a phase other
// than the transient ones given. The server publishes its phase a moment after
// what the test waited for (a verdict, a log line, the exit of its predecessor),
// so a status asked at once may still show the phase before.
func settledStatus(t *testing.T, s *itest.Server, pid int, transient ...string) control.Status {
	t.Helper()
	var st control.Status
	if !itest.Poll(10*time.Second, func() bool {
		st = s.Status(t)
		return st.PID == pid && !slices.Contains(transient, string(st.Phase))
	}) {
		t.Fatalf("handoff status not answered by pid %d in a phase other than %v within 10s; last answer: %s", pid, transient, itest.JSON(st))
	}
	return st
}

// ---------------------------------------------------------------------------
// 1. handoff upgrade's verdicts, under load.

func TestUpgradeVerdict(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "2s"})
	p1 := s.LivePID()
	load := itest.StartLoad(t, s.Addr, loadRate, loadArgs()...)

	// A good binary: exit 0, the new pid is the PID file's.
	p2 := s.GoodUpgrade(t, "v2", 2)
	s.WaitGone(p1, 20*time.Second)
	s.CheckOneProcess(t, p2)
	s.CheckListener(t, p2)

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
				if err := os.Remove(s.Live); err != nil {
					t.Fatal(err)
				}
			},
			kind: "binary-missing",
			check: func(t *testing.T, stderr string) int {
				want := "upgrade failed: binary missing: " + s.Live + ": no such file or directory\n"
				if !strings.HasPrefix(stderr, want) {
					t.Errorf("stderr does not start with %q:\n%s", want, stderr)
				}
				return 0
			},
		},
		{
			name:    "not-executable",
			install: func() { s.DeployFile(itest.Binary(t, "handoff-v3"), 0o644) },
			kind:    "binary-not-executable",
			check: func(t *testing.T, stderr string) int {
				first := firstLine(stderr)
				if !strings.HasPrefix(first, "upgrade failed: ") || !strings.Contains(first, s.Live) ||
					!strings.Contains(first, "binary not executable") {
					t.Errorf("first stderr line %q, want \"upgrade failed: ...%s...binary not executable...\"", first, s.Live)
				}
				return 0
			},
		},
		{
			name:    "exits-1",
			install: func() { s.DeployFile(itest.Binary(t, "exit1"), 0o755) },
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
			install: func() { s.DeployFile(itest.Binary(t, "hang"), 0o755) },
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
		mark := s.Logs.Mark()
		c.install()
		r := s.UpgradeCLI(t)
		if r.Code != 1 {
			t.Errorf("%s: handoff upgrade exit %d, want 1\n%v", c.name, r.Code, r)
		}
		if r.Stdout != "" {
			t.Errorf("%s: handoff upgrade stdout %q, want empty", c.name, r.Stdout)
		}
		newPID := c.check(t, r.Stderr)
		if want := fmt.Sprintf("pid %d keeps serving\n", p2); !strings.HasSuffix(r.Stderr, want) {
			t.Errorf("%s: stderr does not end with %q:\n%s", c.name, want, r.Stderr)
		}
		if c.name == "hangs" && (r.Took < 2*time.Second || r.Took > 10*time.Second) {
			t.Errorf("%s: verdict after %v with --upgrade-timeout 2s, want 2s..10s", c.name, r.Took)
		}
		if p, err := s.ReadPID(); err != nil || p != p2 {
			t.Errorf("%s: PID file after a failed upgrade: pid %d err %v, want %d unchanged", c.name, p, err, p2)
		}
		s.WaitServing(p2, "v2", 5*time.Second)
		s.CheckOneProcess(t, p2)
		if newPID != 0 && itest.Alive(newPID) {
			t.Errorf("%s: the failed new process %d is still alive", c.name, newPID)
		}
		s.Logs.None(t, mark, "upgrade succeeded", nil, c.name)
		if !c.forked {
			s.Logs.None(t, mark, "starting new generation", nil, c.name+": nothing may be forked for a binary that cannot run")
		}
		st := settledStatus(t, s, p2, "upgrading")
		if st.Phase != "serving" || st.LastUpgrade == nil || st.LastUpgrade.OK || string(st.LastUpgrade.Kind) != c.kind ||
			(newPID != 0 && st.LastUpgrade.PID != newPID) {
			t.Errorf("%s: status after the failure: %s, want phase serving, last_upgrade ok=false kind=%s pid=%d",
				c.name, itest.JSON(st), c.kind, newPID)
		}
	}

	// Finally a good binary upgrades.
	p3 := s.GoodUpgrade(t, "v3", 3)
	s.WaitGone(p2, 20*time.Second)
	s.CheckOneProcess(t, p3)
	s.CheckListener(t, p3)

	res, sent := load.Stop()
	load.Check(t, res, sent)
	for _, g := range []struct {
		pid     int
		version string
	}{{p1, "v1"}, {p2, "v2"}, {p3, "v3"}} {
		if ps, ok := itest.PIDStat(res, g.pid); !ok || ps.Count == 0 || ps.Version != g.version {
			t.Errorf("load tool: pid %d (%s) answered %+v (found %v), want some requests with its version", g.pid, g.version, ps, ok)
		}
	}
}

// ---------------------------------------------------------------------------
// 2. An upgrade asked while the previous generation drains; status phases.

func TestUpgradeDuringDrain(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "60s"})
	p1 := s.LivePID()

	st := settledStatus(t, s, p1, "starting")
	if st.Phase != "serving" || st.Generation != 1 || st.Version != "v1" || st.PreviousPID != 0 || st.LastUpgrade != nil {
		t.Errorf("status of a fresh server: %s, want phase serving, generation 1, v1, no previous_pid or last_upgrade", itest.JSON(st))
	}
	if len(st.Listeners) != 1 || st.Listeners[0] != (control.ListenerInfo{Network: "tcp", Addr: s.Addr}) {
		t.Errorf("status listeners %+v, want [{tcp %s}]", st.Listeners, s.Addr)
	}

	// A slow request keeps generation 1 draining after the first upgrade.
	slow := itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=4000", 30*time.Second)
	p2 := s.GoodUpgrade(t, "v2", 2)
	if !itest.Alive(p1) {
		t.Fatalf("precondition: pid %d exited before the checks during its drain (4s request in flight)", p1)
	}

	st = settledStatus(t, s, p2, "starting")
	if st.Phase != "draining-previous" || st.PreviousPID != p1 || st.Generation != 2 || st.Version != "v2" {
		t.Errorf("status while pid %d drains: %s, want phase draining-previous, previous_pid %d, generation 2, v2", p1, itest.JSON(st), p1)
	}

	// Without --wait: refused at once.
	s.Deploy("v3")
	mark := s.Logs.Mark()
	r := s.UpgradeCLI(t)
	if r.Code != 7 || !strings.HasPrefix(r.Stderr, "upgrade failed: previous generation still draining\n") ||
		!strings.HasSuffix(r.Stderr, fmt.Sprintf("pid %d keeps serving; try again later, or use --wait to start once the drain is over\n", p2)) {
		t.Errorf("upgrade without --wait during the drain: exit %d, want 7 (busy) with \"upgrade failed: previous generation still draining\" and \"pid %d keeps serving; try again later, or use --wait to start once the drain is over\"\n%v", r.Code, p2, r)
	}
	r = s.UpgradeCLI(t, "--json")
	var ans control.Answer
	if err := json.Unmarshal([]byte(r.Stdout), &ans); err != nil || r.Code != 7 || ans.OK || ans.Kind != "draining" || ans.PID != p2 {
		t.Errorf("upgrade --json during the drain: exit %d, answer %s (%v), want exit 7, ok=false, kind draining, pid %d\n%v", r.Code, itest.JSON(ans), err, p2, r)
	}
	s.Logs.None(t, mark, "starting new generation", nil, "refused upgrade during the drain")
	if !itest.Alive(p1) {
		t.Fatalf("precondition: pid %d exited before the --wait upgrade was asked", p1)
	}

	// With --wait: blocks until generation 1 exits, then upgrades.
	mark = s.Logs.Mark()
	waiting := itest.StartCLI(t, "upgrade", "--pidfile", s.PIDFile, "--wait")
	s.Logs.Wait(t, mark, "upgrade queued", func(l itest.Line) bool {
		return l.PID() == p2 && l.Str("reason") == "previous generation still draining"
	}, 10*time.Second)
	if waiting.Done() {
		t.Errorf("upgrade --wait returned while pid %d was still draining: %v", p1, waiting.Wait(t, time.Second))
	}
	if !itest.Alive(p1) {
		t.Fatalf("precondition: pid %d exited before the --wait upgrade was queued", p1)
	}
	// While it waits, no third generation may appear as long as p1 lives.
	var prev map[int]bool
	itest.Eventually(t, 30*time.Second, func() bool {
		p1Alive := itest.Alive(p1)
		if p, err := s.ReadPID(); err == nil && p != p1 && p != p2 && p1Alive {
			t.Errorf("PID file names %d while pid %d still drains", p, p1)
			return true
		}
		var ps []int
		if ps, prev = itest.SteadyPIDs(prev, s.Procs()); len(ps) > 2 {
			t.Errorf("%d live processes %v while an upgrade waits for the drain", len(ps), ps)
			return true
		}
		return waiting.Done()
	}, "handoff upgrade --wait to return")
	r = waiting.Wait(t, time.Second)
	t.Logf("%s", r)
	if r.Code != 0 {
		t.Fatalf("upgrade --wait: exit %d, want 0\n%v", r.Code, r)
	}
	u := itest.ParseUpgraded(t, r)
	p3 := u.NewPID
	if filePID, err := s.ReadPID(); err != nil || filePID != p3 {
		t.Errorf("PID file names %d (%v), handoff upgrade --wait names %d", filePID, err, p3)
	}
	if u.OldPID != p2 || p3 == p1 || p3 == p2 || u.Version != "v3" || u.Generation != 3 {
		t.Errorf("upgrade --wait: %+v, want pid %d -> a third pid, version v3, generation 3", u, p2)
	}
	if itest.Alive(p1) {
		t.Errorf("pid %d still alive after the --wait upgrade returned", p1)
	}
	s.WaitServing(p3, "v3", 10*time.Second)
	s.Version = "v3"

	// Order in the shared output: p1's last line, p2 learns that it exited,
	// p2 runs the queued upgrade, and only then does p3 appear. The lines are
	// written a moment apart from what the test has seen so far: wait for each.
	s.Logs.Wait(t, 0, "exiting", itest.PIDIs(p1), 10*time.Second)
	s.Logs.Wait(t, mark, "previous generation exited", itest.PIDIs(p2), 10*time.Second)
	s.Logs.Wait(t, mark, "running queued upgrade", itest.PIDIs(p2), 10*time.Second)
	s.Logs.Wait(t, 0, "ready", itest.PIDIs(p3), 10*time.Second)
	_, p1Idx := s.Logs.Find(0, "", itest.PIDIs(p1))
	_, exitIdx := s.Logs.Find(0, "exiting", itest.PIDIs(p1))
	_, goneIdx := s.Logs.Find(mark, "previous generation exited", itest.PIDIs(p2))
	_, runIdx := s.Logs.Find(mark, "running queued upgrade", itest.PIDIs(p2))
	_, p3Idx := s.Logs.Find(0, "", itest.PIDIs(p3))
	_, readyIdx := s.Logs.Find(0, "ready", itest.PIDIs(p3))
	switch {
	case len(p1Idx) == 0 || len(exitIdx) == 0 || len(goneIdx) == 0 || len(runIdx) == 0 || len(p3Idx) == 0 || len(readyIdx) == 0:
		t.Errorf("missing log lines: p1 %d lines, p1 exiting %v, p2 previous generation exited %v, p2 running queued upgrade %v, p3 %d lines, p3 ready %v",
			len(p1Idx), exitIdx, goneIdx, runIdx, len(p3Idx), readyIdx)
	case !(exitIdx[0] < goneIdx[0] && goneIdx[0] < runIdx[0] && runIdx[0] < p3Idx[0] && p1Idx[len(p1Idx)-1] < p3Idx[0] && p3Idx[0] <= readyIdx[0]):
		t.Errorf("log order: p1 exiting line %d, p2 previous generation exited %d, running queued upgrade %d, p1's last line %d, p3's first line %d, p3 ready %d: the third generation did not wait for the first to exit",
			exitIdx[0], goneIdx[0], runIdx[0], p1Idx[len(p1Idx)-1], p3Idx[0], readyIdx[0])
	}
	s.WaitSlowThenSettled(t, slow, p1, p2, p3)

	st = settledStatus(t, s, p3, "draining-previous")
	if st.Phase != "serving" || st.PreviousPID != 0 || st.Generation != 3 || st.Version != "v3" {
		t.Errorf("status after the drain: %s, want phase serving, generation 3, v3, no previous_pid", itest.JSON(st))
	}
	t.Logf("status of the third generation after its predecessor drained: %s", itest.JSON(st))

	// A hanging upgrade, asked in the background by a client that gives up
	// after 2s (exit 6): the attempt goes on, status says "upgrading", and a
	// second request is refused as in progress.
	mark = s.Logs.Mark()
	s.DeployFile(itest.Binary(t, "hang"), 0o755)
	bg := itest.StartCLI(t, "upgrade", "--pidfile", s.PIDFile, "--timeout", "2s")
	hangMarker := regexp.MustCompile(`^testdata-hang: pid (\d+) blocking forever$`)
	hl := s.Logs.Wait(t, mark, "", func(l itest.Line) bool { return hangMarker.MatchString(l.Raw) }, 15*time.Second)
	hangPID, _ := strconv.Atoi(hangMarker.FindStringSubmatch(hl.Raw)[1])
	st = s.StatusOf(t, p3)
	if st.Phase != "upgrading" || st.Generation != 3 {
		t.Errorf("status during a hanging upgrade: %s, want phase upgrading, generation 3", itest.JSON(st))
	}
	r = s.UpgradeCLI(t, "--json")
	ans = control.Answer{}
	if err := json.Unmarshal([]byte(r.Stdout), &ans); err != nil || r.Code != 7 || ans.OK || ans.Kind != "in-progress" {
		t.Errorf("upgrade --json during a running upgrade: exit %d, answer %s (%v), want exit 7 (busy), kind in-progress\n%v", r.Code, itest.JSON(ans), err, r)
	}
	r = bg.Wait(t, 20*time.Second)
	t.Logf("%s", r)
	if r.Code != 6 || !strings.Contains(r.Stderr, "no verdict within 2s") {
		t.Errorf("background upgrade --timeout 2s of a hanging binary: exit %d, want 6 with \"no verdict within 2s\"\n%v", r.Code, r)
	}
	if st = s.StatusOf(t, p3); st.Phase != "upgrading" {
		t.Errorf("status after the client gave up: %s, want phase upgrading (the attempt goes on)", itest.JSON(st))
	}
	// End the attempt: kill the hanging process.
	s.KillInGroup(t, hangPID, p1, p2, p3)
	fail := s.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(p3), 15*time.Second)
	if fail.Str("kind") != "exited" {
		t.Errorf("upgrade failed log after killing the hanging process: %s, want kind exited", fail.Raw)
	}
	st = settledStatus(t, s, p3, "upgrading")
	if lu := st.LastUpgrade; st.Phase != "serving" || st.PreviousPID != 0 || lu == nil || lu.OK || lu.Kind != "exited" ||
		lu.PID != hangPID || lu.ExitStatus != "signal: killed" || lu.At.IsZero() {
		t.Errorf("status after the failed upgrade: %s, want phase serving, last_upgrade ok=false kind=exited pid=%d exit_status \"signal: killed\"", itest.JSON(st), hangPID)
	}
	if p, err := s.ReadPID(); err != nil || p != p3 {
		t.Errorf("PID file after the failed upgrade: %d (%v), want %d", p, err, p3)
	}
	s.WaitServing(p3, "v3", 5*time.Second)
	s.CheckOneProcess(t, p3)
}

// ---------------------------------------------------------------------------
// 3. The control socket refuses other users.

// publicDir makes a directory under os.TempDir() with mode 0755 (t.TempDir
// and its parents are 0700), removed at cleanup.
func publicDir(tb testing.TB) string {
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

func TestControlSocketPermissions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("skipped: running handoff status as uid 65534 needs root (SysProcAttr.Credential); euid is", os.Geteuid())
	}
	dir := publicDir(t)
	s := itest.StartServer(t, itest.ServerOpts{CleanEnv: true, Dir: dir})
	pid := s.LivePID()
	sock := s.PIDFile + ".sock"
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatalf("control socket: %v", err)
	}
	if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket %s has mode %v, want a socket with permissions 0600", sock, fi.Mode())
	}

	cli := filepath.Join(dir, "handoff-cli")
	itest.CopyFile(t, itest.Binary(t, "handoff-v1"), cli, 0o755)
	// runNobody runs the CLI as uid 65534.
	runNobody := func(args ...string) itest.Result {
		t.Helper()
		cmd := exec.Command(cli, args...)
		cmd.Dir = dir
		cmd.Env = itest.CleanEnv(nil)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		return itest.RunCmd(t, itest.CLITimeout, cmd)
	}
	asNobody := func(args ...string) itest.Result {
		t.Helper()
		r := runNobody(args...)
		t.Logf("as uid 65534: %s", r)
		return r
	}
	// Precondition: uid 65534 can run the binary at all.
	if r := asNobody("version"); r.Code != 0 || strings.TrimSpace(r.Stdout) != "v1" {
		t.Fatalf("precondition: uid 65534 cannot run %s version: %v", cli, r)
	}

	// Mode 0600: the kernel refuses the connection.
	mark := s.Logs.Mark()
	r := asNobody("status", "--pidfile", s.PIDFile)
	if r.Code != 5 || !strings.Contains(r.Stderr, "permission denied") || !strings.Contains(r.Stderr, "no answer on control socket") {
		t.Errorf("status as uid 65534 on a 0600 socket: exit %d, want 5 with \"no answer on control socket\" and \"permission denied\"\n%v", r.Code, r)
	}
	s.Logs.None(t, mark, "control request refused", nil, "the kernel refused uid 65534; the server saw nothing")

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
		var bad []itest.Result
		for range runs {
			r := runNobody(args...)
			codes[r.Code]++
			if r.Code != 1 || !strings.Contains(r.Stderr, wantRefusal) || r.Stdout != "" {
				bad = append(bad, r)
			}
		}
		t.Logf("%s as uid 65534 on a 0666 socket, %d runs: exit codes %v", what, runs, codes)
		if len(bad) > 0 {
			t.Errorf("%s as uid 65534 on a 0666 socket: %d of %d runs were not exit 1 with %q and no stdout (exit codes %v); first:\n%v",
				what, len(bad), runs, wantRefusal, codes, bad[0])
		}
	}
	refused("status", 20, "status", "--pidfile", s.PIDFile)
	l := s.Logs.Wait(t, mark, "control request refused", itest.PIDIs(pid), 5*time.Second)
	if l.Str("level") != "WARN" || !strings.Contains(l.Str("error"), "uid 65534") {
		t.Errorf("refusal log line: %s, want level WARN and an error naming uid 65534", l.Raw)
	}
	if !itest.Poll(5*time.Second, func() bool {
		ls, _ := s.Logs.Find(mark, "control request refused", itest.PIDIs(pid))
		return len(ls) >= 20
	}) {
		t.Errorf("fewer than 20 control request refused log lines for 20 status requests of uid 65534")
	}
	if ls, _ := s.Logs.Find(mark, "control request refused", itest.PIDIs(pid)); len(ls) != 20 {
		t.Errorf("%d control request refused log lines for 20 status requests of uid 65534", len(ls))
	}

	// An upgrade asked by uid 65534 is refused too, and nothing happens.
	s.Deploy("v2")
	mark = s.Logs.Mark()
	refused("upgrade --json", 5, "upgrade", "--pidfile", s.PIDFile, "--json")
	s.Logs.Wait(t, mark, "control request refused", itest.PIDIs(pid), 5*time.Second)
	s.Logs.None(t, mark, "upgrade requested", nil, "upgrade refused to uid 65534")
	s.Logs.None(t, mark, "starting new generation", nil, "upgrade refused to uid 65534")
	if p, err := s.ReadPID(); err != nil || p != pid {
		t.Errorf("PID file after a refused upgrade: %d (%v), want %d", p, err, pid)
	}

	// The server keeps serving and answering root.
	resp, err := itest.Get(s.Addr, "/")
	if err != nil || resp.Status != 200 || resp.Body != "Hello World !!!" || resp.PID != pid {
		t.Errorf("GET / after the refusals: %+v %v, want 200 \"Hello World !!!\" from pid %d", resp, err, pid)
	}
	if st := s.Status(t); st.PID != pid || st.Phase != "serving" {
		t.Errorf("status as root after the refusals: %s, want pid %d serving", itest.JSON(st), pid)
	}
	s.CheckOneProcess(t, pid)
}

// ---------------------------------------------------------------------------
// 4. sd_notify: the exact sequence of messages and their senders.

func TestNotifySequence(t *testing.T) {
	ns := itest.ListenNotify(t)
	s := itest.StartServer(t, itest.ServerOpts{CleanEnv: true, Env: []string{"NOTIFY_SOCKET=" + ns.Path}})
	p1 := s.LivePID()

	p2 := s.GoodUpgrade(t, "v2", 2)
	s.WaitGone(p1, 20*time.Second)

	s.DeployFile(itest.Binary(t, "exit1"), 0o755)
	r := s.UpgradeCLI(t)
	if r.Code != 1 || !strings.Contains(r.Stderr, "exit status 1") {
		t.Errorf("upgrade to exit1: exit %d, want 1 with \"exit status 1\"\n%v", r.Code, r)
	}

	s.Signal(p2, syscall.SIGTERM)
	itest.Eventually(t, 15*time.Second, func() bool { return !itest.Alive(p2) }, "pid %d to exit after SIGTERM", p2)
	s.Proc.Wait(t, 10*time.Second)
	var nowTS unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &nowTS); err != nil {
		t.Fatal(err)
	}
	nowUsec := uint64(nowTS.Nano() / 1000)
	msgs := ns.Flush(t)
	_, problems := ns.Snapshot()
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
		fmt.Fprintf(&got, "  %d. pid %d: %q\n", i+1, m.PID, m.Text)
	}
	t.Logf("notify datagrams (p1 %d, p2 %d):\n%s", p1, p2, got.String())
	if len(msgs) != len(want) {
		t.Errorf("%d notify datagrams, want %d", len(msgs), len(want))
	}
	for i := 0; i < len(want) && i < len(msgs); i++ {
		w, m := want[i], msgs[i]
		if m.PID != w.pid {
			t.Errorf("datagram %d (%s): sent by pid %d, want %d: %q", i+1, w.what, m.PID, w.pid, m.Text)
		}
		if err := w.check(m.Text); err != nil {
			t.Errorf("datagram %d (%s): %q: %v", i+1, w.what, m.Text, err)
		}
	}
	for _, m := range msgs {
		if m.PID == p1 && strings.Contains(m.Text, "STOPPING=1") {
			t.Errorf("generation 1 (pid %d), which handed off, sent STOPPING=1: %q", p1, m.Text)
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
	if ins := itest.ListenInodes(port); len(ins) != 1 || ins[0] != inode {
		t.Fatalf("precondition: LISTEN inodes on %s %v, want the test's socket [%d]", addr, ins, inode)
	}

	s := itest.StartServer(t, itest.ServerOpts{
		CleanEnv:   true,
		Listen:     addr,
		ExtraFiles: []*os.File{f},
		Wrap:       []string{"/bin/sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec "$0" "$@"`},
	})
	// From now on only the server holds the socket.
	f.Close()
	ln.Close()
	p1 := s.LivePID()
	if p1 != s.Proc.Cmd.Process.Pid {
		t.Fatalf("PID file names %d, the started process is %d: the wrapper did not exec", p1, s.Proc.Cmd.Process.Pid)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", p1))
	if err != nil || !bytes.Contains(env, []byte(fmt.Sprintf("\x00LISTEN_PID=%d\x00", p1))) {
		t.Fatalf("precondition: /proc/%d/environ lacks LISTEN_PID=%d (%v)", p1, p1, err)
	}

	sd := s.Logs.Wait(t, 0, "socket from systemd", itest.PIDIs(p1), 5*time.Second)
	if sd.Str("name") != "http" || sd.Str("addr") != addr {
		t.Errorf("socket from systemd log: %s, want name http addr %s", sd.Raw, addr)
	}
	s.Logs.None(t, 0, "socket from systemd not used by any listener: closing it", nil, "the passed socket matches --listen")
	if s.Addr != addr || s.Inode != inode {
		t.Errorf("server listens on %s inode %d, want the test's socket %s inode %d", s.Addr, s.Inode, addr, inode)
	}
	s.CheckListener(t, p1)
	if resp, err := itest.Get(s.Addr, "/"); err != nil || resp.Status != 200 || resp.PID != p1 {
		t.Errorf("GET / with only the server holding the socket: %+v %v, want 200 from %d", resp, err, p1)
	}

	mark := s.Logs.Mark()
	p2 := s.GoodUpgrade(t, "v2", 2)
	s.WaitGone(p1, 20*time.Second)
	s.CheckListener(t, p2)
	s.CheckOneProcess(t, p2)
	s.Logs.None(t, mark, "socket from systemd", nil, "the second generation inherits the socket from the first, not from systemd")
	// p2 serves, but the reader may not have got to its lines yet.
	if l := s.Logs.Wait(t, mark, "listening", itest.PIDIs(p2), 10*time.Second); l.Str("addr") != addr {
		t.Errorf("second generation listening log: %s, want addr %s", l.Raw, addr)
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
	if resp, err := itest.Get(s.Addr, "/hello/systemd"); err != nil || resp.Status != 200 || resp.PID != p2 || resp.Body != "Hello systemd!!!" {
		t.Errorf("GET /hello/systemd after the upgrade: %+v %v, want 200 from %d", resp, err, p2)
	}
}

// ---------------------------------------------------------------------------
// 6. --preflight and --check.

func TestPreflight(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{CleanEnv: true, Args: []string{"--preflight"}})
	p1 := s.LivePID()

	mark := s.Logs.Mark()
	s.DeployFile(itest.Binary(t, "exit1"), 0o755)
	r := s.UpgradeCLI(t, "--json")
	var ans control.Answer
	if err := json.Unmarshal([]byte(r.Stdout), &ans); err != nil {
		t.Fatalf("upgrade --json: %v\n%v", err, r)
	}
	if r.Code != 1 || ans.OK || ans.Kind != "preflight" || ans.PID != p1 || !strings.HasPrefix(ans.Error, "preflight check failed: exit status 1") {
		t.Errorf("preflight of exit1: exit %d, answer %s, want exit 1, ok=false, kind preflight, pid %d, error \"preflight check failed: exit status 1...\"", r.Code, r.Stdout, p1)
	}
	if o := ans.Upgrade; o == nil || o.Kind != "preflight" || o.ExitStatus != "exit status 1" ||
		len(o.Stderr) == 0 || !strings.HasPrefix(o.Stderr[len(o.Stderr)-1], "testdata-exit1: pid ") {
		t.Errorf("preflight outcome: %s, want kind preflight, exit_status \"exit status 1\", output ending with the exit1 line", itest.JSON(ans.Upgrade))
	}
	pf := s.Logs.Wait(t, mark, "preflight", itest.PIDIs(p1), 5*time.Second)
	if !strings.Contains(pf.Raw, `"--check"`) || !strings.Contains(pf.Raw, `"--preflight"`) {
		t.Errorf("preflight log line does not show the check arguments: %s", pf.Raw)
	}
	fl := s.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(p1), 5*time.Second)
	if fl.Str("kind") != "preflight" {
		t.Errorf("upgrade failed log: %s, want kind preflight", fl.Raw)
	}
	s.Logs.None(t, mark, "starting new generation", nil, "failed preflight")
	s.Logs.None(t, mark, "started by previous generation", nil, "failed preflight")
	if p, err := s.ReadPID(); err != nil || p != p1 {
		t.Errorf("PID file after a failed preflight: %d (%v), want %d", p, err, p1)
	}
	s.WaitServing(p1, "v1", 5*time.Second)
	s.CheckOneProcess(t, p1)

	mark = s.Logs.Mark()
	p2 := s.GoodUpgrade(t, "v2", 2)
	s.Logs.Wait(t, mark, "preflight", itest.PIDIs(p1), 5*time.Second)
	s.WaitGone(p1, 20*time.Second)
	s.CheckListener(t, p2)
	s.CheckOneProcess(t, p2)

	// serve --check: exit 0 without binding or writing anything; 4 when the
	// PID file's directory is missing.
	dir := t.TempDir()
	pidfile := filepath.Join(dir, "x.pid")
	r = itest.CLI(t, "serve", "--check", "--listen", "127.0.0.1:0", "--pidfile", pidfile)
	t.Logf("%s", r)
	if r.Code != 0 || !strings.Contains(r.Stderr, "ok (version v1)") {
		t.Errorf("serve --check: exit %d, want 0 with \"ok (version v1)\"\n%v", r.Code, r)
	}
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("serve --check left files in %s: %v (%v), want none (no PID file, no control socket)", dir, ents, err)
	}
	r = itest.CLI(t, "serve", "--check", "--listen", "127.0.0.1:0", "--pidfile", filepath.Join(dir, "missing", "x.pid"))
	t.Logf("%s", r)
	if r.Code != 4 || !strings.Contains(r.Stderr, "cannot write pid file") {
		t.Errorf("serve --check with a PID file in a missing directory: exit %d, want 4 with \"cannot write pid file\"\n%v", r.Code, r)
	}
}

// ---------------------------------------------------------------------------
// 7. The PID 1 warning.

func TestPID1Warning(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("skipped: no unshare command to run handoff as PID 1 of a PID namespace")
	}
	probe := itest.Run(t, 15*time.Second, unshare, "--pid", "--fork", "--mount-proc", "true")
	if probe.Code != 0 {
		t.Skipf("skipped: unshare --pid --fork --mount-proc true does not work here (needs root or user namespaces): %v", probe)
	}

	cmd := exec.Command(unshare, "--pid", "--fork", itest.Binary(t, "handoff-v1"), "serve",
		"--listen", "127.0.0.1:0", "--log-format", "json")
	cmd.Dir = t.TempDir()
	cmd.Env = itest.CleanEnv(nil)
	logs := itest.StartCmd(t, cmd).Logs

	w := logs.Wait(t, 0, "", func(l itest.Line) bool { return strings.Contains(l.Msg(), "running as PID 1") }, 15*time.Second)
	t.Logf("PID 1 warning: %s", w.Raw)
	if w.Str("level") != "WARN" || w.PID() != 1 {
		t.Errorf("PID 1 log line: %s, want level WARN from pid 1", w.Raw)
	}
	l := logs.Wait(t, 0, "listening", nil, 15*time.Second)
	logs.Wait(t, 0, "ready", nil, 15*time.Second)
	resp, err := itest.Get(l.Str("addr"), "/healthz")
	if err != nil || resp.Status != 200 || resp.PID != 1 {
		t.Errorf("GET /healthz from the server in its PID namespace: %+v %v, want 200 with Handoff-Pid 1", resp, err)
	}
}
