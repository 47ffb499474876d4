package main_test

// Integration tests of `handoff run -- CMD`: handoff holds the listening
// socket and supervises a server written in another language (the Node.js and
// Python examples), starting a new child on each upgrade.
//
// handoff run is started by itest.StartRunner, whose cleanup also kills the
// supervised children (each in a process group of its own).

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
)

// 1. Ten upgrades of a Node.js server under load: no request fails, every
// upgrade starts a new child that then answers, handoff's own PID stays, and
// one child is left at the end.
func TestRunNodeUpgradesUnderLoad(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{})
	first := h.ServingChild()
	load := itest.StartLoad(t, h.Addr, loadRate, loadArgs()...)
	sampler := itest.StartChildSampler(h.PID, 3*time.Millisecond)
	defer sampler.Stop()

	children := []int{first}
	const upgrades = 10
	for i := 1; i <= upgrades; i++ {
		old := children[len(children)-1]
		mark := h.Logs.Mark()
		newPID, out := h.Upgrade()
		t.Logf("upgrade %d: %s", i, strings.TrimSpace(out))
		if slices.Contains(children, newPID) {
			t.Fatalf("upgrade %d: new child pid %d is not new (children so far %v)", i, newPID, children)
		}
		succ := h.Logs.Wait(t, mark, "upgrade succeeded", itest.PIDIs(h.PID), 5*time.Second)
		if n, _ := succ.Num("new_pid"); int(n) != newPID {
			t.Errorf("upgrade %d: upgrade succeeded logs new_pid %d, handoff upgrade said %d: %s", i, n, newPID, succ.Raw)
		}
		dr := h.Logs.Wait(t, mark, "draining old child", itest.PIDIs(h.PID), 5*time.Second)
		if n, _ := dr.Num("child_pid"); int(n) != old {
			t.Errorf("upgrade %d: draining old child %d, want the previous child %d: %s", i, n, old, dr.Raw)
		}
		h.WaitHealthz(newPID, 10*time.Second)
		h.CheckHandoff(t)
		children = append(children, newPID)
	}

	res, sent := load.Stop()
	sampler.Stop()
	load.Check(t, res, sent)
	for i, pid := range children {
		if ps, ok := itest.PIDStat(res, pid); !ok || ps.Count == 0 {
			t.Errorf("child %d (pid %d) answered no load-tool request", i, pid)
		}
	}
	if sampler.Max > 2 {
		t.Errorf("%d live children of handoff at once (%v), want at most 2 (serving + draining)", sampler.Max, sampler.MaxSeen)
	}
	last := children[len(children)-1]
	h.WaitOnlyChild(last, "node", 15*time.Second)
	h.CheckHandoff(t)
	if st := h.Status(); st.PID != h.PID || st.Phase != "serving" {
		t.Errorf("status at the end: pid %d phase %q, want pid %d serving", st.PID, st.Phase, h.PID)
	}
	h.CheckDrained(t, children[:len(children)-1])
	t.Logf("children: %v; at most %d at once in %d samples", children, sampler.Max, sampler.Samples)
}

// 2. Broken children: one that exits at start, one that never says it is
// ready. Each upgrade fails with the reason, the old child keeps serving, and
// nothing is left of the broken one; then the good script upgrades fine.
func TestRunBrokenChildren(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{ReadyTimeout: "2s"})
	good, err := os.ReadFile(h.App)
	if err != nil {
		t.Fatal(err)
	}
	cur := h.ServingChild()
	load := itest.StartLoad(t, h.Addr, 200, "--conns", "4", "--new-conn-fraction", "0.5")

	const exitMarker = "run-test-marker: exiting 1 at start"
	const hangMarker = "run-test-marker: never ready"
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
		mark := h.Logs.Mark()
		h.WriteApp(c.script)
		errOut, took := h.UpgradeFails()
		t.Logf("%s: handoff upgrade exit 1 after %v:\n%s", c.name, took.Round(time.Millisecond), errOut)
		for _, w := range c.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("%s: handoff upgrade stderr does not contain %q:\n%s", c.name, w, errOut)
			}
		}
		if !strings.Contains(errOut, fmt.Sprintf("pid %d keeps serving", h.PID)) {
			t.Errorf("%s: handoff upgrade stderr does not say that pid %d keeps serving:\n%s", c.name, h.PID, errOut)
		}
		if took < c.minTook || took > 15*time.Second {
			t.Errorf("%s: handoff upgrade took %v, want between %v and 15s", c.name, took, c.minTook)
		}
		fl := h.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(h.PID), 5*time.Second)
		if k := fl.Str("kind"); k != c.logKind {
			t.Errorf("%s: upgrade failed kind %q, want %q: %s", c.name, k, c.logKind, fl.Raw)
		}
		broken, _ := fl.Num("child_pid")
		if broken <= 1 || int(broken) == cur {
			t.Errorf("%s: upgrade failed names child %d: %s", c.name, broken, fl.Raw)
		}
		// handoff copies the child's output and gives it a second at most
		// before the verdict: the line may come after it.
		if !h.Logs.WaitContains(mark, fmt.Sprintf("[pid %d] %s", broken, c.marker), 5*time.Second) {
			t.Errorf("%s: no %q line prefixed [pid %d] in handoff's output", c.name, c.marker, broken)
		}
		h.WaitOnlyChild(cur, "node", 10*time.Second)
		if itest.Alive(int(broken)) {
			t.Errorf("%s: broken child %d still alive", c.name, broken)
		}
		h.WaitHealthz(cur, 5*time.Second)
		h.CheckHandoff(t)
		st := h.Status()
		if st.LastUpgrade == nil || st.LastUpgrade.OK || string(st.LastUpgrade.Kind) != c.logKind {
			t.Errorf("%s: status last_upgrade %+v, want a failure of kind %q", c.name, st.LastUpgrade, c.logKind)
		}
	}

	h.WriteApp(string(good))
	newPID, out := h.Upgrade()
	t.Logf("good script again: %s", strings.TrimSpace(out))
	if newPID == cur {
		t.Errorf("upgrade to the good script kept child %d", cur)
	}
	h.WaitHealthz(newPID, 10*time.Second)
	h.WaitOnlyChild(newPID, "node", 15*time.Second)
	h.CheckHandoff(t)

	res, sent := load.Stop()
	load.Check(t, res, sent)
	for _, pid := range []int{cur, newPID} {
		if ps, ok := itest.PIDStat(res, pid); !ok || ps.Count == 0 {
			t.Errorf("child %d answered no load-tool request", pid)
		}
	}
}

// 3. A child that dies while serving is restarted.
func TestRunRestartsCrashedChild(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{})
	cur := h.ServingChild()
	mark := h.Logs.Mark()
	if err := syscall.Kill(cur, syscall.SIGKILL); err != nil {
		t.Fatalf("SIGKILL child %d: %v", cur, err)
	}
	died := h.Logs.Wait(t, mark, "child died while serving: restarting it", itest.PIDIs(h.PID), 10*time.Second)
	if n, _ := died.Num("child_pid"); int(n) != cur {
		t.Errorf("child died log names child %d, want %d: %s", n, cur, died.Raw)
	}
	if s := died.Str("status"); s != "signal: killed" {
		t.Errorf("child died log status %q, want %q: %s", s, "signal: killed", died.Raw)
	}
	if lv := died.Str("level"); lv != "ERROR" {
		t.Errorf("child died logged at level %q, want ERROR: %s", lv, died.Raw)
	}
	ready := h.Logs.Wait(t, mark, "child ready", itest.PIDIs(h.PID), 15*time.Second)
	n, _ := ready.Num("child_pid")
	newPID := int(n)
	if newPID <= 1 || newPID == cur {
		t.Fatalf("child ready after the crash names child %d (crashed one %d): %s", newPID, cur, ready.Raw)
	}
	if _, _, ok := h.Logs.First(mark, "child started", func(l itest.Line) bool { c, _ := l.Num("child_pid"); return int(c) == newPID }); !ok {
		t.Errorf("no child started log line for the restarted child %d", newPID)
	}
	h.WaitHealthz(newPID, 10*time.Second)
	h.WaitOnlyChild(newPID, "node", 10*time.Second)
	h.CheckHandoff(t)
	if _, _, ok := h.Logs.First(mark, "upgrade succeeded", nil); ok {
		t.Errorf("a restart was logged as an upgrade")
	}
}

// 4. SIGTERM to handoff: new connections are refused at once, the request in
// flight completes, the child drains and exits, handoff exits 0 and removes
// its PID file and control socket.
func TestRunSIGTERM(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{})
	cur := h.ServingChild()
	if _, err := os.Stat(h.Control); err != nil {
		t.Fatalf("precondition: control socket %s: %v", h.Control, err)
	}
	slow := itest.StartRequest(t, h.Addr, h.Port, "/slow?ms=5000", 30*time.Second)
	mark := h.Logs.Mark()
	if err := syscall.Kill(h.PID, syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM handoff %d: %v", h.PID, err)
	}
	h.Logs.Wait(t, mark, "stop requested", nil, 5*time.Second) // it has no pid field
	// A new connection is refused once the stop began (the child closed its
	// socket, handoff its own), not queued where no one will accept it.
	if !itest.Poll(3*time.Second, func() bool {
		c, err := net.DialTimeout("tcp", h.Addr, time.Second)
		if err == nil {
			c.Close()
		}
		return errors.Is(err, syscall.ECONNREFUSED)
	}) {
		t.Errorf("127.0.0.1:%d still accepts connections 3 s after the stop began (a request in flight holds the drain)", h.Port)
	}
	select {
	case <-slow.Done:
		t.Fatalf("precondition: the request finished before handoff took the SIGTERM and refused connections: %v", slow)
	default:
	}
	if !itest.WaitChan(slow.Done, 15*time.Second) {
		t.Fatalf("the request in flight at SIGTERM did not complete within 15s")
	}
	if slow.Err != nil || slow.Resp.Status != 200 || slow.Resp.PID != cur || slow.Resp.Body != "slept 5000 ms" {
		t.Errorf("request in flight at SIGTERM: %v, want 200 \"slept 5000 ms\" from child %d", slow, cur)
	}
	// Wait returns once handoff was reaped and its output read to the end:
	// the child exited line, written before handoff exited, is in Logs.
	if st := h.Wait(t, 15*time.Second); st.ExitCode() != 0 {
		t.Errorf("handoff run exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	ex, _, ok := h.Logs.First(mark, "child exited", func(l itest.Line) bool { n, _ := l.Num("child_pid"); return int(n) == cur })
	if !ok {
		t.Errorf("no child exited log line for child %d", cur)
	} else if s := ex.Str("status"); s != "exit status 0" {
		t.Errorf("child %d exited with %q, want exit status 0 (a drained exit): %s", cur, s, ex.Raw)
	}
	if !itest.Poll(5*time.Second, func() bool { return !itest.Alive(cur) }) {
		t.Errorf("child %d still alive after handoff exited", cur)
	}
	for _, pid := range h.LoggedChildren() {
		if h.Ours(pid) {
			t.Errorf("child %d of handoff run still alive after it exited", pid)
		}
	}
	for _, f := range []string{h.PIDFile, h.Control} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s after SIGTERM: stat error %v, want it removed", f, err)
		}
	}
	if c, err := net.DialTimeout("tcp", h.Addr, time.Second); err == nil {
		c.Close()
		t.Errorf("127.0.0.1:%d still accepts connections after handoff exited", h.Port)
	}
}

// 5. The Python example (sd_notify readiness, HTTP/1.0) under light load: three
// upgrades, no request fails.
func TestRunPython(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{App: "python"})
	first := h.ServingChild()
	load := itest.StartLoad(t, h.Addr, 200, "--conns", "4", "--new-conn-fraction", "0.5")
	children := []int{first}
	for i := 1; i <= 3; i++ {
		mark := h.Logs.Mark()
		newPID, out := h.Upgrade()
		t.Logf("upgrade %d: %s", i, strings.TrimSpace(out))
		if slices.Contains(children, newPID) {
			t.Fatalf("upgrade %d: new child pid %d is not new (children so far %v)", i, newPID, children)
		}
		rd := h.Logs.Wait(t, mark, "child ready", func(l itest.Line) bool { n, _ := l.Num("child_pid"); return int(n) == newPID }, 5*time.Second)
		if how := rd.Str("how"); how != "sd_notify" {
			t.Errorf("upgrade %d: child %d ready by %q, want sd_notify: %s", i, newPID, how, rd.Raw)
		}
		h.WaitHealthz(newPID, 10*time.Second)
		old := children[len(children)-1]
		// The old child drains under the load before the next upgrade.
		h.WaitFor(15*time.Second, func() bool { return !itest.Alive(old) }, "replaced child %d to exit", old)
		children = append(children, newPID)
	}
	res, sent := load.Stop()
	load.Check(t, res, sent)
	for i, pid := range children {
		if ps, ok := itest.PIDStat(res, pid); !ok || ps.Count == 0 {
			t.Errorf("child %d (pid %d) answered no load-tool request", i, pid)
		}
	}
	last := children[len(children)-1]
	h.WaitOnlyChild(last, "python3", 15*time.Second)
	h.CheckHandoff(t)
	h.CheckDrained(t, children[:len(children)-1])
}

// TestRunAsPID1 runs handoff run as PID 1 of a PID namespace, as a container
// entrypoint: orphans of its children are reaped (no zombies pile up), it lives
// across an upgrade, and SIGTERM stops it with status 0.
func TestRunAsPID1(t *testing.T) {
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("skipped: no unshare command to run handoff as PID 1 of a PID namespace")
	}
	if r := itest.Run(t, 15*time.Second, unshare, "--pid", "--fork", "--mount-proc", "true"); r.Code != 0 {
		t.Skipf("skipped: unshare --pid --fork does not work here (needs root or user namespaces): %s", r.Stderr)
	}
	handoffBin := itest.Binary(t, "handoff-v1")
	dir := t.TempDir()
	pidfile := filepath.Join(dir, "run.pid")
	// Each start leaves five orphans (their shell exits at once), which become
	// PID 1's to reap.
	child := `for i in 1 2 3 4 5; do sh -c 'sleep 0.05 &'; done
trap 'exit 0' TERM
eval "echo READY=1 >&$HANDOFF_READY_FD"
while :; do sleep 600 & wait $!; done`
	cmd := exec.Command(unshare, "--pid", "--fork", handoffBin, "run",
		"--listen", "127.0.0.1:0", "--pidfile", pidfile, "--log-format", "json", "--ready-timeout", "10s",
		"--", "/bin/sh", "-c", child)
	cmd.Dir = dir
	p := itest.StartCmd(t, cmd)
	logs, pgid := p.Logs, p.PID

	logs.Wait(t, 0, "", func(l itest.Line) bool { return strings.Contains(l.Msg(), "running as PID 1") }, 15*time.Second)
	logs.Wait(t, 0, "ready", nil, 15*time.Second)
	// handoff's PID outside the namespace: the child of unshare.
	var handoff int
	itest.Eventually(t, 10*time.Second, func() bool {
		ps := itest.Procs(func(st itest.Stat) bool { return st.PPID == pgid })
		if len(ps) == 1 {
			handoff = ps[0].PID
		}
		return handoff != 0
	}, "handoff's process under unshare")

	noZombies := func(when string) {
		t.Helper()
		if !itest.Poll(10*time.Second, func() bool {
			return len(itest.Procs(func(st itest.Stat) bool { return st.PPID == handoff && st.State == 'Z' })) == 0
		}) {
			t.Errorf("%s: zombies left under handoff (PID 1): %v", when, itest.Procs(func(st itest.Stat) bool { return st.PPID == handoff && st.State == 'Z' }))
		}
	}
	noZombies("after the first start")

	if r := itest.Run(t, 60*time.Second, handoffBin, "upgrade", "--pidfile", pidfile, "--wait"); r.Code != 0 {
		t.Fatalf("upgrade of handoff run as PID 1: %v", r)
	}
	noZombies("after an upgrade")
	if !itest.Alive(handoff) {
		t.Fatalf("handoff (PID 1) exited across the upgrade: the container would have ended")
	}

	if err := syscall.Kill(handoff, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if st := p.Wait(t, 20*time.Second); st.ExitCode() != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
}

// 6. handoff run killed with SIGKILL cannot remove the directory of its
// children's notify sockets; the next handoff run on the machine (the same
// TMPDIR) removes it, and removes its own when it stops.
func TestRunSweepsTheNotifyDirOfAKilledRun(t *testing.T) {
	tmp := itest.ShortTempDir(t)
	dirs := func() []string {
		ds, err := filepath.Glob(filepath.Join(tmp, "handoff-run-*"))
		if err != nil {
			t.Fatal(err)
		}
		return ds
	}
	a := itest.StartRunner(t, itest.RunnerOpts{TmpDir: tmp})
	left := dirs()
	if len(left) != 1 {
		t.Fatalf("notify directories of a running handoff run in %s: %v, want 1", tmp, left)
	}
	itest.KillRun(t, a.Proc, a.Dir) // SIGKILL: handoff removes nothing
	if got := dirs(); !slices.Equal(got, left) {
		t.Fatalf("precondition: notify directories after a SIGKILL: %v, want %v still there", got, left)
	}

	b := itest.StartRunner(t, itest.RunnerOpts{TmpDir: tmp})
	if got := dirs(); len(got) != 1 || got[0] == left[0] {
		t.Errorf("notify directories once a second handoff run started: %v, want only its own (not %s)", got, left[0])
	}
	if err := syscall.Kill(b.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if st := b.Wait(t, 20*time.Second); st.ExitCode() != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	if got := dirs(); len(got) != 0 {
		t.Errorf("notify directories after handoff run stopped: %v, want none", got)
	}
}
