package main_test

// Integration tests: they exec the real handoff binary (built once per test
// process, see bins) and check the zero-downtime upgrade contract from the
// outside. Every process they start runs in its own process group that the
// test's cleanup kills and waits for. Traffic goes to 127.0.0.1 only.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Load used by the "under load" cases: open loop at loadRate req/s, a mix of
// pooled keep-alive connections, a new connection per request (30%) and slow
// requests (2%, 300ms).
const loadRate = 1000

func loadArgs() []string {
	return []string{"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", "300ms"}
}

// checkListener asserts that 127.0.0.1:port still has exactly one LISTEN
// socket, the one the first generation bound, and that pid holds it.
func (s *server) checkListener(t *testing.T, pid int) {
	t.Helper()
	if ins := listenInodes(s.port); len(ins) != 1 || ins[0] != s.inode {
		t.Errorf("LISTEN sockets on 127.0.0.1:%d: inodes %v, want exactly the original [%d]", s.port, ins, s.inode)
	}
	if !hasSocketInode(pid, s.inode) {
		ts, _ := fdTargets(pid)
		t.Errorf("pid %d holds no descriptor for the listening socket inode %d; its fds: %v", pid, s.inode, ts)
	}
}

// checkOneProcess asserts that exactly one handoff process, pid, is left in
// the server's process group.
func (s *server) checkOneProcess(t *testing.T, pid int) {
	t.Helper()
	if !poll(10*time.Second, func() bool { ps := s.procs(); return len(ps) == 1 && ps[0] == pid }) {
		t.Errorf("live processes in the server's group: %v, want exactly [%d]", s.procs(), pid)
	}
}

// a. At least 10 upgrades under load; nothing fails, the socket is the same.
func TestUpgradesUnderLoad(t *testing.T) {
	s := startServer(t, serverOpts{})
	first := s.pid()
	load := startLoad(t, s.bins, s.addr, loadRate, loadArgs()...)

	type gen struct {
		pid        int
		version    string
		generation int64
	}
	gens := []gen{{pid: first, version: "v1"}}
	if l, _, ok := s.logs.first(0, "ready", pidIs(first)); ok {
		gens[0].generation, _ = l.num("generation")
	}
	const upgrades = 10
	for i := 1; i <= upgrades; i++ {
		mark := s.logs.mark()
		want := nextVersion(s.version)
		oldPID, newPID := s.upgrade(want, 20*time.Second)
		if newPID == oldPID {
			t.Fatalf("upgrade %d: PID unchanged (%d)", i, newPID)
		}
		ready := s.logs.waitLog(t, mark, "ready", pidIs(newPID), 5*time.Second)
		if v := ready.str("version"); v != want {
			t.Errorf("upgrade %d: ready log of pid %d has version %q, want %q", i, newPID, v, want)
		}
		g, ok := ready.num("generation")
		if !ok {
			t.Errorf("upgrade %d: ready log has no numeric generation: %s", i, ready.raw)
		} else if prev := gens[len(gens)-1].generation; g <= prev {
			t.Errorf("upgrade %d: generation %d does not increase (previous %d)", i, g, prev)
		}
		if l, _, ok := s.logs.first(mark, "listening", pidIs(newPID)); ok && l.str("addr") != s.addr {
			t.Errorf("upgrade %d: pid %d logs listening on %q, want the same address %q", i, newPID, l.str("addr"), s.addr)
		}
		s.checkListener(t, newPID)
		if prev := gens[len(gens)-1].version; prev == want {
			t.Errorf("upgrade %d: version did not change (%s)", i, want)
		}
		gens = append(gens, gen{pid: newPID, version: want, generation: g})
	}

	res, sent := load.stop()
	checkLoad(t, load, res, sent)
	seen := map[int]bool{}
	for i, g := range gens {
		if seen[g.pid] {
			t.Errorf("pid %d used by two generations", g.pid)
		}
		seen[g.pid] = true
		// Every generation served part of the load, with its own version.
		ps, ok := pidStat(res, g.pid)
		if !ok || ps.Count == 0 {
			t.Errorf("generation %d (pid %d, %s) answered no load-tool request", i, g.pid, g.version)
		} else if ps.Version != g.version {
			t.Errorf("generation %d (pid %d): load tool saw version %q, want %q", i, g.pid, ps.Version, g.version)
		}
	}
	last := gens[len(gens)-1].pid
	if p := s.pid(); p != last {
		t.Errorf("PID file names %d at the end, want %d", p, last)
	}
	s.checkListener(t, last)
	s.checkOneProcess(t, last)
	t.Logf("%d generations: %v", len(gens), gens)
}

// b. A slow request in flight at the upgrade is answered by the old
// generation; new requests go to the new one.
func TestSlowRequestSurvivesUpgrade(t *testing.T) {
	s := startServer(t, serverOpts{})
	oldPID := s.pid()
	slow := startRequest(t, s.addr, s.port, "/slow?ms=2000", 30*time.Second)

	mark := s.logs.mark()
	s.deploy("v2")
	s.signal(oldPID, syscall.SIGHUP)
	newPID := s.waitNewPID(oldPID, 20*time.Second)
	s.waitServing(newPID, "v2", 10*time.Second)
	select {
	case <-slow.done:
		t.Fatalf("precondition: the 2s request finished before the upgrade completed: %v", slow)
	default:
	}
	if !alive(oldPID) {
		t.Errorf("old pid %d exited while its 2s request was still in flight", oldPID)
	}
	s.logs.waitLog(t, mark, "draining", func(l logLine) bool { return l.pid() == oldPID && l.str("reason") == "upgrade" }, 10*time.Second)
	// Once the old generation drains, it no longer accepts: new requests
	// on new connections are all answered by the new one.
	streak := 0
	var last string
	if !poll(10*time.Second, func() bool {
		r, err := get(s.addr, "/hello/handoff")
		switch {
		case err != nil:
			t.Errorf("GET /hello/handoff during the drain: %v", err)
			return true
		case r.status != 200 || r.body != "Hello handoff!!!":
			t.Errorf("GET /hello/handoff during the drain: status %d body %q", r.status, r.body)
			return true
		case r.pid == newPID && r.version == "v2":
			streak++
		default:
			streak = 0
		}
		last = fmt.Sprintf("pid %d version %q", r.pid, r.version)
		return streak >= 5
	}) {
		t.Errorf("new requests not all answered by the new pid %d while the old drains; last: %s", newPID, last)
	}

	if !waitChan(slow.done, 15*time.Second) {
		t.Fatalf("slow request did not complete")
	}
	if slow.err != nil || slow.resp.status != 200 {
		t.Fatalf("slow request in flight at the upgrade: %v, want 200", slow)
	}
	if slow.resp.pid != oldPID || slow.resp.version != "v1" {
		t.Errorf("slow request answered by pid %d version %q, want the old pid %d version v1", slow.resp.pid, slow.resp.version, oldPID)
	}
	s.waitGone(oldPID, 15*time.Second)
	s.checkOneProcess(t, newPID)
}

// c. Broken new binaries, one at a time, under load: each upgrade fails
// with the right kind, the old generation keeps serving, nothing is left
// behind; then a good binary upgrades fine.
func TestBrokenBinariesUnderLoad(t *testing.T) {
	s := startServer(t, serverOpts{upgradeTimeout: "2s"})
	pid := s.pid()
	load := startLoad(t, s.bins, s.addr, loadRate, loadArgs()...)

	// One after the other in this goroutine (not subtests: the server's
	// helpers fail the test that started it).
	cases := []struct {
		name    string
		install func()
		kind    string
		errText string
		marker  string // a line the broken binary itself writes to stderr
	}{
		{"missing", func() {
			if err := os.Remove(s.live); err != nil {
				t.Fatal(err)
			}
		}, "binary-missing", "no such file", ""},
		{"not-executable", func() { s.deployFile(filepath.Join(s.bins, "handoff-v2"), 0o644) }, "binary-not-executable", "not executable", ""},
		{"exits-1", func() { s.deployFile(filepath.Join(s.bins, "exit1"), 0o755) }, "exited", "exit status 1", "testdata-exit1: pid"},
		{"hangs", func() { s.deployFile(filepath.Join(s.bins, "hang"), 0o755) }, "timeout", "timed out", "testdata-hang: pid"},
	}
	for _, c := range cases {
		mark := s.logs.mark()
		c.install()
		s.signal(pid, syscall.SIGHUP)
		l := s.logs.waitLog(t, mark, "upgrade failed", pidIs(pid), 15*time.Second)
		t.Logf("%s: %s", c.name, l.raw)
		if l.str("level") != "ERROR" {
			t.Errorf("%s: upgrade failed logged at level %q, want ERROR: %s", c.name, l.str("level"), l.raw)
		}
		if k := l.str("kind"); k != c.kind {
			t.Errorf("%s: upgrade failed kind %q, want %q: %s", c.name, k, c.kind, l.raw)
		}
		if e := l.str("error"); !strings.Contains(strings.ToLower(e), c.errText) {
			t.Errorf("%s: upgrade failed error %q does not contain %q", c.name, e, c.errText)
		}
		if c.marker != "" && !s.logs.contains(mark, c.marker) {
			t.Errorf("%s: the broken binary never ran: no %q line in the server's output", c.name, c.marker)
		}
		if p, err := s.readPID(); err != nil || p != pid {
			t.Errorf("%s: PID file after a failed upgrade: pid %d err %v, want %d", c.name, p, err, pid)
		}
		s.waitServing(pid, "v1", 5*time.Second)
		s.checkOneProcess(t, pid)
		if _, _, ok := s.logs.first(mark, "upgrade succeeded", nil); ok {
			t.Errorf("%s: upgrade succeeded logged for a broken binary", c.name)
		}
	}

	// Then a good binary upgrades fine.
	mark := s.logs.mark()
	oldPID, newPID := s.upgrade("v2", 20*time.Second)
	if oldPID != pid || newPID == pid {
		t.Errorf("upgrade after failures: %d -> %d, want from %d to a new pid", oldPID, newPID, pid)
	}
	succ := s.logs.waitLog(t, mark, "upgrade succeeded", pidIs(pid), 5*time.Second)
	if n, _ := succ.num("new_pid"); int(n) != newPID {
		t.Errorf("upgrade succeeded new_pid %d, want %d: %s", n, newPID, succ.raw)
	}
	s.checkListener(t, newPID)
	pid = newPID

	res, sent := load.stop()
	checkLoad(t, load, res, sent)
	s.checkOneProcess(t, pid)
}

// d. A burst of 20 SIGHUPs: coalesced/queued, never more than two
// generations at once, one at the end, no failed request.
func TestHUPBurstUnderLoad(t *testing.T) {
	s := startServer(t, serverOpts{})
	first := s.pid()
	load := startLoad(t, s.bins, s.addr, loadRate, loadArgs()...)
	sampler := startGroupSampler(s.pgid, 3*time.Millisecond)
	defer func() {
		select {
		case <-sampler.done:
		default:
			sampler.stop()
		}
	}()

	mark := s.logs.mark()
	s.deploy("v2")
	sent := 0
	for range 20 {
		p, err := s.readPID()
		if err != nil {
			t.Fatalf("PID file during the burst: %v", err)
		}
		// The PID may have just exited (it was being replaced): ESRCH is fine.
		if err := syscall.Kill(p, syscall.SIGHUP); err == nil {
			sent++
		}
	}

	// Settled: one live process, named by the PID file, serving, and every
	// queued upgrade has run (its process logged a later success or failure).
	settled := func() bool {
		ps := s.procs()
		p, err := s.readPID()
		if err != nil || len(ps) != 1 || ps[0] != p || p == first {
			return false
		}
		queued, qidx := s.logs.find(mark, "upgrade queued", nil)
		for i, q := range queued {
			if _, _, ok := s.logs.first(qidx[i]+1, "", func(l logLine) bool {
				return l.pid() == q.pid() && (l.msg() == "upgrade succeeded" || l.msg() == "upgrade failed")
			}); !ok {
				return false
			}
		}
		return true
	}
	eventually(t, 60*time.Second, settled, "the burst to settle to one new process")
	final := s.pid()
	s.waitServing(final, "v2", 10*time.Second)

	res, dur := load.stop()
	sampler.stop()
	checkLoad(t, load, res, dur)
	for _, p := range []int{first, final} {
		if ps, ok := pidStat(res, p); !ok || ps.Count == 0 {
			t.Errorf("pid %d answered no load-tool request: the load did not span the burst", p)
		}
	}
	if sampler.max > 2 {
		t.Errorf("%d live handoff processes at once (%v), want at most 2", sampler.max, sampler.maxSeen)
	}
	if sampler.max < 2 {
		t.Errorf("never saw the two generations of an upgrade in %d samples (max %d): the sampler is not working", sampler.samples, sampler.max)
	}
	if !settled() {
		t.Errorf("not settled at the end: processes %v", s.procs())
	}
	if p := s.pid(); p != final {
		t.Errorf("PID file changed after settling: %d -> %d", final, p)
	}
	s.checkOneProcess(t, final)
	s.checkListener(t, final)
	count := func(msg string) int { ls, _ := s.logs.find(mark, msg, nil); return len(ls) }
	succeeded := count("upgrade succeeded")
	if succeeded < 1 || succeeded > 20 {
		t.Errorf("%d upgrades succeeded for 20 HUPs, want 1..20", succeeded)
	}
	if n := count("upgrade failed"); n != 0 {
		t.Errorf("%d upgrades failed during the burst, want 0", n)
	}
	t.Logf("%d HUPs delivered; logs: %d requested, %d ignored, %d queued, %d succeeded; %d process samples, max %d; final pid %d",
		sent, count("upgrade requested"), count("upgrade ignored"), count("upgrade queued"), succeeded, sampler.samples, sampler.max, final)
}

// e. A HUP while the previous generation still drains is queued, and runs
// only once that generation has exited.
func TestHUPQueuedWhileDraining(t *testing.T) {
	s := startServer(t, serverOpts{})
	p1 := s.pid()
	slow := startRequest(t, s.addr, s.port, "/slow?ms=3000", 30*time.Second)

	s.deploy("v2")
	s.signal(p1, syscall.SIGHUP)
	p2 := s.waitNewPID(p1, 20*time.Second)
	s.waitServing(p2, "v2", 10*time.Second)
	if !alive(p1) {
		t.Fatalf("precondition: pid %d finished draining its 3s request before the second HUP", p1)
	}

	mark := s.logs.mark()
	s.deploy("v3")
	s.signal(p2, syscall.SIGHUP)
	q := s.logs.waitLog(t, mark, "upgrade queued", pidIs(p2), 5*time.Second)
	if r := q.str("reason"); r != "previous generation still draining" {
		t.Errorf("upgrade queued reason %q: %s", r, q.raw)
	}
	if !alive(p1) {
		t.Errorf("precondition: pid %d exited before the queued upgrade was logged", p1)
	}

	// Wait for the third generation; it must never appear while p1 lives.
	var p3 int
	var prev map[int]bool
	eventually(t, 20*time.Second, func() bool {
		p1Alive := alive(p1)
		p, err := s.readPID()
		if err == nil && p != p2 && p != p1 {
			if p1Alive {
				t.Errorf("third generation %d in the PID file while the first %d is still alive", p, p1)
			}
			p3 = p
			return true
		}
		var ps []int
		ps, prev = steady(prev, s.procs(), func(p int) int { return p })
		if len(ps) > 2 {
			var what []string
			for _, p := range ps {
				what = append(what, describe(p))
			}
			t.Errorf("%d live processes while an upgrade is queued:\n%s", len(ps), strings.Join(what, "\n"))
		}
		return false
	}, "the queued upgrade to produce a third generation")
	s.waitServing(p3, "v3", 10*time.Second)

	// The output is one pipe shared by all generations, so its order is the
	// order of the writes: p1's last line precedes every line of p3.
	_, p1Idx := s.logs.find(0, "", pidIs(p1))
	_, p3Idx := s.logs.find(0, "", pidIs(p3))
	if len(p1Idx) == 0 || len(p3Idx) == 0 {
		t.Errorf("no log lines from pid %d or pid %d", p1, p3)
	} else if last1, first3 := p1Idx[len(p1Idx)-1], p3Idx[0]; first3 < last1 {
		t.Errorf("pid %d logged (line %d) before pid %d's last line (line %d): the queued upgrade did not wait", p3, first3, p1, last1)
	}
	s.logs.waitLog(t, 0, "exiting", pidIs(p1), 10*time.Second)
	s.logs.waitLog(t, mark, "upgrade succeeded", pidIs(p2), 10*time.Second)
	_, exitIdx := s.logs.find(0, "exiting", pidIs(p1))
	_, succIdx := s.logs.find(mark, "upgrade succeeded", pidIs(p2))
	switch {
	case len(exitIdx) == 0:
		t.Errorf("pid %d never logged exiting", p1)
	case len(succIdx) == 0:
		t.Errorf("pid %d never logged upgrade succeeded", p2)
	case succIdx[0] < exitIdx[0]:
		t.Errorf("pid %d logged upgrade succeeded (line %d) before pid %d logged exiting (line %d)", p2, succIdx[0], p1, exitIdx[0])
	}

	s.waitSlowThenSettled(t, slow, p1, p2, p3)
}

// f. SIGTERM: graceful drain, exit 0, PID file removed; the drain timeout
// cuts long requests; a second SIGTERM cuts at once.
func TestSIGTERM(t *testing.T) {
	t.Run("drains-in-flight", func(t *testing.T) {
		s := startServer(t, serverOpts{})
		pid := s.pid()
		slow := startRequest(t, s.addr, s.port, "/slow?ms=1500", 30*time.Second)
		mark := s.logs.mark()
		s.signal(pid, syscall.SIGTERM)
		s.logs.waitLog(t, mark, "draining", func(l logLine) bool { return l.pid() == pid && l.str("reason") == "stop" }, 5*time.Second)
		if !waitChan(slow.done, 15*time.Second) {
			t.Fatalf("slow request did not complete")
		}
		if slow.err != nil || slow.resp.status != 200 || slow.resp.pid != pid {
			t.Errorf("slow request in flight at SIGTERM: %v, want 200 from pid %d", slow, pid)
		}
		if !waitChan(s.exited, 15*time.Second) {
			t.Fatalf("server did not exit within 15s of SIGTERM")
		}
		if code := s.exitCode(); code != 0 {
			t.Errorf("exit status %d after SIGTERM, want 0 (%v)", code, s.cmd.ProcessState)
		}
		if _, err := os.Stat(s.pidfile); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("PID file after SIGTERM: stat error %v, want it removed", err)
		}
		if _, _, ok := s.logs.first(mark, "exiting", pidIs(pid)); !ok {
			t.Errorf("no exiting log line")
		}
		if ps := s.procs(); len(ps) != 0 {
			t.Errorf("processes left after SIGTERM: %v", ps)
		}
	})

	t.Run("drain-timeout-cuts", func(t *testing.T) {
		s := startServer(t, serverOpts{drainTimeout: "1s"})
		pid := s.pid()
		slow := startRequest(t, s.addr, s.port, "/slow?ms=30000", 40*time.Second)
		mark := s.logs.mark()
		s.signal(pid, syscall.SIGTERM)
		if !waitChan(s.exited, 10*time.Second) {
			t.Fatalf("server with --drain-timeout 1s still running 10s after SIGTERM with a 30s request in flight")
		}
		if code := s.exitCode(); code != 0 {
			t.Errorf("exit status %d after a drain cut, want 0 (%v)", code, s.cmd.ProcessState)
		}
		d := s.logs.waitLog(t, mark, "drained", pidIs(pid), 5*time.Second)
		if cut, ok := d.num("cut"); !ok || cut < 1 {
			t.Errorf("drained log: cut=%d (present %v), want >= 1: %s", cut, ok, d.raw)
		}
		if !waitChan(slow.done, 5*time.Second) {
			t.Errorf("the cut request's connection is still open after the server exited")
		} else if slow.err == nil && slow.resp.status == 200 {
			t.Errorf("a 30s request completed with 200 despite a 1s drain timeout: %v", slow)
		}
		if _, err := os.Stat(s.pidfile); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("PID file after SIGTERM: stat error %v, want it removed", err)
		}
	})

	t.Run("second-signal-cuts", func(t *testing.T) {
		s := startServer(t, serverOpts{drainTimeout: "60s"})
		pid := s.pid()
		startRequest(t, s.addr, s.port, "/slow?ms=30000", 40*time.Second)
		mark := s.logs.mark()
		s.signal(pid, syscall.SIGTERM)
		s.logs.waitLog(t, mark, "draining", pidIs(pid), 5*time.Second)
		if !alive(pid) {
			t.Fatalf("precondition: exited before the second SIGTERM despite a 60s drain timeout and a 30s request")
		}
		s.signal(pid, syscall.SIGTERM)
		if !waitChan(s.exited, 5*time.Second) {
			t.Fatalf("server still running 5s after a second SIGTERM")
		}
		if code := s.exitCode(); code != 0 {
			t.Errorf("exit status %d after a second SIGTERM, want 0 (%v)", code, s.cmd.ProcessState)
		}
	})
}

// g. 50 upgrades: descriptors and processes do not leak across generations.
func TestFiftyUpgradesNoLeak(t *testing.T) {
	s := startServer(t, serverOpts{})
	type sample struct {
		pid, fds int
		list     []string
	}
	var samples []sample
	for i := 1; i <= 50; i++ {
		_, newPID := s.upgrade(nextVersion(s.version), 15*time.Second)
		s.checkOneProcess(t, newPID)
		// Count when the new generation is idle: no connection of ours is
		// still open on its side (our /healthz requests use Connection: close).
		eventually(t, 10*time.Second, func() bool { return serverConns(s.port) == 0 }, "no open server-side connection")
		list, err := fdTargets(newPID)
		if err != nil {
			t.Fatalf("generation %d (pid %d): %v", i+1, newPID, err)
		}
		samples = append(samples, sample{newPID, len(list), list})
		if t.Failed() {
			break
		}
	}
	if t.Failed() {
		return
	}
	g2, g50, g51 := samples[0], samples[48], samples[49]
	counts := make([]int, len(samples))
	for i, x := range samples {
		counts[i] = x.fds
	}
	t.Logf("open descriptors of generations 2..51: %v", counts)
	// Generation 2 and later all start the same way (inherited listener and
	// hand-off pipes from a parent that has since exited), so their idle
	// descriptor sets must match exactly: no tolerance.
	for _, g := range []struct {
		n int
		sample
	}{{50, g50}, {51, g51}} {
		if g.fds != g2.fds {
			t.Errorf("generation %d (pid %d) has %d open descriptors, generation 2 (pid %d) had %d\ngen 2:\n%s\ngen %d:\n%s",
				g.n, g.pid, g.fds, g2.pid, g2.fds, strings.Join(g2.list, "\n"), g.n, strings.Join(g.list, "\n"))
		}
	}
	s.checkListener(t, g51.pid)
}

// CLI: exit codes and messages.
func TestCLI(t *testing.T) {
	b := bins(t)
	dir := t.TempDir()

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busyAddr := busy.Addr().String()

	// A directory where the PID file cannot be created. Root ignores mode
	// bits, so then use a directory of a pseudo file system that refuses
	// new files.
	roDir := filepath.Join(dir, "ro")
	if err := os.Mkdir(roDir, 0o555); err != nil {
		t.Fatal(err)
	}
	if f, err := os.Create(filepath.Join(roDir, "probe")); err == nil {
		f.Close()
		roDir = ""
		for _, cand := range []string{"/sys", "/proc"} {
			if f, err := os.Create(filepath.Join(cand, "handoff-probe.pid")); err != nil {
				roDir = cand
				break
			} else {
				f.Close()
				os.Remove(f.Name())
			}
		}
	}

	roSkip := ""
	if roDir == "" {
		roSkip = "no directory here refuses to create a file"
	}
	cases := []struct {
		name       string
		bin        string
		args       []string
		code       int
		stderrHas  string // case-insensitive
		stdoutHas  string
		skipReason string
	}{
		{name: "unknown serve flag", bin: "handoff-v1", args: []string{"serve", "--no-such-flag"}, code: 2, stderrHas: "no-such-flag"},
		{name: "bad duration", bin: "handoff-v1", args: []string{"serve", "--drain-timeout", "banana"}, code: 2, stderrHas: "banana"},
		{name: "unknown command", bin: "handoff-v1", args: []string{"frobnicate"}, code: 2, stderrHas: "frobnicate"},
		{name: "unknown load flag", bin: "handoff-v1", args: []string{"load", "--no-such-flag"}, code: 2, stderrHas: "no-such-flag"},
		{name: "listen address in use", bin: "handoff-v1", args: []string{"serve", "--listen", busyAddr, "--pidfile", filepath.Join(dir, "busy.pid")},
			code: 3, stderrHas: "address already in use"},
		{name: "pidfile dir missing", bin: "handoff-v1", args: []string{"serve", "--listen", "127.0.0.1:0", "--pidfile", filepath.Join(dir, "nope", "handoff.pid")},
			code: 4, stderrHas: "pid"},
		{name: "pidfile dir read-only", bin: "handoff-v1", args: []string{"serve", "--listen", "127.0.0.1:0", "--pidfile", filepath.Join(roDir, "handoff.pid")},
			code: 4, stderrHas: "pid", skipReason: roSkip},
		{name: "version", bin: "handoff-v3", args: []string{"version"}, code: 0, stdoutHas: "v3"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if c.skipReason != "" {
				t.Skip(c.skipReason)
			}
			code, stdout, stderr := runCLI(t, filepath.Join(b, c.bin), dir, c.args...)
			t.Logf("handoff %s: exit %d, stdout %q, stderr %q", strings.Join(c.args, " "), code, firstLine(stdout), firstLine(stderr))
			if code != c.code {
				t.Errorf("handoff %s: exit code %d, want %d\nstdout: %s\nstderr: %s", strings.Join(c.args, " "), code, c.code, stdout, stderr)
			}
			if c.stderrHas != "" && !strings.Contains(strings.ToLower(stderr), strings.ToLower(c.stderrHas)) {
				t.Errorf("handoff %s: stderr does not mention %q:\n%s", strings.Join(c.args, " "), c.stderrHas, stderr)
			}
			if c.stdoutHas != "" && !strings.Contains(stdout, c.stdoutHas) {
				t.Errorf("handoff %s: stdout %q does not contain %q", strings.Join(c.args, " "), stdout, c.stdoutHas)
			}
		})
	}
}

// runCLI runs bin with args in its own process group, for at most 15s.
func runCLI(t *testing.T, bin, dir string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb strings.Builder
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	cmd.Stdout = &out
	cmd.Stderr = &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
	})
	if !waitChan(done, 15*time.Second) {
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
		t.Fatalf("handoff %s still running after 15s\nstdout: %s\nstderr: %s", strings.Join(args, " "), out.String(), errb.String())
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}
