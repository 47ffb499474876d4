package itest

import (
	"bytes"
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

	"github.com/handoff-dev/handoff/internal/control"
)

// RunnerOpts configure [StartRunner].
type RunnerOpts struct {
	ReadyTimeout string // --ready-timeout; default 5s
	DrainTimeout string // --drain-timeout; default 10s
	// App is the example copied into the temp dir as the program to run:
	// "node" (examples/node/server.js -> DIR/app.js, run as node DIR/app.js,
	// the default) or "python" (examples/python/server.py -> DIR/server.py,
	// run as python3 DIR/server.py).
	App string
	// TmpDir is handoff's TMPDIR, where it keeps its children's notify
	// sockets; default a directory of the test's own (see ShortTempDir).
	TmpDir string
}

// Runner is `handoff-v1 run ... -- CMD` under test: handoff holds the
// listening socket and supervises children, each in a process group of its
// own.
type Runner struct {
	*Proc          // handoff itself; Proc.PID is its PID and process group
	Dir     string // the temp dir
	App     string // the script the children run (DIR/app.js or DIR/server.py)
	PIDFile string
	Control string // the control socket: PIDFILE.sock
	Addr    string // 127.0.0.1:PORT actually bound
	Port    int

	tb testing.TB
}

// SkipWithout skips tb when bin is not on PATH.
func SkipWithout(tb testing.TB, bin string) {
	tb.Helper()
	if _, err := exec.LookPath(bin); err != nil {
		tb.Skipf("%s is not installed (not on PATH): skipping the test that needs it", bin)
	}
}

// StartRunner copies the example to a temp dir and starts
//
//	handoff-v1 run --listen 127.0.0.1:0 --pidfile DIR/run.pid --log-format json
//	    --drain-timeout D --ready-timeout R -- node DIR/app.js
//
// with [StartCmd]. handoff logs the address it was asked for (127.0.0.1:0),
// not the port it got, so the port is found in /proc: the LISTEN socket on
// 127.0.0.1 whose inode handoff holds. It blocks until handoff logged
// "ready", the PID file names it, and GET /healthz answers from its one
// child. The test is skipped when the interpreter is not installed.
//
// handoff's TMPDIR, where it keeps its children's notify sockets, is o.TmpDir
// or a [ShortTempDir]. The test's cleanup leaves nothing behind: with handoff
// frozen (SIGSTOP, so that it starts no child meanwhile), every child's
// process group is SIGKILLed; handoff is then let go to reap them, frozen
// again, and its own group SIGKILLed. Any child handoff ever logged that still
// runs is killed last.
func StartRunner(tb testing.TB, o RunnerOpts) *Runner {
	tb.Helper()
	if o.ReadyTimeout == "" {
		o.ReadyTimeout = "5s"
	}
	if o.DrainTimeout == "" {
		o.DrainTimeout = "10s"
	}
	var interp, src, name string
	switch o.App {
	case "", "node":
		interp, src, name = "node", filepath.Join("examples", "node", "server.js"), "app.js"
	case "python":
		interp, src, name = "python3", filepath.Join("examples", "python", "server.py"), "server.py"
	default:
		tb.Fatalf("unknown app %q", o.App)
	}
	SkipWithout(tb, interp)
	root, err := ModuleRoot()
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	h := &Runner{
		tb:      tb,
		Dir:     dir,
		App:     filepath.Join(dir, name),
		PIDFile: filepath.Join(dir, "run.pid"),
	}
	h.Control = h.PIDFile + ".sock"
	CopyFile(tb, filepath.Join(root, src), h.App, 0o644)

	cmd := exec.Command(Binary(tb, "handoff-v1"), "run",
		"--listen", "127.0.0.1:0",
		"--pidfile", h.PIDFile,
		"--log-format", "json",
		"--drain-timeout", o.DrainTimeout,
		"--ready-timeout", o.ReadyTimeout,
		"--", interp, h.App)
	cmd.Dir = dir
	tmp := o.TmpDir
	if tmp == "" {
		tmp = ShortTempDir(tb)
	}
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	h.Proc = StartCmd(tb, cmd)
	tb.Cleanup(h.kill) // before the Proc's own kill

	h.WaitLog(tb, 0, "listening", nil, 15*time.Second) // it has no pid field
	h.WaitFor(15*time.Second, func() bool { _, _, ok := h.Logs.First(0, "ready", PIDIs(h.PID)); return ok },
		`handoff %d to log "ready"`, h.PID)
	h.WaitFor(10*time.Second, func() bool {
		h.Port = ListenPort(h.PID)
		return h.Port != 0
	}, "a LISTEN socket on 127.0.0.1 held by handoff %d", h.PID)
	h.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(h.Port))
	h.WaitFor(10*time.Second, func() bool { p, err := h.ReadPID(); return err == nil && p == h.PID },
		"PID file %s to name handoff %d", h.PIDFile, h.PID)
	child := h.ServingChild()
	h.WaitHealthz(child, 10*time.Second)
	return h
}

// pollRunning is Poll, except that it stops at once if handoff exits:
// exited then says so (and ok is true, as cond was not asked).
func (h *Runner) pollRunning(timeout time.Duration, cond func() bool) (ok, exited bool) {
	ok = Poll(timeout, func() bool {
		if !h.Running() {
			exited = true
			return true
		}
		return cond()
	})
	return ok, exited
}

// WaitFor is [Eventually], except that it fails at once if handoff exited.
func (h *Runner) WaitFor(timeout time.Duration, cond func() bool, format string, args ...any) {
	h.tb.Helper()
	ok, exited := h.pollRunning(timeout, cond)
	switch {
	case exited:
		h.tb.Fatalf("handoff run exited (%v) while waiting for: %s", h.Cmd.ProcessState, fmt.Sprintf(format, args...))
	case !ok:
		h.tb.Fatalf("timed out after %v waiting for: %s", timeout, fmt.Sprintf(format, args...))
	}
}

// ReadPID returns the PID that the PID file names (see [ReadPIDFile]).
func (h *Runner) ReadPID() (int, error) { return ReadPIDFile(h.PIDFile) }

// CheckHandoff asserts that handoff is still running with the PID it started
// with, and that the PID file still names it.
func (h *Runner) CheckHandoff(t testing.TB) {
	t.Helper()
	if !h.Running() {
		t.Fatalf("handoff run %d exited: %v", h.PID, h.Cmd.ProcessState)
	}
	if p, err := h.ReadPID(); err != nil || p != h.PID {
		t.Errorf("PID file names %d (err %v), want handoff's own PID %d", p, err, h.PID)
	}
}

// LoggedChildren returns every child PID handoff logged as started.
func (h *Runner) LoggedChildren() []int { return LoggedChildren(h.Proc) }

// Ours reports whether pid is alive and runs our script (its command line
// names the temp dir), so that a recycled PID is never killed.
func (h *Runner) Ours(pid int) bool { return RunsIn(pid, h.Dir) }

// kill is the cleanup described at StartRunner.
func (h *Runner) kill() { KillRun(h.tb, h.Proc, h.Dir) }

// LoggedChildren returns the PIDs of every child that the handoff run p
// logged as started.
func LoggedChildren(p *Proc) []int {
	ls, _ := p.Logs.Find(0, "child started", PIDIs(p.PID))
	var out []int
	for _, l := range ls {
		if n, ok := l.Num("child_pid"); ok && n > 1 {
			out = append(out, int(n))
		}
	}
	return out
}

// RunsIn reports whether pid is alive and its command line names dir (a
// test's temp dir), so that a recycled PID is never killed.
func RunsIn(pid int, dir string) bool {
	if !Alive(pid) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(b, []byte(dir))
}

// KillRun is the cleanup of a handoff run p whose children run from dir: with
// handoff frozen (so that it starts no child meanwhile) every child's process
// group is SIGKILLed, handoff is let go to reap them, frozen again, its group
// killed (the Proc's kill); any child it ever logged that still runs goes
// last, and tb fails if one is still alive 10 s later.
func KillRun(tb testing.TB, p *Proc, dir string) {
	if p.Running() {
		_ = syscall.Kill(p.PID, syscall.SIGSTOP)
		kids := PIDs(Children(p.PID))
		for _, k := range kids {
			KillGroup(k)
		}
		_ = syscall.Kill(p.PID, syscall.SIGCONT)
		// handoff reaps its killed children (zombies keep their parent).
		Poll(5*time.Second, func() bool {
			for _, k := range Children(p.PID) {
				if slices.Contains(kids, k.PID) {
					return false
				}
			}
			return true
		})
		_ = syscall.Kill(p.PID, syscall.SIGSTOP)
		for _, k := range Children(p.PID) { // a restart started meanwhile
			KillGroup(k.PID)
		}
	}
	p.Kill()
	var left []int
	for _, pid := range LoggedChildren(p) {
		if RunsIn(pid, dir) {
			KillGroup(pid)
			left = append(left, pid)
		}
	}
	if !Poll(10*time.Second, func() bool {
		for _, pid := range left {
			if Alive(pid) {
				return false
			}
		}
		return true
	}) {
		tb.Errorf("children %v of handoff run still alive 10s after SIGKILL", left)
	}
}

// Status runs handoff status --pidfile F --json (see [Status]).
func (h *Runner) Status() control.Status {
	h.tb.Helper()
	return Status(h.tb, h.PIDFile)
}

// ServingChild waits (10s) for status to report exactly one child, serving,
// and returns it.
func (h *Runner) ServingChild() int {
	h.tb.Helper()
	var st control.Status
	h.WaitFor(10*time.Second, func() bool {
		st = h.Status()
		return len(st.Children) == 1 && st.Children[0].Phase == "serving"
	}, "status to list exactly one serving child")
	if st.PID != h.PID {
		h.tb.Errorf("status pid %d, want handoff's %d", st.PID, h.PID)
	}
	return st.Children[0].PID
}

var runUpgradedRE = regexp.MustCompile(`^upgraded: pid (\d+) -> (\d+),`)

// ParseRunUpgraded parses the start of handoff upgrade's success line for
// handoff run: "upgraded: pid HANDOFF -> CHILD,".
func ParseRunUpgraded(stdout string) (handoffPID, childPID int, ok bool) {
	m := runUpgradedRE.FindStringSubmatch(stdout)
	if m == nil {
		return 0, 0, false
	}
	handoffPID, _ = strconv.Atoi(m[1])
	childPID, _ = strconv.Atoi(m[2])
	return handoffPID, childPID, true
}

// UpgradeCLI runs handoff upgrade --pidfile F --wait (60s at most).
func (h *Runner) UpgradeCLI(tb testing.TB) Result {
	tb.Helper()
	cmd := exec.Command(Binary(tb, "handoff-v1"), "upgrade", "--pidfile", h.PIDFile, "--wait")
	cmd.Env = CleanEnv(nil)
	return RunCmd(tb, 60*time.Second, cmd)
}

// Upgrade runs handoff upgrade --pidfile F --wait, requires exit 0 and
// returns the new child's PID named on its stdout, and the stdout.
func (h *Runner) Upgrade() (newPID int, out string) {
	h.tb.Helper()
	r := h.UpgradeCLI(h.tb)
	if r.Code != 0 {
		h.tb.Fatalf("handoff upgrade: exit %d, want 0\n%v", r.Code, r)
	}
	p, newPID, ok := ParseRunUpgraded(r.Stdout)
	if !ok {
		h.tb.Fatalf("handoff upgrade stdout %q does not match %v", r.Stdout, runUpgradedRE)
	}
	if p != h.PID {
		h.tb.Errorf("handoff upgrade says pid %d answered, want handoff's %d: %q", p, h.PID, r.Stdout)
	}
	if newPID <= 1 {
		h.tb.Fatalf("handoff upgrade names new child pid %d: %q", newPID, r.Stdout)
	}
	return newPID, r.Stdout
}

// UpgradeFails runs handoff upgrade --pidfile F --wait and requires exit 1.
func (h *Runner) UpgradeFails() (stderr string, took time.Duration) {
	h.tb.Helper()
	r := h.UpgradeCLI(h.tb)
	if r.Code != 1 {
		h.tb.Fatalf("handoff upgrade: exit %d, want 1\n%v", r.Code, r)
	}
	return r.Stderr, r.Took
}

// WaitHealthz waits until GET /healthz on a fresh connection answers 200 "ok"
// from pid three times in a row.
func (h *Runner) WaitHealthz(pid int, timeout time.Duration) {
	h.tb.Helper()
	streak := 0
	last := "none"
	ok, exited := h.pollRunning(timeout, func() bool {
		r, err := Get(h.Addr, "/healthz")
		if err != nil {
			last, streak = err.Error(), 0
			return false
		}
		last = fmt.Sprintf("status %d Handoff-Pid %d body %q", r.Status, r.PID, r.Body)
		if r.Status == 200 && r.PID == pid && r.Body == "ok" {
			streak++
		} else {
			streak = 0
		}
		return streak >= 3
	})
	if exited {
		h.tb.Fatalf("handoff run exited (%v) while waiting for GET /healthz to answer from child %d", h.Cmd.ProcessState, pid)
	}
	if !ok {
		h.tb.Fatalf("GET /healthz did not answer from child %d three times in a row within %v; last answer: %s", pid, timeout, last)
	}
}

// WaitOnlyChild waits until pid is handoff's only child, in status (serving)
// and in /proc (no other process, not even a zombie, has handoff as parent),
// and checks that the child runs comm (a prefix: python3 may be python3.11)
// and leads its own process group.
func (h *Runner) WaitOnlyChild(pid int, comm string, timeout time.Duration) {
	h.tb.Helper()
	var kids []Stat
	var st control.Status
	ok := Poll(timeout, func() bool {
		kids = Children(h.PID)
		if len(kids) != 1 || kids[0].PID != pid {
			return false
		}
		st = h.Status()
		return len(st.Children) == 1 && st.Children[0].PID == pid && st.Children[0].Phase == "serving"
	})
	if !ok {
		h.tb.Fatalf("want exactly one child %d of handoff %d within %v; /proc children: %v; status children: %+v",
			pid, h.PID, timeout, kids, h.Status().Children)
	}
	if !strings.HasPrefix(kids[0].Comm, comm) || kids[0].State == 'Z' {
		h.tb.Errorf("handoff's child %v, want a live %s", kids[0], comm)
	}
	if kids[0].PGRP != pid {
		h.tb.Errorf("child %v is not the leader of its own process group", kids[0])
	}
}

// CheckDrained asserts that each replaced child exited by itself with status 0
// (it drained; waiting 15s for each log line) and that handoff never had to
// kill one at the drain deadline.
func (h *Runner) CheckDrained(t testing.TB, replaced []int) {
	t.Helper()
	for _, pid := range replaced {
		var l Line
		ok := Poll(15*time.Second, func() bool {
			var found bool
			l, _, found = h.Logs.First(0, "old child exited", NumIs("child_pid", pid))
			return found
		})
		switch {
		case !ok:
			t.Errorf("no old child exited log line for replaced child %d", pid)
		case l.Str("status") != "exit status 0":
			t.Errorf("replaced child %d exited with %q, want exit status 0 (drained): %s", pid, l.Str("status"), l.Raw)
		}
		if Alive(pid) {
			t.Errorf("replaced child %d still alive", pid)
		}
	}
	if ls, _ := h.Logs.Find(0, "old child still running at the drain deadline: killing its process group", nil); len(ls) > 0 {
		t.Errorf("handoff killed %d old children at the drain deadline: %s", len(ls), ls[0].Raw)
	}
}

// WriteApp renames a new script over the one the children run.
func (h *Runner) WriteApp(src string) {
	h.tb.Helper()
	tmp := h.App + ".new"
	if err := os.WriteFile(tmp, []byte(src), 0o644); err != nil {
		h.tb.Fatal(err)
	}
	if err := os.Rename(tmp, h.App); err != nil {
		h.tb.Fatal(err)
	}
}

// ShortTempDir is a temporary directory that the test's cleanup removes, with
// a path short enough for Unix sockets in it (a sun_path holds 107 bytes;
// tb.TempDir's paths carry the test's name).
func ShortTempDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "ho-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
