package main_test

// Integration tests of `handoff serve`: they check the zero-downtime upgrade
// contract from the outside (see helpers_test.go for the harness).

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
)

// a. At least 10 upgrades under load; nothing fails, the socket is the same.
func TestUpgradesUnderLoad(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	first := s.LivePID()
	load := itest.StartLoad(t, s.Addr, loadRate, loadArgs()...)

	type gen struct {
		pid        int
		version    string
		generation int64
	}
	gens := []gen{{pid: first, version: "v1"}}
	if l, _, ok := s.Logs.First(0, "ready", itest.PIDIs(first)); ok {
		gens[0].generation, _ = l.Num("generation")
	}
	const upgrades = 10
	for i := 1; i <= upgrades; i++ {
		mark := s.Logs.Mark()
		want := itest.NextVersion(s.Version)
		oldPID, newPID := s.Upgrade(want, 20*time.Second)
		if newPID == oldPID {
			t.Fatalf("upgrade %d: PID unchanged (%d)", i, newPID)
		}
		ready := s.Logs.Wait(t, mark, "ready", itest.PIDIs(newPID), 5*time.Second)
		if v := ready.Str("version"); v != want {
			t.Errorf("upgrade %d: ready log of pid %d has version %q, want %q", i, newPID, v, want)
		}
		g, ok := ready.Num("generation")
		if !ok {
			t.Errorf("upgrade %d: ready log has no numeric generation: %s", i, ready.Raw)
		} else if prev := gens[len(gens)-1].generation; g <= prev {
			t.Errorf("upgrade %d: generation %d does not increase (previous %d)", i, g, prev)
		}
		if l, _, ok := s.Logs.First(mark, "listening", itest.PIDIs(newPID)); ok && l.Str("addr") != s.Addr {
			t.Errorf("upgrade %d: pid %d logs listening on %q, want the same address %q", i, newPID, l.Str("addr"), s.Addr)
		}
		s.CheckListener(t, newPID)
		// It ignores none of them once it is ready (the handlers of a new
		// generation are set from package init, which a signal.Ignore in
		// main used to undo, leaving SIGHUP ignored); that it acts on them
		// the next SIGHUP shows, and the final SIGTERM.
		for _, sig := range []syscall.Signal{syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT} {
			if !itest.Catches(newPID, sig) {
				t.Errorf("upgrade %d: pid %d, ready, does not catch %v", i, newPID, sig)
			}
		}
		if prev := gens[len(gens)-1].version; prev == want {
			t.Errorf("upgrade %d: version did not change (%s)", i, want)
		}
		gens = append(gens, gen{pid: newPID, version: want, generation: g})
	}

	res, sent := load.Stop()
	load.Check(t, res, sent)
	seen := map[int]bool{}
	for i, g := range gens {
		if seen[g.pid] {
			t.Errorf("pid %d used by two generations", g.pid)
		}
		seen[g.pid] = true
		// Every generation served part of the load, with its own version.
		ps, ok := itest.PIDStat(res, g.pid)
		if !ok || ps.Count == 0 {
			t.Errorf("generation %d (pid %d, %s) answered no load-tool request", i, g.pid, g.version)
		} else if ps.Version != g.version {
			t.Errorf("generation %d (pid %d): load tool saw version %q, want %q", i, g.pid, ps.Version, g.version)
		}
	}
	last := gens[len(gens)-1].pid
	if p := s.LivePID(); p != last {
		t.Errorf("PID file names %d at the end, want %d", p, last)
	}
	s.CheckListener(t, last)
	s.CheckOneProcess(t, last)
	t.Logf("%d generations: %v", len(gens), gens)
}

// b. A slow request in flight at the upgrade is answered by the old
// generation; new requests go to the new one.
func TestSlowRequestSurvivesUpgrade(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	oldPID := s.LivePID()
	slow := itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=2000", 30*time.Second)

	mark := s.Logs.Mark()
	s.Deploy("v2")
	s.Signal(oldPID, syscall.SIGHUP)
	newPID := s.WaitNewPID(oldPID, 20*time.Second)
	s.WaitServing(newPID, "v2", 10*time.Second)
	select {
	case <-slow.Done:
		t.Fatalf("precondition: the 2s request finished before the upgrade completed: %v", slow)
	default:
	}
	if !itest.Alive(oldPID) {
		t.Errorf("old pid %d exited while its 2s request was still in flight", oldPID)
	}
	s.Logs.Wait(t, mark, "draining", func(l itest.Line) bool { return l.PID() == oldPID && l.Str("reason") == "upgrade" }, 10*time.Second)
	// Once the old generation drains, it no longer accepts: new requests
	// on new connections are all answered by the new one.
	streak := 0
	var last string
	if !itest.Poll(10*time.Second, func() bool {
		r, err := itest.Get(s.Addr, "/hello/handoff")
		switch {
		case err != nil:
			t.Errorf("GET /hello/handoff during the drain: %v", err)
			return true
		case r.Status != 200 || r.Body != "Hello handoff!!!":
			t.Errorf("GET /hello/handoff during the drain: status %d body %q", r.Status, r.Body)
			return true
		case r.PID == newPID && r.Version == "v2":
			streak++
		default:
			streak = 0
		}
		last = fmt.Sprintf("pid %d version %q", r.PID, r.Version)
		return streak >= 5
	}) {
		t.Errorf("new requests not all answered by the new pid %d while the old drains; last: %s", newPID, last)
	}

	if !itest.WaitChan(slow.Done, 15*time.Second) {
		t.Fatalf("slow request did not complete")
	}
	if slow.Err != nil || slow.Resp.Status != 200 {
		t.Fatalf("slow request in flight at the upgrade: %v, want 200", slow)
	}
	if slow.Resp.PID != oldPID || slow.Resp.Version != "v1" {
		t.Errorf("slow request answered by pid %d version %q, want the old pid %d version v1", slow.Resp.PID, slow.Resp.Version, oldPID)
	}
	s.WaitGone(oldPID, 15*time.Second)
	s.CheckOneProcess(t, newPID)
}

// c. Broken new binaries, one at a time, under load: each upgrade fails
// with the right kind, the old generation keeps serving, nothing is left
// behind; then a good binary upgrades fine.
func TestBrokenBinariesUnderLoad(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "2s"})
	pid := s.LivePID()
	load := itest.StartLoad(t, s.Addr, loadRate, loadArgs()...)

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
			if err := os.Remove(s.Live); err != nil {
				t.Fatal(err)
			}
		}, "binary-missing", "no such file", ""},
		{"not-executable", func() { s.DeployFile(itest.Binary(t, "handoff-v2"), 0o644) }, "binary-not-executable", "not executable", ""},
		{"exits-1", func() { s.DeployFile(itest.Binary(t, "exit1"), 0o755) }, "exited", "exit status 1", "testdata-exit1: pid"},
		{"hangs", func() { s.DeployFile(itest.Binary(t, "hang"), 0o755) }, "timeout", "timed out", "testdata-hang: pid"},
	}
	for _, c := range cases {
		mark := s.Logs.Mark()
		c.install()
		s.Signal(pid, syscall.SIGHUP)
		l := s.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(pid), 15*time.Second)
		t.Logf("%s: %s", c.name, l.Raw)
		if l.Str("level") != "ERROR" {
			t.Errorf("%s: upgrade failed logged at level %q, want ERROR: %s", c.name, l.Str("level"), l.Raw)
		}
		if k := l.Str("kind"); k != c.kind {
			t.Errorf("%s: upgrade failed kind %q, want %q: %s", c.name, k, c.kind, l.Raw)
		}
		if e := l.Str("error"); !strings.Contains(strings.ToLower(e), c.errText) {
			t.Errorf("%s: upgrade failed error %q does not contain %q", c.name, e, c.errText)
		}
		// The marker reaches the server's output through the server's copy of
		// the broken binary's stderr, which may lag its verdict: wait for it.
		if c.marker != "" && !s.Logs.WaitContains(mark, c.marker, 5*time.Second) {
			t.Errorf("%s: the broken binary never ran: no %q line in the server's output", c.name, c.marker)
		}
		if p, err := s.ReadPID(); err != nil || p != pid {
			t.Errorf("%s: PID file after a failed upgrade: pid %d err %v, want %d", c.name, p, err, pid)
		}
		s.WaitServing(pid, "v1", 5*time.Second)
		s.CheckOneProcess(t, pid)
		if _, _, ok := s.Logs.First(mark, "upgrade succeeded", nil); ok {
			t.Errorf("%s: upgrade succeeded logged for a broken binary", c.name)
		}
	}

	// Then a good binary upgrades fine.
	mark := s.Logs.Mark()
	oldPID, newPID := s.Upgrade("v2", 20*time.Second)
	if oldPID != pid || newPID == pid {
		t.Errorf("upgrade after failures: %d -> %d, want from %d to a new pid", oldPID, newPID, pid)
	}
	succ := s.Logs.Wait(t, mark, "upgrade succeeded", itest.PIDIs(pid), 5*time.Second)
	if n, _ := succ.Num("new_pid"); int(n) != newPID {
		t.Errorf("upgrade succeeded new_pid %d, want %d: %s", n, newPID, succ.Raw)
	}
	s.CheckListener(t, newPID)
	pid = newPID

	res, sent := load.Stop()
	load.Check(t, res, sent)
	s.CheckOneProcess(t, pid)
}

// d. A burst of 20 SIGHUPs: coalesced/queued, never more than two
// generations at once, one at the end, no failed request.
func TestHUPBurstUnderLoad(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	first := s.LivePID()
	load := itest.StartLoad(t, s.Addr, loadRate, loadArgs()...)
	sampler := itest.StartGroupSampler(s.Proc.PID, 3*time.Millisecond)
	defer sampler.Stop()

	mark := s.Logs.Mark()
	s.Deploy("v2")
	sent := 0
	for range 20 {
		p, err := s.ReadPID()
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
		ps := s.Procs()
		p, err := s.ReadPID()
		if err != nil || len(ps) != 1 || ps[0] != p || p == first {
			return false
		}
		queued, qidx := s.Logs.Find(mark, "upgrade queued", nil)
		for i, q := range queued {
			if _, _, ok := s.Logs.First(qidx[i]+1, "", func(l itest.Line) bool {
				return l.PID() == q.PID() && (l.Msg() == "upgrade succeeded" || l.Msg() == "upgrade failed")
			}); !ok {
				return false
			}
		}
		return true
	}
	itest.Eventually(t, 60*time.Second, settled, "the burst to settle to one new process")
	final := s.LivePID()
	s.WaitServing(final, "v2", 10*time.Second)

	res, dur := load.Stop()
	sampler.Stop()
	load.Check(t, res, dur)
	for _, p := range []int{first, final} {
		if ps, ok := itest.PIDStat(res, p); !ok || ps.Count == 0 {
			t.Errorf("pid %d answered no load-tool request: the load did not span the burst", p)
		}
	}
	if sampler.Max > 2 {
		t.Errorf("%d live handoff processes at once (%v), want at most 2", sampler.Max, sampler.MaxSeen)
	}
	if sampler.Max < 2 {
		t.Errorf("never saw the two generations of an upgrade in %d samples (max %d): the sampler is not working", sampler.Samples, sampler.Max)
	}
	if !settled() {
		t.Errorf("not settled at the end: processes %v", s.Procs())
	}
	if p := s.LivePID(); p != final {
		t.Errorf("PID file changed after settling: %d -> %d", final, p)
	}
	s.CheckOneProcess(t, final)
	s.CheckListener(t, final)
	count := func(msg string) int { ls, _ := s.Logs.Find(mark, msg, nil); return len(ls) }
	succeeded := count("upgrade succeeded")
	if succeeded < 1 || succeeded > 20 {
		t.Errorf("%d upgrades succeeded for 20 HUPs, want 1..20", succeeded)
	}
	if n := count("upgrade failed"); n != 0 {
		t.Errorf("%d upgrades failed during the burst, want 0", n)
	}
	t.Logf("%d HUPs delivered; logs: %d requested, %d ignored, %d queued, %d succeeded; %d process samples, max %d; final pid %d",
		sent, count("upgrade requested"), count("upgrade ignored"), count("upgrade queued"), succeeded, sampler.Samples, sampler.Max, final)
}

// e. A HUP while the previous generation still drains is queued, and runs
// only once that generation has exited.
func TestHUPQueuedWhileDraining(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	p1 := s.LivePID()
	slow := itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=3000", 30*time.Second)

	s.Deploy("v2")
	s.Signal(p1, syscall.SIGHUP)
	p2 := s.WaitNewPID(p1, 20*time.Second)
	s.WaitServing(p2, "v2", 10*time.Second)
	if !itest.Alive(p1) {
		t.Fatalf("precondition: pid %d finished draining its 3s request before the second HUP", p1)
	}

	mark := s.Logs.Mark()
	s.Deploy("v3")
	s.Signal(p2, syscall.SIGHUP)
	q := s.Logs.Wait(t, mark, "upgrade queued", itest.PIDIs(p2), 5*time.Second)
	if r := q.Str("reason"); r != "previous generation still draining" {
		t.Errorf("upgrade queued reason %q: %s", r, q.Raw)
	}
	if !itest.Alive(p1) {
		t.Errorf("precondition: pid %d exited before the queued upgrade was logged", p1)
	}

	// Wait for the third generation; it must never appear while p1 lives.
	var p3 int
	var prev map[int]bool
	itest.Eventually(t, 20*time.Second, func() bool {
		p1Alive := itest.Alive(p1)
		p, err := s.ReadPID()
		if err == nil && p != p2 && p != p1 {
			if p1Alive {
				t.Errorf("third generation %d in the PID file while the first %d is still alive", p, p1)
			}
			p3 = p
			return true
		}
		var ps []int
		ps, prev = itest.SteadyPIDs(prev, s.Procs())
		if len(ps) > 2 {
			var what []string
			for _, p := range ps {
				what = append(what, itest.Describe(p))
			}
			t.Errorf("%d live processes while an upgrade is queued:\n%s", len(ps), strings.Join(what, "\n"))
		}
		return false
	}, "the queued upgrade to produce a third generation")
	s.WaitServing(p3, "v3", 10*time.Second)
	// p3 serves, but the reader may not have got to its lines yet.
	s.Logs.Wait(t, 0, "ready", itest.PIDIs(p3), 10*time.Second)

	// The output is one pipe shared by all generations, so its order is the
	// order of the writes: p1's last line precedes every line of p3.
	_, p1Idx := s.Logs.Find(0, "", itest.PIDIs(p1))
	_, p3Idx := s.Logs.Find(0, "", itest.PIDIs(p3))
	if len(p1Idx) == 0 || len(p3Idx) == 0 {
		t.Errorf("no log lines from pid %d or pid %d", p1, p3)
	} else if last1, first3 := p1Idx[len(p1Idx)-1], p3Idx[0]; first3 < last1 {
		t.Errorf("pid %d logged (line %d) before pid %d's last line (line %d): the queued upgrade did not wait", p3, first3, p1, last1)
	}
	exiting := s.Logs.Wait(t, 0, "exiting", itest.PIDIs(p1), 10*time.Second)
	// What the generation cost, for the operator (and the benchmarks).
	if cpu, _ := exiting.Num("cpu"); cpu <= 0 {
		t.Errorf("pid %d's exiting line has no CPU time: %v", p1, exiting.Fields)
	}
	if rss, _ := exiting.Num("peak_rss_kib"); rss < 1024 {
		t.Errorf("pid %d's exiting line has no peak RSS: %v", p1, exiting.Fields)
	}
	s.Logs.Wait(t, mark, "upgrade succeeded", itest.PIDIs(p2), 10*time.Second)
	_, exitIdx := s.Logs.Find(0, "exiting", itest.PIDIs(p1))
	_, succIdx := s.Logs.Find(mark, "upgrade succeeded", itest.PIDIs(p2))
	switch {
	case len(exitIdx) == 0:
		t.Errorf("pid %d never logged exiting", p1)
	case len(succIdx) == 0:
		t.Errorf("pid %d never logged upgrade succeeded", p2)
	case succIdx[0] < exitIdx[0]:
		t.Errorf("pid %d logged upgrade succeeded (line %d) before pid %d logged exiting (line %d)", p2, succIdx[0], p1, exitIdx[0])
	}

	s.WaitSlowThenSettled(t, slow, p1, p2, p3)
}

// f. SIGTERM: graceful drain, exit 0, PID file removed; the drain timeout
// cuts long requests; a second SIGTERM cuts at once.
func TestSIGTERM(t *testing.T) {
	t.Run("drains-in-flight", func(t *testing.T) {
		s := itest.StartServer(t, itest.ServerOpts{})
		pid := s.LivePID()
		slow := itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=1500", 30*time.Second)
		mark := s.Logs.Mark()
		s.Signal(pid, syscall.SIGTERM)
		s.Logs.Wait(t, mark, "draining", func(l itest.Line) bool { return l.PID() == pid && l.Str("reason") == "stop" }, 5*time.Second)
		if !itest.WaitChan(slow.Done, 15*time.Second) {
			t.Fatalf("slow request did not complete")
		}
		if slow.Err != nil || slow.Resp.Status != 200 || slow.Resp.PID != pid {
			t.Errorf("slow request in flight at SIGTERM: %v, want 200 from pid %d", slow, pid)
		}
		// Wait returns once the server was reaped and its output read to
		// the end: the exiting line, written before the exit, is in Logs.
		if st := s.Proc.Wait(t, 15*time.Second); st.ExitCode() != 0 {
			t.Errorf("exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
		}
		if _, err := os.Stat(s.PIDFile); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("PID file after SIGTERM: stat error %v, want it removed", err)
		}
		if _, _, ok := s.Logs.First(mark, "exiting", itest.PIDIs(pid)); !ok {
			t.Errorf("no exiting log line")
		}
		if ps := s.Procs(); len(ps) != 0 {
			t.Errorf("processes left after SIGTERM: %v", ps)
		}
	})

	t.Run("drain-timeout-cuts", func(t *testing.T) {
		s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "1s"})
		pid := s.LivePID()
		slow := itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=30000", 40*time.Second)
		mark := s.Logs.Mark()
		s.Signal(pid, syscall.SIGTERM)
		// With a 30s request in flight, only the 1s drain timeout ends it.
		if st := s.Proc.Wait(t, 10*time.Second); st.ExitCode() != 0 {
			t.Errorf("exit status %d after a drain cut, want 0 (%v)", st.ExitCode(), st)
		}
		d := s.Logs.Wait(t, mark, "drained", itest.PIDIs(pid), 5*time.Second) // all output was read: at once
		if cut, ok := d.Num("cut"); !ok || cut < 1 {
			t.Errorf("drained log: cut=%d (present %v), want >= 1: %s", cut, ok, d.Raw)
		}
		if !itest.WaitChan(slow.Done, 5*time.Second) {
			t.Errorf("the cut request's connection is still open after the server exited")
		} else if slow.Err == nil && slow.Resp.Status == 200 {
			t.Errorf("a 30s request completed with 200 despite a 1s drain timeout: %v", slow)
		}
		if _, err := os.Stat(s.PIDFile); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("PID file after SIGTERM: stat error %v, want it removed", err)
		}
	})

	t.Run("second-signal-cuts", func(t *testing.T) {
		s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "60s"})
		pid := s.LivePID()
		itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=30000", 40*time.Second)
		mark := s.Logs.Mark()
		s.Signal(pid, syscall.SIGTERM)
		s.Logs.Wait(t, mark, "draining", itest.PIDIs(pid), 5*time.Second)
		if !itest.Alive(pid) {
			t.Fatalf("precondition: exited before the second SIGTERM despite a 60s drain timeout and a 30s request")
		}
		s.Signal(pid, syscall.SIGTERM)
		if st := s.Proc.Wait(t, 5*time.Second); st.ExitCode() != 0 {
			t.Errorf("exit status %d after a second SIGTERM, want 0 (%v)", st.ExitCode(), st)
		}
	})
}

// g. 50 upgrades: descriptors and processes do not leak across generations.
func TestFiftyUpgradesNoLeak(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	type sample struct {
		pid, fds int
		list     []string
	}
	var samples []sample
	for i := 1; i <= 50; i++ {
		_, newPID := s.Upgrade(itest.NextVersion(s.Version), 15*time.Second)
		s.CheckOneProcess(t, newPID)
		// Count when the new generation is idle: no connection of ours is
		// still open on its side (our /healthz requests use Connection: close).
		itest.Eventually(t, 10*time.Second, func() bool { return itest.ServerConns(s.Port) == 0 }, "no open server-side connection")
		// And once tableflip has closed the pipe that told it its parent
		// exited (it closes it just after saying so): poll, bounded.
		var list []string
		itest.Eventually(t, 10*time.Second, func() bool {
			l, err := itest.FDTargets(newPID)
			if err != nil {
				t.Fatalf("generation %d (pid %d): %v", i+1, newPID, err)
			}
			list = l
			return parentPipeClosed(l)
		}, "the hand-off pipes closed")
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
	s.CheckListener(t, g51.pid)
}

// parentPipeClosed reports whether the only pipes among a generation's
// descriptors ("N -> pipe:[I]") are its stdout and stderr (fds 1 and 2, and
// their copies) or inherited from the test runner (high numbers): tableflip's
// hand-off pipes are closed.
func parentPipeClosed(list []string) bool {
	std := map[string]bool{}
	for _, l := range list {
		if fd, target, ok := strings.Cut(l, " -> "); ok && (fd == "1" || fd == "2") {
			std[target] = true
		}
	}
	for _, l := range list {
		fd, target, ok := strings.Cut(l, " -> ")
		if !ok || !strings.HasPrefix(target, "pipe:") || std[target] {
			continue
		}
		if n, err := strconv.Atoi(fd); err == nil && n >= 100 {
			continue
		}
		return false
	}
	return true
}

// CLI: exit codes and messages.
func TestCLI(t *testing.T) {
	b := itest.Bins(t)
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
		{name: "negative move rate", bin: "handoff-v1", args: []string{"serve", "--move-rate", "-5"}, code: 2, stderrHas: "--move-rate"},
		{name: "negative move gc percent", bin: "handoff-v1", args: []string{"serve", "--move-gc-percent", "-1"}, code: 2, stderrHas: "--move-gc-percent"},
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
			cmd := exec.Command(filepath.Join(b, c.bin), c.args...)
			cmd.Dir = dir
			r := itest.RunCmd(t, 15*time.Second, cmd)
			code, stdout, stderr := r.Code, r.Stdout, r.Stderr
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
