package main_test

// Integration tests of `handoff run -- CMD`: handoff holds the listening
// socket and supervises a server written in another language (the Node.js and
// Python examples), starting a new child on each upgrade.
//
// Every process started here runs in its own process group. The supervised
// children are in process groups of their own (handoff starts them with
// Setpgid), so the cleanup freezes handoff, kills every child's group by PID
// (found by a /proc scan of handoff's children and from handoff's "child
// started" log lines), lets handoff reap them, and then kills handoff's group.
// Traffic goes to 127.0.0.1 only.
//
// Identifiers here start with "hrun" so as not to clash with other test files.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
)

// hrunOpts configure startHrun.
type hrunOpts struct {
	readyTimeout string // --ready-timeout, default 5s
	drainTimeout string // --drain-timeout, default 10s
	// app is the example copied into the temp dir as the program to run:
	// "node" (examples/node/server.js -> DIR/app.js, run as node DIR/app.js,
	// the default) or "python" (examples/python/server.py -> DIR/server.py,
	// run as python3 DIR/server.py).
	app string
}

// hrun is one `handoff-v1 run ... -- CMD` under test.
type hrun struct {
	tb      testing.TB
	bins    string
	dir     string
	app     string // the script the children run (DIR/app.js or DIR/server.py)
	pidfile string
	control string // the control socket: PIDFILE.sock
	cmd     *exec.Cmd
	pid     int // handoff's own PID; also its process group
	logs    *logStore
	addr    string // 127.0.0.1:PORT actually bound
	port    int
	exited  chan struct{}
}

// hrunSkipWithout skips the test when bin is not on PATH.
func hrunSkipWithout(tb testing.TB, bin string) {
	tb.Helper()
	if _, err := exec.LookPath(bin); err != nil {
		tb.Skipf("%s is not installed (not on PATH): skipping the handoff run test that needs it", bin)
	}
}

// startHrun copies the example to a temp dir and starts
//
//	handoff-v1 run --listen 127.0.0.1:0 --pidfile DIR/run.pid --log-format json
//	    --drain-timeout D --ready-timeout R -- node DIR/app.js
//
// in its own process group. handoff logs the address it was asked for
// (127.0.0.1:0), not the port it got, so the port is found in /proc: the LISTEN
// socket on 127.0.0.1 whose inode handoff holds. It returns once handoff logged
// "ready", the PID file names it, and GET /healthz answers from its one child.
func startHrun(tb testing.TB, o hrunOpts) *hrun {
	tb.Helper()
	if o.readyTimeout == "" {
		o.readyTimeout = "5s"
	}
	if o.drainTimeout == "" {
		o.drainTimeout = "10s"
	}
	var interp, src, name string
	switch o.app {
	case "", "node":
		interp, src, name = "node", filepath.Join("examples", "node", "server.js"), "app.js"
	case "python":
		interp, src, name = "python3", filepath.Join("examples", "python", "server.py"), "server.py"
	default:
		tb.Fatalf("unknown app %q", o.app)
	}
	hrunSkipWithout(tb, interp)
	b := bins(tb)
	dir := tb.TempDir()
	h := &hrun{
		tb:      tb,
		bins:    b,
		dir:     dir,
		app:     filepath.Join(dir, name),
		pidfile: filepath.Join(dir, "run.pid"),
	}
	h.control = h.pidfile + ".sock"
	copyFile(tb, src, h.app, 0o644)

	h.cmd = exec.Command(filepath.Join(b, "handoff-v1"), "run",
		"--listen", "127.0.0.1:0",
		"--pidfile", h.pidfile,
		"--log-format", "json",
		"--drain-timeout", o.drainTimeout,
		"--ready-timeout", o.readyTimeout,
		"--", interp, h.app)
	h.cmd.Dir = dir
	h.logs, h.exited = startPiped(tb, h.cmd, fmt.Sprintf("handoff run output (%s)", h.dir), 400)
	h.pid = h.cmd.Process.Pid
	tb.Cleanup(h.kill)

	h.logs.waitLog(tb, 0, "listening", nil, 15*time.Second) // it has no pid field
	h.waitFor(15*time.Second, func() bool { _, _, ok := h.logs.first(0, "ready", pidIs(h.pid)); return ok },
		`handoff %d to log "ready"`, h.pid)
	h.waitFor(10*time.Second, func() bool {
		h.port = hrunListenPort(h.pid)
		return h.port != 0
	}, "a LISTEN socket on 127.0.0.1 held by handoff %d", h.pid)
	h.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(h.port))
	h.waitFor(10*time.Second, func() bool { p, err := h.readPID(); return err == nil && p == h.pid },
		"PID file %s to name handoff %d", h.pidfile, h.pid)
	child := h.servingChild()
	h.waitHealthz(child, 10*time.Second)
	return h
}

// hrunListenPort returns the port of the LISTEN socket on 127.0.0.1 whose
// inode pid holds a descriptor for, or 0.
func hrunListenPort(pid int) int {
	ts, _ := fdTargets(pid)
	held := map[string]bool{}
	for _, t := range ts {
		if _, target, ok := strings.Cut(t, " -> "); ok {
			held[target] = true
		}
	}
	for _, e := range readTCP() {
		if e.state == tcpListen && e.localIP == "0100007F" && held[fmt.Sprintf("socket:[%d]", e.inode)] {
			return e.localPort
		}
	}
	return 0
}

// pollRunning is poll, except that it stops at once if handoff exits:
// exited then says so (and ok is true, as cond was not asked).
func (h *hrun) pollRunning(timeout time.Duration, cond func() bool) (ok, exited bool) {
	ok = poll(timeout, func() bool {
		select {
		case <-h.exited:
			exited = true
			return true
		default:
		}
		return cond()
	})
	return ok, exited
}

// waitFor is eventually, except that it fails at once if handoff exited.
func (h *hrun) waitFor(timeout time.Duration, cond func() bool, format string, args ...any) {
	h.tb.Helper()
	ok, exited := h.pollRunning(timeout, cond)
	switch {
	case exited:
		h.tb.Fatalf("handoff run exited (%v) while waiting for: %s", h.cmd.ProcessState, fmt.Sprintf(format, args...))
	case !ok:
		h.tb.Fatalf("timed out after %v waiting for: %s", timeout, fmt.Sprintf(format, args...))
	}
}

func (h *hrun) readPID() (int, error) {
	b, err := os.ReadFile(h.pidfile)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// checkHandoff asserts that handoff is still running with the PID it started
// with, and that the PID file still names it.
func (h *hrun) checkHandoff(t testing.TB) {
	t.Helper()
	select {
	case <-h.exited:
		t.Fatalf("handoff run %d exited: %v", h.pid, h.cmd.ProcessState)
	default:
	}
	if p, err := h.readPID(); err != nil || p != h.pid {
		t.Errorf("PID file names %d (err %v), want handoff's own PID %d", p, err, h.pid)
	}
}

// ---------------------------------------------------------------------------
// Cleanup.

// hrunProc is a process found in /proc.
type hrunProc struct {
	pid, pgrp int
	state     byte
	comm      string
}

func (p hrunProc) String() string {
	return fmt.Sprintf("%d(%s,%c,pgrp %d)", p.pid, p.comm, p.state, p.pgrp)
}

// hrunKids returns every process whose parent is ppid, zombies included.
func hrunKids(ppid int) []hrunProc {
	var out []hrunProc
	for _, st := range procs(func(st procStat) bool { return st.ppid == ppid }) {
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", st.pid))
		out = append(out, hrunProc{pid: st.pid, pgrp: st.pgrp, state: st.state, comm: strings.TrimSpace(string(comm))})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

func hrunPIDs(ps []hrunProc) []int {
	out := make([]int, len(ps))
	for i, p := range ps {
		out[i] = p.pid
	}
	return out
}

// hrunKillGroup SIGKILLs the process group that pid leads, and pid itself.
// It refuses our own group and PIDs that would reach other processes.
func hrunKillGroup(pid int) {
	if pid <= 1 {
		return
	}
	if st, ok := readStat(pid); ok && st.pgrp == pid && st.pgrp != syscall.Getpgrp() {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// loggedChildren returns every child PID handoff logged as started.
func (h *hrun) loggedChildren() []int {
	ls, _ := h.logs.find(0, "child started", pidIs(h.pid))
	var out []int
	for _, l := range ls {
		if n, ok := l.num("child_pid"); ok && n > 1 {
			out = append(out, int(n))
		}
	}
	return out
}

// ours reports whether pid is alive and runs our script (its command line
// names the temp dir), so that a recycled PID is never killed.
func (h *hrun) ours(pid int) bool {
	if !alive(pid) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(b, []byte(h.dir))
}

// kill leaves nothing behind: with handoff frozen (SIGSTOP, so that it starts
// no child meanwhile), every child's process group is SIGKILLed; handoff is
// then let go to reap them, frozen again, and its own group SIGKILLed. Any
// child handoff ever logged that still runs is killed last.
func (h *hrun) kill() {
	tb := h.tb
	select {
	case <-h.exited:
	default:
		_ = syscall.Kill(h.pid, syscall.SIGSTOP)
		kids := hrunKids(h.pid)
		for _, k := range kids {
			hrunKillGroup(k.pid)
		}
		_ = syscall.Kill(h.pid, syscall.SIGCONT)
		// handoff reaps its killed children (zombies keep their parent).
		poll(5*time.Second, func() bool {
			for _, k := range hrunKids(h.pid) {
				if slices.Contains(hrunPIDs(kids), k.pid) {
					return false
				}
			}
			return true
		})
		_ = syscall.Kill(h.pid, syscall.SIGSTOP)
		for _, k := range hrunKids(h.pid) { // a restart started meanwhile
			hrunKillGroup(k.pid)
		}
		_ = syscall.Kill(-h.pid, syscall.SIGKILL)
	}
	waitGroupGone(tb, h.pid, h.exited, h.logs, "handoff run")
	var left []int
	for _, pid := range h.loggedChildren() {
		if h.ours(pid) {
			hrunKillGroup(pid)
			left = append(left, pid)
		}
	}
	if !poll(10*time.Second, func() bool {
		for _, pid := range left {
			if alive(pid) {
				return false
			}
		}
		return true
	}) {
		tb.Errorf("children %v of handoff run still alive 10s after SIGKILL", left)
	}
}

// ---------------------------------------------------------------------------
// The CLI: handoff upgrade and handoff status.

// hrunCLI runs handoff-v1 with args in its own process group, for at most
// timeout, and returns its exit code and output.
func hrunCLI(tb testing.TB, binDir string, timeout time.Duration, args ...string) (code int, stdout, stderr string) {
	tb.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(filepath.Join(binDir, "handoff-v1"), args...)
	cmd.Stdout = &out
	cmd.Stderr = &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		tb.Fatalf("start handoff %s: %v", strings.Join(args, " "), err)
	}
	pgid := cmd.Process.Pid
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	if !waitChan(done, timeout) {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
		tb.Fatalf("handoff %s still running after %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), timeout, out.String(), errb.String())
	}
	// It starts no process of its own, and it is reaped: its group is gone.
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

// status runs handoff status --pidfile F --json.
func (h *hrun) status() control.Status {
	h.tb.Helper()
	code, out, errOut := hrunCLI(h.tb, h.bins, 15*time.Second, "status", "--pidfile", h.pidfile, "--json")
	if code != 0 {
		h.tb.Fatalf("handoff status: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	var st control.Status
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		h.tb.Fatalf("handoff status --json: %v: %q", err, out)
	}
	return st
}

// servingChild returns the one child that status reports, which must serve.
func (h *hrun) servingChild() int {
	h.tb.Helper()
	var st control.Status
	h.waitFor(10*time.Second, func() bool {
		st = h.status()
		return len(st.Children) == 1 && st.Children[0].Phase == "serving"
	}, "status to list exactly one serving child")
	if st.PID != h.pid {
		h.tb.Errorf("status pid %d, want handoff's %d", st.PID, h.pid)
	}
	return st.Children[0].PID
}

var hrunUpgradedRE = regexp.MustCompile(`^upgraded: pid (\d+) -> (\d+),`)

// upgrade runs handoff upgrade --pidfile F --wait, requires exit 0 and
// returns the new child's PID named on its stdout.
func (h *hrun) upgrade() (newPID int, out string) {
	h.tb.Helper()
	code, out, errOut := hrunCLI(h.tb, h.bins, 60*time.Second, "upgrade", "--pidfile", h.pidfile, "--wait")
	if code != 0 {
		h.tb.Fatalf("handoff upgrade: exit %d, want 0\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	m := hrunUpgradedRE.FindStringSubmatch(out)
	if m == nil {
		h.tb.Fatalf("handoff upgrade stdout %q does not match %v", out, hrunUpgradedRE)
	}
	if p, _ := strconv.Atoi(m[1]); p != h.pid {
		h.tb.Errorf("handoff upgrade says pid %d answered, want handoff's %d: %q", p, h.pid, out)
	}
	newPID, _ = strconv.Atoi(m[2])
	if newPID <= 1 {
		h.tb.Fatalf("handoff upgrade names new child pid %d: %q", newPID, out)
	}
	return newPID, out
}

// upgradeFails runs handoff upgrade --pidfile F --wait and requires exit 1.
func (h *hrun) upgradeFails() (stderr string, took time.Duration) {
	h.tb.Helper()
	start := time.Now()
	code, out, errOut := hrunCLI(h.tb, h.bins, 60*time.Second, "upgrade", "--pidfile", h.pidfile, "--wait")
	took = time.Since(start)
	if code != 1 {
		h.tb.Fatalf("handoff upgrade: exit %d, want 1\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	return errOut, took
}

// waitHealthz waits until GET /healthz on a fresh connection answers 200 "ok"
// from pid three times in a row.
func (h *hrun) waitHealthz(pid int, timeout time.Duration) {
	h.tb.Helper()
	streak := 0
	last := "none"
	ok, exited := h.pollRunning(timeout, func() bool {
		r, err := get(h.addr, "/healthz")
		if err != nil {
			last, streak = err.Error(), 0
			return false
		}
		last = fmt.Sprintf("status %d Handoff-Pid %d body %q", r.status, r.pid, r.body)
		if r.status == 200 && r.pid == pid && r.body == "ok" {
			streak++
		} else {
			streak = 0
		}
		return streak >= 3
	})
	if exited {
		h.tb.Fatalf("handoff run exited (%v) while waiting for GET /healthz to answer from child %d", h.cmd.ProcessState, pid)
	}
	if !ok {
		h.tb.Fatalf("GET /healthz did not answer from child %d three times in a row within %v; last answer: %s", pid, timeout, last)
	}
}

// waitOnlyChild waits until pid is handoff's only child, in status (serving)
// and in /proc (no other process, not even a zombie, has handoff as parent),
// and that child runs comm (a prefix: python3 may be python3.11).
func (h *hrun) waitOnlyChild(pid int, comm string, timeout time.Duration) {
	h.tb.Helper()
	var kids []hrunProc
	var st control.Status
	ok := poll(timeout, func() bool {
		kids = hrunKids(h.pid)
		if len(kids) != 1 || kids[0].pid != pid {
			return false
		}
		st = h.status()
		return len(st.Children) == 1 && st.Children[0].PID == pid && st.Children[0].Phase == "serving"
	})
	if !ok {
		h.tb.Fatalf("want exactly one child %d of handoff %d within %v; /proc children: %v; status children: %+v",
			pid, h.pid, timeout, kids, h.status().Children)
	}
	if !strings.HasPrefix(kids[0].comm, comm) || kids[0].state == 'Z' {
		h.tb.Errorf("handoff's child %v, want a live %s", kids[0], comm)
	}
	if kids[0].pgrp != pid {
		h.tb.Errorf("child %v is not the leader of its own process group", kids[0])
	}
}

// checkDrained asserts that each replaced child exited by itself with status 0
// (it drained) and that handoff never had to kill one at the drain deadline.
func (h *hrun) checkDrained(t testing.TB, replaced []int) {
	t.Helper()
	for _, pid := range replaced {
		var l logLine
		ok := poll(15*time.Second, func() bool {
			var found bool
			l, _, found = h.logs.first(0, "old child exited", func(l logLine) bool { n, _ := l.num("child_pid"); return int(n) == pid })
			return found
		})
		switch {
		case !ok:
			t.Errorf("no old child exited log line for replaced child %d", pid)
		case l.str("status") != "exit status 0":
			t.Errorf("replaced child %d exited with %q, want exit status 0 (drained): %s", pid, l.str("status"), l.raw)
		}
		if alive(pid) {
			t.Errorf("replaced child %d still alive", pid)
		}
	}
	if ls, _ := h.logs.find(0, "old child still running at the drain deadline: killing its process group", nil); len(ls) > 0 {
		t.Errorf("handoff killed %d old children at the drain deadline: %s", len(ls), ls[0].raw)
	}
}

// startHrunKidSampler records the most live (non-zombie) children handoff
// ppid had at once.
func startHrunKidSampler(ppid int, every time.Duration) *maxSampler[hrunProc] {
	return startMaxSampler(every, func() []hrunProc {
		var live []hrunProc
		for _, k := range hrunKids(ppid) {
			if k.state != 'Z' {
				live = append(live, k)
			}
		}
		return live
	}, func(k hrunProc) int { return k.pid })
}

// writeApp renames a new script over the one the children run.
func (h *hrun) writeApp(src string) {
	h.tb.Helper()
	tmp := h.app + ".new"
	if err := os.WriteFile(tmp, []byte(src), 0o644); err != nil {
		h.tb.Fatal(err)
	}
	if err := os.Rename(tmp, h.app); err != nil {
		h.tb.Fatal(err)
	}
}

// ---------------------------------------------------------------------------
// Tests.

// 1. Ten upgrades of a Node.js server under load: no request fails, every
// upgrade starts a new child that then answers, handoff's own PID stays, and
// one child is left at the end.
func TestRunNodeUpgradesUnderLoad(t *testing.T) {
	h := startHrun(t, hrunOpts{})
	first := h.servingChild()
	load := startLoad(t, h.bins, h.addr, loadRate, loadArgs()...)
	sampler := startHrunKidSampler(h.pid, 3*time.Millisecond)
	defer sampler.stop()

	children := []int{first}
	const upgrades = 10
	for i := 1; i <= upgrades; i++ {
		old := children[len(children)-1]
		mark := h.logs.mark()
		newPID, out := h.upgrade()
		t.Logf("upgrade %d: %s", i, strings.TrimSpace(out))
		if slices.Contains(children, newPID) {
			t.Fatalf("upgrade %d: new child pid %d is not new (children so far %v)", i, newPID, children)
		}
		succ := h.logs.waitLog(t, mark, "upgrade succeeded", pidIs(h.pid), 5*time.Second)
		if n, _ := succ.num("new_pid"); int(n) != newPID {
			t.Errorf("upgrade %d: upgrade succeeded logs new_pid %d, handoff upgrade said %d: %s", i, n, newPID, succ.raw)
		}
		dr := h.logs.waitLog(t, mark, "draining old child", pidIs(h.pid), 5*time.Second)
		if n, _ := dr.num("child_pid"); int(n) != old {
			t.Errorf("upgrade %d: draining old child %d, want the previous child %d: %s", i, n, old, dr.raw)
		}
		h.waitHealthz(newPID, 10*time.Second)
		h.checkHandoff(t)
		children = append(children, newPID)
	}

	res, sent := load.stop()
	sampler.stop()
	checkLoad(t, load, res, sent)
	for i, pid := range children {
		if ps, ok := pidStat(res, pid); !ok || ps.Count == 0 {
			t.Errorf("child %d (pid %d) answered no load-tool request", i, pid)
		}
	}
	if sampler.max > 2 {
		t.Errorf("%d live children of handoff at once (%v), want at most 2 (serving + draining)", sampler.max, sampler.maxSeen)
	}
	last := children[len(children)-1]
	h.waitOnlyChild(last, "node", 15*time.Second)
	h.checkHandoff(t)
	if st := h.status(); st.PID != h.pid || st.Phase != "serving" {
		t.Errorf("status at the end: pid %d phase %q, want pid %d serving", st.PID, st.Phase, h.pid)
	}
	h.checkDrained(t, children[:len(children)-1])
	t.Logf("children: %v; at most %d at once in %d samples", children, sampler.max, sampler.samples)
}

// 2. Broken children: one that exits at start, one that never says it is
// ready. Each upgrade fails with the reason, the old child keeps serving, and
// nothing is left of the broken one; then the good script upgrades fine.
func TestRunBrokenChildren(t *testing.T) {
	h := startHrun(t, hrunOpts{readyTimeout: "2s"})
	good, err := os.ReadFile(h.app)
	if err != nil {
		t.Fatal(err)
	}
	cur := h.servingChild()
	load := startLoad(t, h.bins, h.addr, 200, "--conns", "4", "--new-conn-fraction", "0.5")

	const exitMarker = "hrun-test-marker: exiting 1 at start"
	const hangMarker = "hrun-test-marker: never ready"
	cases := []struct {
		name, script, marker string
		logKind              string
		want                 []string // in handoff upgrade's stderr
		minTook              time.Duration
	}{
		{"exits-1", fmt.Sprintf("console.error(%q);\nprocess.exit(1);\n", exitMarker), exitMarker,
			"exited", []string{"exit status 1", exitMarker}, 0},
		{"never-ready", fmt.Sprintf("console.error(%q);\nsetInterval(() => {}, 1000);\n", hangMarker), hangMarker,
			"timeout", []string{"timed out", hangMarker}, 1900 * time.Millisecond},
	}
	for _, c := range cases {
		mark := h.logs.mark()
		h.writeApp(c.script)
		errOut, took := h.upgradeFails()
		t.Logf("%s: handoff upgrade exit 1 after %v:\n%s", c.name, took.Round(time.Millisecond), errOut)
		for _, w := range c.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("%s: handoff upgrade stderr does not contain %q:\n%s", c.name, w, errOut)
			}
		}
		if !strings.Contains(errOut, fmt.Sprintf("pid %d keeps serving", h.pid)) {
			t.Errorf("%s: handoff upgrade stderr does not say that pid %d keeps serving:\n%s", c.name, h.pid, errOut)
		}
		if took < c.minTook || took > 15*time.Second {
			t.Errorf("%s: handoff upgrade took %v, want between %v and 15s", c.name, took, c.minTook)
		}
		fl := h.logs.waitLog(t, mark, "upgrade failed", pidIs(h.pid), 5*time.Second)
		if k := fl.str("kind"); k != c.logKind {
			t.Errorf("%s: upgrade failed kind %q, want %q: %s", c.name, k, c.logKind, fl.raw)
		}
		broken, _ := fl.num("child_pid")
		if broken <= 1 || int(broken) == cur {
			t.Errorf("%s: upgrade failed names child %d: %s", c.name, broken, fl.raw)
		}
		if !h.logs.contains(mark, fmt.Sprintf("[pid %d] %s", broken, c.marker)) {
			t.Errorf("%s: no %q line prefixed [pid %d] in handoff's output", c.name, c.marker, broken)
		}
		h.waitOnlyChild(cur, "node", 10*time.Second)
		if alive(int(broken)) {
			t.Errorf("%s: broken child %d still alive", c.name, broken)
		}
		h.waitHealthz(cur, 5*time.Second)
		h.checkHandoff(t)
		st := h.status()
		if st.LastUpgrade == nil || st.LastUpgrade.OK || string(st.LastUpgrade.Kind) != c.logKind {
			t.Errorf("%s: status last_upgrade %+v, want a failure of kind %q", c.name, st.LastUpgrade, c.logKind)
		}
	}

	h.writeApp(string(good))
	newPID, out := h.upgrade()
	t.Logf("good script again: %s", strings.TrimSpace(out))
	if newPID == cur {
		t.Errorf("upgrade to the good script kept child %d", cur)
	}
	h.waitHealthz(newPID, 10*time.Second)
	h.waitOnlyChild(newPID, "node", 15*time.Second)
	h.checkHandoff(t)

	res, sent := load.stop()
	checkLoad(t, load, res, sent)
	for _, pid := range []int{cur, newPID} {
		if ps, ok := pidStat(res, pid); !ok || ps.Count == 0 {
			t.Errorf("child %d answered no load-tool request", pid)
		}
	}
}

// 3. A child that dies while serving is restarted.
func TestRunRestartsCrashedChild(t *testing.T) {
	h := startHrun(t, hrunOpts{})
	cur := h.servingChild()
	mark := h.logs.mark()
	if err := syscall.Kill(cur, syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL child %d: %v", cur, err)
	}
	died := h.logs.waitLog(t, mark, "child died while serving: restarting it", pidIs(h.pid), 10*time.Second)
	if n, _ := died.num("child_pid"); int(n) != cur {
		t.Errorf("child died log names child %d, want %d: %s", n, cur, died.raw)
	}
	if s := died.str("status"); s != "signal: killed" {
		t.Errorf("child died log status %q, want %q: %s", s, "signal: killed", died.raw)
	}
	if lv := died.str("level"); lv != "ERROR" {
		t.Errorf("child died logged at level %q, want ERROR: %s", lv, died.raw)
	}
	ready := h.logs.waitLog(t, mark, "child ready", pidIs(h.pid), 15*time.Second)
	n, _ := ready.num("child_pid")
	newPID := int(n)
	if newPID <= 1 || newPID == cur {
		t.Fatalf("child ready after the crash names child %d (crashed one %d): %s", newPID, cur, ready.raw)
	}
	if _, _, ok := h.logs.first(mark, "child started", func(l logLine) bool { c, _ := l.num("child_pid"); return int(c) == newPID }); !ok {
		t.Errorf("no child started log line for the restarted child %d", newPID)
	}
	h.waitHealthz(newPID, 10*time.Second)
	h.waitOnlyChild(newPID, "node", 10*time.Second)
	h.checkHandoff(t)
	if _, _, ok := h.logs.first(mark, "upgrade succeeded", nil); ok {
		t.Errorf("a restart was logged as an upgrade")
	}
}

// 4. SIGTERM to handoff: the request in flight completes, the child drains and
// exits, handoff exits 0 and removes its PID file and control socket.
func TestRunSIGTERM(t *testing.T) {
	h := startHrun(t, hrunOpts{})
	cur := h.servingChild()
	if _, err := os.Stat(h.control); err != nil {
		t.Fatalf("precondition: control socket %s: %v", h.control, err)
	}
	slow := startRequest(t, h.addr, h.port, "/slow?ms=1500", 30*time.Second)
	mark := h.logs.mark()
	if err := syscall.Kill(h.pid, syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM handoff %d: %v", h.pid, err)
	}
	h.logs.waitLog(t, mark, "stop requested", nil, 5*time.Second) // it has no pid field
	select {
	case <-slow.done:
		t.Fatalf("precondition: the 1.5s request finished before handoff took the SIGTERM: %v", slow)
	default:
	}
	if !waitChan(slow.done, 15*time.Second) {
		t.Fatalf("the request in flight at SIGTERM did not complete within 15s")
	}
	if slow.err != nil || slow.resp.status != 200 || slow.resp.pid != cur || slow.resp.body != "slept 1500 ms" {
		t.Errorf("request in flight at SIGTERM: %v, want 200 \"slept 1500 ms\" from child %d", slow, cur)
	}
	if !waitChan(h.exited, 15*time.Second) {
		t.Fatalf("handoff run did not exit within 15s of SIGTERM")
	}
	if code := h.cmd.ProcessState.ExitCode(); code != 0 {
		t.Errorf("handoff run exit status %d after SIGTERM, want 0 (%v)", code, h.cmd.ProcessState)
	}
	ex, _, ok := h.logs.first(mark, "child exited", func(l logLine) bool { n, _ := l.num("child_pid"); return int(n) == cur })
	if !ok {
		t.Errorf("no child exited log line for child %d", cur)
	} else if s := ex.str("status"); s != "exit status 0" {
		t.Errorf("child %d exited with %q, want exit status 0 (a drained exit): %s", cur, s, ex.raw)
	}
	if !poll(5*time.Second, func() bool { return !alive(cur) }) {
		t.Errorf("child %d still alive after handoff exited", cur)
	}
	for _, pid := range h.loggedChildren() {
		if h.ours(pid) {
			t.Errorf("child %d of handoff run still alive after it exited", pid)
		}
	}
	for _, f := range []string{h.pidfile, h.control} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s after SIGTERM: stat error %v, want it removed", f, err)
		}
	}
	if c, err := net.DialTimeout("tcp", h.addr, time.Second); err == nil {
		c.Close()
		t.Errorf("127.0.0.1:%d still accepts connections after handoff exited", h.port)
	}
}

// 5. The Python example (sd_notify readiness, HTTP/1.0) under light load: three
// upgrades, no request fails.
func TestRunPython(t *testing.T) {
	h := startHrun(t, hrunOpts{app: "python"})
	first := h.servingChild()
	load := startLoad(t, h.bins, h.addr, 200, "--conns", "4", "--new-conn-fraction", "0.5")
	children := []int{first}
	for i := 1; i <= 3; i++ {
		mark := h.logs.mark()
		newPID, out := h.upgrade()
		t.Logf("upgrade %d: %s", i, strings.TrimSpace(out))
		if slices.Contains(children, newPID) {
			t.Fatalf("upgrade %d: new child pid %d is not new (children so far %v)", i, newPID, children)
		}
		rd := h.logs.waitLog(t, mark, "child ready", func(l logLine) bool { n, _ := l.num("child_pid"); return int(n) == newPID }, 5*time.Second)
		if how := rd.str("how"); how != "sd_notify" {
			t.Errorf("upgrade %d: child %d ready by %q, want sd_notify: %s", i, newPID, how, rd.raw)
		}
		h.waitHealthz(newPID, 10*time.Second)
		old := children[len(children)-1]
		// The old child drains under the load before the next upgrade.
		h.waitFor(15*time.Second, func() bool { return !alive(old) }, "replaced child %d to exit", old)
		children = append(children, newPID)
	}
	res, sent := load.stop()
	checkLoad(t, load, res, sent)
	for i, pid := range children {
		if ps, ok := pidStat(res, pid); !ok || ps.Count == 0 {
			t.Errorf("child %d (pid %d) answered no load-tool request", i, pid)
		}
	}
	last := children[len(children)-1]
	h.waitOnlyChild(last, "python3", 15*time.Second)
	h.checkHandoff(t)
	h.checkDrained(t, children[:len(children)-1])
}

// TestRunAsPID1 runs handoff run as PID 1 of a PID namespace, as a container
// entrypoint: orphans of its children are reaped (no zombies pile up), it lives
// across an upgrade, and SIGTERM stops it with status 0.
func TestRunAsPID1(t *testing.T) {
	b := bins(t)
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("skipped: no unshare command to run handoff as PID 1 of a PID namespace")
	}
	if code, _, errOut := hrunCommand(t, 15*time.Second, unshare, "--pid", "--fork", "--mount-proc", "true"); code != 0 {
		t.Skipf("skipped: unshare --pid --fork does not work here (needs root or user namespaces): %s", errOut)
	}
	dir := t.TempDir()
	pidfile := filepath.Join(dir, "run.pid")
	// Each start leaves five orphans (their shell exits at once), which become
	// PID 1's to reap.
	child := `for i in 1 2 3 4 5; do sh -c 'sleep 0.05 &'; done
trap 'exit 0' TERM
eval "echo READY=1 >&$HANDOFF_READY_FD"
while :; do sleep 600 & wait $!; done`
	cmd := exec.Command(unshare, "--pid", "--fork", filepath.Join(b, "handoff-v1"), "run",
		"--listen", "127.0.0.1:0", "--pidfile", pidfile, "--log-format", "json", "--ready-timeout", "10s",
		"--", "/bin/sh", "-c", child)
	cmd.Dir = dir
	logs, exited := startPiped(t, cmd, "handoff run as PID 1", 100)
	pgid := cmd.Process.Pid
	t.Cleanup(func() {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		waitGroupGone(t, pgid, exited, logs, "unshare")
	})

	logs.waitLog(t, 0, "", func(l logLine) bool { return strings.Contains(l.msg(), "running as PID 1") }, 15*time.Second)
	logs.waitLog(t, 0, "ready", nil, 15*time.Second)
	// handoff's PID outside the namespace: the child of unshare.
	var handoff int
	eventually(t, 10*time.Second, func() bool {
		ps := procs(func(st procStat) bool { return st.ppid == pgid })
		if len(ps) == 1 {
			handoff = ps[0].pid
		}
		return handoff != 0
	}, "handoff's process under unshare")

	noZombies := func(when string) {
		t.Helper()
		if !poll(10*time.Second, func() bool {
			return len(procs(func(st procStat) bool { return st.ppid == handoff && st.state == 'Z' })) == 0
		}) {
			t.Errorf("%s: zombies left under handoff (PID 1): %v", when, procs(func(st procStat) bool { return st.ppid == handoff && st.state == 'Z' }))
		}
	}
	noZombies("after the first start")

	code, out, errOut := hrunCLI(t, b, 60*time.Second, "upgrade", "--pidfile", pidfile, "--wait")
	if code != 0 {
		t.Fatalf("upgrade of handoff run as PID 1: exit %d\n%s%s", code, out, errOut)
	}
	noZombies("after an upgrade")
	if !alive(handoff) {
		t.Fatalf("handoff (PID 1) exited across the upgrade: the container would have ended")
	}

	if err := syscall.Kill(handoff, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !waitChan(exited, 20*time.Second) {
		t.Fatalf("handoff run as PID 1 did not exit after SIGTERM")
	}
	if c := cmd.ProcessState.ExitCode(); c != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0", c)
	}
}

// hrunCommand runs a command to its end, bounded by timeout.
func hrunCommand(tb testing.TB, timeout time.Duration, name string, args ...string) (code int, stdout, stderr string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err := cmd.Run()
	if err != nil && cmd.ProcessState == nil {
		return -1, out.String(), errb.String() + err.Error()
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}
