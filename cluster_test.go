package main_test

// Integration tests of `handoff run --instances N [--max-surge K]`: N children
// of the Node.js example on the same listening socket, replaced as a set on an
// upgrade, restarted one by one when they crash.
//
// handoff run is started by startCluster (below: the harness's StartRunner
// knows one child only), in its own process group; each child leads a group of
// its own, and the test's cleanup kills them all. Nothing here sleeps to
// synchronise: every wait polls a condition (status, /proc, HTTP) with a
// deadline, and log lines are asserted on only once handoff has exited and its
// output reached EOF (cluster.stop).

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/itest"
	"github.com/handoff-dev/handoff/internal/loadgen"
)

// 1. Three instances answer: the load is served by three distinct children,
// each of them a child of handoff leading its own process group with its
// HANDOFF_INSTANCE, and status lists instances 0, 1 and 2 serving.
func TestClusterThreeInstancesAnswer(t *testing.T) {
	c := startCluster(t, clusterOpts{})
	pids, st := c.servingSet(3, 30*time.Second)
	if st.PID != c.PID || st.Phase != "serving" || st.Generation != 1 {
		t.Errorf("status: pid %d phase %q generation %d, want pid %d serving generation 1", st.PID, st.Phase, st.Generation, c.PID)
	}
	for i, pid := range pids {
		c.checkChild(t, pid, i)
	}
	load := itest.StartLoad(t, c.Addr, 500, "--conns", "16", "--new-conn-fraction", "0.3")
	// A child seen holding a connection of the load tool answers a request
	// on it (the load tool waits for the requests in flight when it stops):
	// once each child has held one, every child is in the load's result.
	c.waitLoadReached(t, pids, 40*time.Second)
	res, sent := load.Stop()
	load.Check(t, res, sent)
	for i, pid := range pids {
		if n := responses(res, pid); n == 0 {
			t.Errorf("instance %d (pid %d) answered no request of the load tool", i, pid)
		} else {
			t.Logf("instance %d (pid %d): %d responses", i, pid, n)
		}
	}
	for _, ps := range res.PIDs {
		if !slices.Contains(pids, ps.PID) {
			t.Errorf("a response came from pid %d, not one of the instances %v (Handoff-Pid header)", ps.PID, pids)
		}
	}
	if again, _ := c.servingSet(3, 10*time.Second); !slices.Equal(again, pids) {
		t.Errorf("children changed under load: %v, then %v", pids, again)
	}
	c.stop(t)
	c.checkLoggedStarts(t, 0, pids)
}

// 2. Five upgrades under load (500 req/s, 2% /slow?ms=800) replace the whole
// set each time with no failed request: after each, status lists three new
// children serving, instances 0..2, and the generation went up by one; every
// replaced child drained and exited 0.
func TestClusterUpgradesUnderLoad(t *testing.T) {
	c := startCluster(t, clusterOpts{})
	cur, st := c.servingSet(3, 30*time.Second)
	gen := st.Generation
	load := itest.StartLoad(t, c.Addr, 500,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", "800ms")
	sets := [][]int{cur}
	all := slices.Clone(cur)
	for i := 1; i <= 5; i++ {
		r := c.upgrade(t)
		if r.Code != 0 {
			t.Fatalf("upgrade %d: exit %d, want 0\n%v", i, r.Code, r)
		}
		hp, named, vgen := parseClusterUpgraded(t, r.Stdout)
		t.Logf("upgrade %d: %s", i, strings.TrimSpace(r.Stdout))
		if hp != c.PID {
			t.Errorf("upgrade %d: verdict from pid %d, want handoff's %d", i, hp, c.PID)
		}
		if vgen != gen+1 {
			t.Errorf("upgrade %d: verdict generation %d, want %d", i, vgen, gen+1)
		}
		// The replaced children drain (a /slow request takes 800 ms): wait
		// until status lists the new set only.
		next, st := c.servingSet(3, 30*time.Second)
		for inst, pid := range next {
			if slices.Contains(all, pid) {
				t.Fatalf("upgrade %d: instance %d has pid %d, not a new child (children so far %v)", i, inst, pid, all)
			}
			c.checkChild(t, pid, inst)
		}
		if !slices.Contains(next, named) {
			t.Errorf("upgrade %d: the verdict names child %d, not one of the new set %v", i, named, next)
		}
		if st.Generation != gen+1 {
			t.Errorf("upgrade %d: status generation %d, want %d", i, st.Generation, gen+1)
		}
		if st.LastUpgrade == nil || !st.LastUpgrade.OK || st.LastUpgrade.Generation != gen+1 {
			t.Errorf("upgrade %d: status last_upgrade %s, want a success at generation %d", i, itest.JSON(st.LastUpgrade), gen+1)
		}
		for _, old := range cur {
			if itest.Alive(old) {
				t.Errorf("upgrade %d: replaced child %d still alive though status no longer lists it", i, old)
			}
		}
		gen = st.Generation
		cur = next
		sets = append(sets, next)
		all = append(all, next...)
	}
	res, sent := load.Stop()
	load.Check(t, res, sent)
	for g, set := range sets {
		var n int64
		for _, pid := range set {
			n += responses(res, pid)
		}
		t.Logf("set %d %v: %d responses (%d, %d, %d)", g+1, set, n, responses(res, set[0]), responses(res, set[1]), responses(res, set[2]))
		if n == 0 {
			t.Errorf("set %d %v answered no request of the load tool", g+1, set)
		}
	}
	c.stop(t)
	c.checkLoggedStarts(t, 0, all)
	var replaced []int
	for _, set := range sets[:len(sets)-1] {
		replaced = append(replaced, set...)
	}
	c.checkDrainedExit0(t, replaced)
	if ls, _ := c.Logs.Find(0, "upgrade succeeded", itest.PIDIs(c.PID)); len(ls) != 5 {
		t.Errorf("%d upgrade succeeded log lines, want 5", len(ls))
	}
}

// 3. A new set that fails keeps the whole old set: with instance 1 of the new
// set exiting 1 at start (and then with every new child failing), handoff
// upgrade exits 1 and names the failed child (its PID, exit status and
// stderr line), the three old children serve on with no failed request, no
// new child is left running, and the generation stays. A good upgrade then
// goes through.
func TestClusterFailingNewChildKeepsOldSet(t *testing.T) {
	c := startCluster(t, clusterOpts{})
	old, st := c.servingSet(3, 30*time.Second)
	gen := st.Generation
	load := itest.StartLoad(t, c.Addr, 500,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", "800ms")

	type failure struct {
		name, marker string
		pid          int // the child the verdict names
		mark         int // log index before the upgrade
		stderr       string
	}
	cases := []*failure{{name: "instance 1 fails", marker: "fail-instance-1"}, {name: "every instance fails", marker: "fail-all"}}
	verdictRE := regexp.MustCompile(`(?m)^upgrade failed: instance (\d+): new process (\d+) exited before ready: exit status 1$`)
	for _, fc := range cases {
		marker := filepath.Join(c.Dir, fc.marker)
		if err := os.WriteFile(marker, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		fc.mark = c.Logs.Mark()
		r := c.upgrade(t)
		t.Logf("%s: handoff upgrade exit %d after %v:\n%s", fc.name, r.Code, r.Took.Round(time.Millisecond), r.Stderr)
		if r.Code != 1 {
			t.Fatalf("%s: handoff upgrade exit %d, want 1\n%v", fc.name, r.Code, r)
		}
		fc.stderr = r.Stderr
		m := verdictRE.FindStringSubmatch(r.Stderr)
		if m == nil {
			t.Fatalf("%s: handoff upgrade stderr does not match %v:\n%s", fc.name, verdictRE, r.Stderr)
		}
		inst, _ := strconv.Atoi(m[1])
		fc.pid, _ = strconv.Atoi(m[2])
		if fc.marker == "fail-instance-1" && inst != 1 {
			t.Errorf("%s: the verdict names instance %d, want 1", fc.name, inst)
		}
		for _, want := range []string{
			fmt.Sprintf("  new process %d: exit status 1\n", fc.pid),
			fmt.Sprintf("cluster-test: instance %d fails at start", inst),
			fmt.Sprintf("pid %d keeps serving\n", c.PID),
		} {
			if !strings.Contains(r.Stderr, want) {
				t.Errorf("%s: handoff upgrade stderr does not contain %q:\n%s", fc.name, want, r.Stderr)
			}
		}
		if fc.pid <= 1 || slices.Contains(old, fc.pid) {
			t.Errorf("%s: the verdict names pid %d (old set %v)", fc.name, fc.pid, old)
		}
		// Nothing of the new set is left: handoff's only children are the
		// old ones, serving, and status says so.
		var kids []itest.Stat
		if !c.poll(20*time.Second, func() bool {
			kids = itest.Children(c.PID)
			return slices.Equal(itest.PIDs(kids), sortedCopy(old))
		}) {
			t.Fatalf("%s: handoff's children %v, want only the old set %v", fc.name, kids, old)
		}
		now, st := c.servingSet(3, 10*time.Second)
		if !slices.Equal(now, old) {
			t.Errorf("%s: serving set %v after the failed upgrade, want the old one %v", fc.name, now, old)
		}
		if st.Generation != gen {
			t.Errorf("%s: generation %d after the failed upgrade, want %d", fc.name, st.Generation, gen)
		}
		if lu := st.LastUpgrade; lu == nil || lu.OK || lu.Kind != "exited" || lu.PID != fc.pid {
			t.Errorf("%s: status last_upgrade %s, want a failure of kind exited naming pid %d", fc.name, itest.JSON(lu), fc.pid)
		}
		c.waitAnswerFrom(t, old, 60*time.Second)
		if err := os.Remove(marker); err != nil {
			t.Fatal(err)
		}
	}

	// The old set took all the load; then a good upgrade goes through.
	r := c.upgrade(t)
	if r.Code != 0 {
		t.Fatalf("good upgrade after the failures: exit %d\n%v", r.Code, r)
	}
	_, _, vgen := parseClusterUpgraded(t, r.Stdout)
	if vgen != gen+1 {
		t.Errorf("good upgrade after the failures: generation %d, want %d", vgen, gen+1)
	}
	next, _ := c.servingSet(3, 30*time.Second)
	res, sent := load.Stop()
	load.Check(t, res, sent)
	for i, pid := range old {
		if responses(res, pid) == 0 {
			t.Errorf("old instance %d (pid %d) answered no request of the load tool", i, pid)
		}
	}
	var strays []int
	for _, ps := range res.PIDs {
		if !slices.Contains(old, ps.PID) && !slices.Contains(next, ps.PID) {
			strays = append(strays, ps.PID)
		}
	}
	t.Logf("responses from children of the failed upgrades (ready before the failure, then drained): %v", strays)

	c.stop(t)
	for _, fc := range cases {
		// The failed child was started by that upgrade, with its instance,
		// and its stderr line is in handoff's output, prefixed.
		if _, _, ok := c.Logs.First(fc.mark, "child started", itest.NumIs("child_pid", fc.pid)); !ok {
			t.Errorf("%s: no child started log line for the named child %d after the upgrade began", fc.name, fc.pid)
		}
		if !c.Logs.Contains(fc.mark, fmt.Sprintf("[pid %d] cluster-test: instance", fc.pid)) {
			t.Errorf("%s: no stderr line of child %d, prefixed, in handoff's output", fc.name, fc.pid)
		}
		fl, _, ok := c.Logs.First(fc.mark, "upgrade failed", itest.PIDIs(c.PID))
		if n, _ := fl.Num("child_pid"); !ok || int(n) != fc.pid || fl.Str("kind") != "exited" {
			t.Errorf("%s: upgrade failed log line %q, want kind exited naming child %d", fc.name, fl.Raw, fc.pid)
		}
		// Every new child of the failed upgrade is gone; the ones that
		// became ready were stopped gracefully.
		started, _ := c.Logs.Find(fc.mark, "child started", itest.PIDIs(c.PID))
		for _, l := range started {
			n, _ := l.Num("child_pid")
			if slices.Contains(next, int(n)) {
				continue
			}
			if c.ours(int(n)) {
				t.Errorf("%s: new child %d of the failed upgrade still alive", fc.name, n)
			}
		}
	}
	if ls, _ := c.Logs.Find(0, "child died while serving: restarting it", nil); len(ls) > 0 {
		t.Errorf("an old child died during the failed upgrades: %s", ls[0].Raw)
	}
}

// 4. With --max-surge 1, an upgrade of three instances replaces them one at
// a time: handoff never has more than N+1 = 4 live children (sampled every
// 3 ms, a process counting once seen in two samples in a row), and a batch
// starts only once the child the previous batch replaced has exited. Then an
// upgrade whose second batch fails leaves the first batch's child serving.
func TestClusterMaxSurgeOne(t *testing.T) {
	c := startCluster(t, clusterOpts{Args: []string{"--max-surge", "1"}})
	old, _ := c.servingSet(3, 30*time.Second)
	// Slow requests keep the replaced children draining for a while.
	load := itest.StartLoad(t, c.Addr, 300,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.05", "--slow", "800ms")
	sampler := itest.StartChildSampler(c.PID, 3*time.Millisecond)
	defer sampler.Stop()
	mark := c.Logs.Mark()
	r := c.upgrade(t)
	if r.Code != 0 {
		t.Fatalf("upgrade with --max-surge 1: exit %d\n%v", r.Code, r)
	}
	t.Logf("upgrade: %s (took %v)", strings.TrimSpace(r.Stdout), r.Took.Round(time.Millisecond))
	next, _ := c.servingSet(3, 30*time.Second)

	// A failure part way: instance 1's new child exits 1. Instance 0, replaced
	// by the first batch, stays on the new version (as the README says), 1 and
	// 2 keep their children, and nothing of the failed batch is left.
	if err := os.WriteFile(filepath.Join(c.Dir, "fail-instance-1"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r = c.upgrade(t)
	if r.Code != 1 || !strings.Contains(r.Stderr, "upgrade failed: instance 1: new process ") {
		t.Fatalf("upgrade with --max-surge 1 and instance 1 failing: exit %d, want 1 naming instance 1\n%v", r.Code, r)
	}
	var mixed []int
	var st control.Status
	if !c.poll(30*time.Second, func() bool {
		st = c.status()
		mixed = setOf(st, 3)
		return mixed != nil && mixed[0] != next[0] && len(itest.Children(c.PID)) == 3
	}) {
		t.Fatalf("after the failure part way: status children %s, /proc children %v; want 3, instance 0 replaced", itest.JSON(st.Children), itest.Children(c.PID))
	}
	if mixed[1] != next[1] || mixed[2] != next[2] {
		t.Errorf("after the failure part way: set %v, want instances 1 and 2 unchanged from %v", mixed, next)
	}
	t.Logf("after the failure part way: set %v (instance 0 replaced), status generation %d, verdict: %s", mixed, st.Generation, firstLine(r.Stderr))
	// Status tells the mixed set apart: each child's generation.
	for _, ch := range st.Children {
		want := st.Generation
		if ch.Instance == 0 {
			want = st.Generation + 1 // of the failed rollout's first batch
		}
		if ch.Generation != want {
			t.Errorf("after the failure part way: instance %d (pid %d) has generation %d in status, want %d (status generation %d)", ch.Instance, ch.PID, ch.Generation, want, st.Generation)
		}
	}
	// The failed child never listened: the shared socket must still be
	// non-blocking, or these children block in accept(2) with requests held.
	for _, pid := range mixed {
		if flags, ok := fdFlags(pid, 3); !ok || flags&syscall.O_NONBLOCK == 0 {
			t.Errorf("child %d: listening socket (fd 3) flags %#o (read %v), want O_NONBLOCK", pid, flags, ok)
		}
	}
	sampler.Stop()
	res, sent := load.Stop()
	load.Check(t, res, sent)
	t.Logf("at most %d live children of handoff at once in %d samples: %v", sampler.Max, sampler.Samples, sampler.MaxSeen)
	if sampler.Max > 4 {
		t.Errorf("%d live children of handoff at once (%v), want at most N+1 = 4 with --max-surge 1", sampler.Max, sampler.MaxSeen)
	}
	if sampler.Max < 4 {
		// A new child takes far longer than two samples to become ready, so
		// the surge itself must have been seen; if not, the sampler missed it.
		t.Errorf("at most %d live children seen in %d samples: the sampler never saw a surge of one new child beside the 3 old ones", sampler.Max, sampler.Samples)
	}
	for _, pid := range next {
		if slices.Contains(old, pid) {
			t.Errorf("set after the upgrade %v shares a child with the old set %v", next, old)
		}
	}

	c.stop(t)
	// Batch by batch: the child of instance i+1 is started only after the
	// old child of instance i has exited.
	type batch struct{ started, oldExited int }
	var bs []batch
	for inst := range 3 {
		_, si, ok := c.Logs.First(mark, "child started", func(l itest.Line) bool {
			n, _ := l.Num("child_pid")
			return l.PID() == c.PID && int(n) == next[inst]
		})
		_, ei, ok2 := c.Logs.First(mark, "old child exited", itest.NumIs("child_pid", old[inst]))
		if !ok || !ok2 {
			t.Fatalf("instance %d: child started for %d logged %v, old child exited for %d logged %v", inst, next[inst], ok, old[inst], ok2)
		}
		bs = append(bs, batch{si, ei})
	}
	order := slices.Clone(bs)
	slices.SortFunc(order, func(a, b batch) int { return a.started - b.started })
	for i := 1; i < len(order); i++ {
		if order[i].started < order[i-1].oldExited {
			t.Errorf("a batch started (log line %d) before the child the previous batch replaced exited (line %d)", order[i].started, order[i-1].oldExited)
		}
	}
	c.checkDrainedExit0(t, old)
}

// fdFlags reads the file status flags of pid's descriptor fd from /proc.
func fdFlags(pid, fd int) (int, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			return int(n), err == nil
		}
	}
	return 0, false
}

// 5. A crashed instance restarts alone: kill -9 of instance 1 leaves
// instances 0 and 2 with their PIDs; instance 1 gets a new child (restarts
// >= 1) that serves. The load runs throughout. A request in flight on the
// killed child fails with it, by design: it is stopped (SIGSTOP) first, the
// connections it holds counted, then killed. A connection carries one
// request at a time and new connections wait in the listening socket's queue,
// which the other children share, so the failures may not exceed that count,
// and must all be broken connections (read/write): more, or any other kind,
// would be a request lost by the other children.
func TestClusterCrashedInstanceRestartsAlone(t *testing.T) {
	c := startCluster(t, clusterOpts{})
	before, _ := c.servingSet(3, 30*time.Second)
	load := itest.StartLoad(t, c.Addr, 500, "--conns", "16", "--new-conn-fraction", "0.3")
	c.waitLoadReached(t, before, 40*time.Second)

	victim := before[1]
	if st, ok := itest.ReadStat(victim); !ok || st.PPID != c.PID || st.PGRP != victim {
		t.Fatalf("refusing to kill %d: not a child of handoff %d leading its own group (%+v)", victim, c.PID, st)
	}
	if err := syscall.Kill(victim, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	held := heldConns(c.Port, victim)[victim]
	if err := syscall.Kill(victim, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()

	var after []int
	var st control.Status
	if !c.poll(30*time.Second, func() bool {
		st = c.status()
		after = setOf(st, 3)
		return after != nil && after[1] != victim
	}) {
		t.Fatalf("instance 1 not serving again with a new child within 30s of the kill; status children: %s", itest.JSON(st.Children))
	}
	back := time.Since(killed)
	if after[0] != before[0] || after[2] != before[2] {
		t.Errorf("instances 0 and 2 changed: %v before the crash, %v after", before, after)
	}
	for _, ch := range st.Children {
		if ch.Instance == 1 && ch.Restarts < 1 {
			t.Errorf("instance 1's new child %d has restarts %d, want >= 1", ch.PID, ch.Restarts)
		}
		if ch.Instance != 1 && ch.Restarts != 0 {
			t.Errorf("instance %d (pid %d) has restarts %d, want 0", ch.Instance, ch.PID, ch.Restarts)
		}
	}
	if st.Generation != 1 {
		t.Errorf("generation %d after a restart, want 1 (a restart is not an upgrade)", st.Generation)
	}
	c.checkChild(t, after[1], 1)
	// The new child answers the load too.
	c.waitLoadReached(t, []int{after[1]}, 40*time.Second)
	res, sent := load.Stop()
	t.Logf("instance 1 serving again %v after the kill; killed child held %d connections; load: %d requests, %d failed %v",
		back.Round(time.Millisecond), held, res.Requests, res.Failed, res.Failures)
	if res.Failed > int64(held) {
		t.Errorf("%d requests failed, more than the %d connections the killed child held: the other children lost requests; first errors:\n%s",
			res.Failed, held, strings.Join(res.Errors, "\n"))
	}
	for kind, n := range res.Failures {
		if kind != "read" && kind != "write" {
			t.Errorf("%d failures of kind %s: only requests in flight on the killed child (read/write) may fail; first errors:\n%s", n, kind, strings.Join(res.Errors, "\n"))
		}
	}
	if floor := 0.8 * 500 * sent.Seconds(); float64(res.Requests) < floor {
		t.Errorf("load: only %d requests in %v, want at least %.0f", res.Requests, sent, floor)
	}
	for _, pid := range after {
		if responses(res, pid) == 0 {
			t.Errorf("child %d answered no request of the load tool", pid)
		}
	}

	c.stop(t)
	died, _, ok := c.Logs.First(0, "child died while serving: restarting it", itest.PIDIs(c.PID))
	if n, _ := died.Num("child_pid"); !ok || int(n) != victim || died.Str("status") != "signal: killed" {
		t.Errorf("child died log line %q, want child %d, signal: killed", died.Raw, victim)
	}
	if ls, _ := c.Logs.Find(0, "child died while serving: restarting it", nil); len(ls) != 1 {
		t.Errorf("%d child died log lines, want 1", len(ls))
	}
	if l, _, ok := c.Logs.First(0, "child started", itest.NumIs("child_pid", after[1])); !ok {
		t.Errorf("no child started log line for the restarted child %d", after[1])
	} else if n, _ := l.Num("instance"); n != 1 {
		t.Errorf("restarted child %d started as instance %d, want 1: %s", after[1], n, l.Raw)
	}
	if _, _, ok := c.Logs.First(0, "upgrade succeeded", nil); ok {
		t.Errorf("a restart was logged as an upgrade")
	}
	if starts := c.loggedChildren(); len(starts) != 4 {
		t.Errorf("%d children started, want 4 (3, then the restart of instance 1 alone): %v", len(starts), starts)
	}
}

// 6. SIGTERM stops every child gracefully: /slow requests in flight on each
// of the three children are answered, handoff exits 0, every child exited 0
// (drained) and none is left.
func TestClusterSIGTERM(t *testing.T) {
	c := startCluster(t, clusterOpts{})
	pids, _ := c.servingSet(3, 30*time.Second)
	const path, body = "/slow?ms=5000", "slept 5000 ms"
	// A keep-alive connection on each child: a GET /healthz on a new
	// connection tells which child accepted it; that child is then stopped
	// (SIGSTOP) so that the next connection goes to another one (an idle set
	// can hand every connection to the same child), and all are let go
	// (SIGCONT) before the slow requests are sent on the connections.
	var reqs []*slowReq
	stopped := map[int]bool{}
	cont := func() {
		for pid := range stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
		clear(stopped)
	}
	defer cont()
	for len(reqs) < 3 {
		r := dialHeld(t, c.Addr)
		if !slices.Contains(pids, r.holder) || stopped[r.holder] {
			t.Fatalf("GET /healthz answered by pid %d, want one of the children %v not stopped (%v)", r.holder, pids, stopped)
		}
		reqs = append(reqs, r)
		if len(reqs) < 3 {
			if st, ok := itest.ReadStat(r.holder); !ok || st.PPID != c.PID {
				t.Fatalf("refusing to stop %d: not a child of handoff %d", r.holder, c.PID)
			}
			if err := syscall.Kill(r.holder, syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			stopped[r.holder] = true
		}
	}
	cont()
	sendSlow(t, c.Port, reqs, path)
	mark := c.Logs.Mark()
	if err := syscall.Kill(c.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	c.Logs.Wait(t, mark, "stop requested", nil, 10*time.Second)
	for _, r := range reqs {
		if r.done() {
			t.Fatalf("precondition: a %s request was answered before handoff took the SIGTERM: %v", path, r)
		}
	}
	perChild := map[int]int{}
	for i, r := range reqs {
		if !itest.WaitChan(r.doneC, 30*time.Second) {
			t.Fatalf("slow request %d (on child %d) not answered within 30s of SIGTERM", i, r.holder)
		}
		if r.err != nil || r.resp.Status != 200 || r.resp.PID != r.holder || r.resp.Body != body {
			t.Errorf("slow request %d in flight at SIGTERM: %v, want 200 %q from child %d", i, r, body, r.holder)
		} else {
			perChild[r.holder]++
		}
	}
	t.Logf("%d %s requests in flight at SIGTERM, answered by child: %v", len(reqs), path, perChild)
	if st := c.Wait(t, 30*time.Second); st.ExitCode() != 0 {
		t.Errorf("handoff run exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	for _, pid := range pids {
		l, _, ok := c.Logs.First(mark, "child exited", itest.NumIs("child_pid", pid))
		if !ok {
			t.Errorf("no child exited log line for child %d", pid)
		} else if s := l.Str("status"); s != "exit status 0" {
			t.Errorf("child %d exited with %q, want exit status 0 (drained): %s", pid, s, l.Raw)
		}
	}
	if !itest.Poll(10*time.Second, func() bool {
		for _, pid := range c.loggedChildren() {
			if c.ours(pid) {
				return false
			}
		}
		return true
	}) {
		t.Errorf("children of handoff still alive after it exited: %v", c.loggedChildren())
	}
	if kids := c.loggedChildren(); len(kids) != 3 {
		t.Errorf("%d children started, want 3: %v", len(kids), kids)
	}
	if _, err := os.Stat(c.PIDFile); !os.IsNotExist(err) {
		t.Errorf("PID file after SIGTERM: stat error %v, want it removed", err)
	}
	if conn, err := net.DialTimeout("tcp", c.Addr, time.Second); err == nil {
		conn.Close()
		t.Errorf("%s still accepts connections after handoff exited", c.Addr)
	}
}

// 7. --instances max starts one child per CPU (runtime.NumCPU); --instances
// 0 and abc, and a negative --max-surge, are usage errors (exit 2) with a
// message.
func TestClusterInstancesFlag(t *testing.T) {
	for _, bad := range [][]string{{"--instances", "0"}, {"--instances", "abc"}, {"--instances", "-3"}, {"--max-surge", "-1"}} {
		args := append(append([]string{"run", "--listen", "127.0.0.1:0"}, bad...), "--", "node", "-e", "0")
		r := itest.CLI(t, args...)
		flag := strings.TrimPrefix(bad[0], "--")
		if r.Code != 2 || !strings.Contains(r.Stderr, "--"+flag) {
			t.Errorf("handoff run %s %s: exit %d stderr %q, want exit 2 and a message naming --%s", bad[0], bad[1], r.Code, r.Stderr, flag)
		}
		if bad[1] == "abc" && !strings.Contains(r.Stderr, `"abc"`) {
			t.Errorf("handoff run --instances abc: stderr %q does not quote the bad value", r.Stderr)
		}
	}

	n := runtime.NumCPU()
	c := startCluster(t, clusterOpts{Instances: "max"})
	pids, _ := c.servingSet(n, 60*time.Second)
	t.Logf("--instances max on %d CPUs: children %v", n, pids)
	if kids := itest.LiveChildren(c.PID); len(kids) != n {
		t.Errorf("handoff has %d live children %v, want runtime.NumCPU() = %d", len(kids), kids, n)
	}
	for i, pid := range pids {
		c.checkChild(t, pid, i)
	}
	c.stop(t)
}

// ---------------------------------------------------------------------------
// The harness of these tests: handoff run --instances N under test.

// clusterPrelude goes after the Node example's 'use strict': a child exits 1
// at start when DIR/fail-instance-I (its HANDOFF_INSTANCE) or DIR/fail-all
// exists, saying so on stderr.
const clusterPrelude = `{
  const fs = require('node:fs');
  const path = require('node:path');
  const inst = process.env.HANDOFF_INSTANCE;
  for (const m of ['fail-instance-' + inst, 'fail-all']) {
    if (fs.existsSync(path.join(__dirname, m))) {
      console.error('cluster-test: instance ' + inst + ' fails at start (' + m + ')');
      process.exit(1);
    }
  }
}
`

type clusterOpts struct {
	Instances string   // --instances; default 3
	Args      []string // more flags of handoff run
	App       string   // the script's source; default the Node example with clusterPrelude
	Env       []string // more environment for handoff and its children
}

// cluster is `handoff-v1 run --instances N ... -- node DIR/app.js`.
type cluster struct {
	*itest.Proc
	Dir, App, PIDFile, Addr string
	Port                    int
	tb                      testing.TB
}

// startCluster writes the app to a temp dir and starts
//
//	handoff-v1 run --listen 127.0.0.1:0 --pidfile DIR/run.pid --log-format json
//	    --instances N --ready-timeout 30s --drain-timeout 15s ARGS -- node DIR/app.js
//
// with the environment of itest.CleanEnv, in its own process group. It returns
// once handoff logged "ready" (every first child is ready), holds a LISTEN
// socket on 127.0.0.1 and the PID file names it. Skipped without node.
func startCluster(tb testing.TB, o clusterOpts) *cluster {
	tb.Helper()
	itest.SkipWithout(tb, "node")
	if o.Instances == "" {
		o.Instances = "3"
	}
	if o.App == "" {
		root, err := itest.ModuleRoot()
		if err != nil {
			tb.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join(root, "examples", "node", "server.js"))
		if err != nil {
			tb.Fatal(err)
		}
		src, found := strings.CutPrefix(string(b), "'use strict';\n")
		if !found {
			tb.Fatalf("examples/node/server.js does not start with 'use strict'")
		}
		o.App = "'use strict';\n" + clusterPrelude + src
	}
	dir := tb.TempDir()
	c := &cluster{tb: tb, Dir: dir, App: filepath.Join(dir, "app.js"), PIDFile: filepath.Join(dir, "run.pid")}
	if err := os.WriteFile(c.App, []byte(o.App), 0o644); err != nil {
		tb.Fatal(err)
	}
	args := []string{"run", "--listen", "127.0.0.1:0", "--pidfile", c.PIDFile, "--log-format", "json",
		"--instances", o.Instances, "--ready-timeout", "30s", "--drain-timeout", "15s"}
	args = append(append(args, o.Args...), "--", "node", c.App)
	cmd := exec.Command(itest.Binary(tb, "handoff-v1"), args...)
	cmd.Dir = dir
	cmd.Env = itest.CleanEnv(o.Env)
	c.Proc = itest.StartCmd(tb, cmd)
	tb.Cleanup(c.kill) // runs before the Proc's own kill

	c.waitFor(60*time.Second, func() bool { _, _, ok := c.Logs.First(0, "ready", itest.PIDIs(c.PID)); return ok },
		`handoff run %d to log "ready"`, c.PID)
	c.waitFor(10*time.Second, func() bool { c.Port = itest.ListenPort(c.PID); return c.Port != 0 },
		"a LISTEN socket on 127.0.0.1 held by handoff %d", c.PID)
	c.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(c.Port))
	c.waitFor(10*time.Second, func() bool { p, err := itest.ReadPIDFile(c.PIDFile); return err == nil && p == c.PID },
		"PID file %s to name handoff %d", c.PIDFile, c.PID)
	return c
}

// poll is itest.Poll, except that it gives up at once when handoff exited.
func (c *cluster) poll(timeout time.Duration, cond func() bool) bool {
	exited := false
	ok := itest.Poll(timeout, func() bool {
		if !c.Running() {
			exited = true
			return true
		}
		return cond()
	})
	return ok && !exited
}

// waitFor fails the test when cond does not become true within timeout, or
// handoff exits meanwhile.
func (c *cluster) waitFor(timeout time.Duration, cond func() bool, format string, args ...any) {
	c.tb.Helper()
	if !c.poll(timeout, cond) {
		if !c.Running() {
			c.tb.Fatalf("handoff run exited (%v) while waiting for: %s", c.Cmd.ProcessState, fmt.Sprintf(format, args...))
		}
		c.tb.Fatalf("timed out after %v waiting for: %s", timeout, fmt.Sprintf(format, args...))
	}
}

func (c *cluster) status() control.Status { return itest.Status(c.tb, c.PIDFile) }

// setOf returns the PIDs of st's children by instance when st lists exactly n
// children, all serving, one per instance 0..n-1; nil otherwise.
func setOf(st control.Status, n int) []int {
	if len(st.Children) != n {
		return nil
	}
	pids := make([]int, n)
	for _, ch := range st.Children {
		if ch.Phase != control.ChildServing || ch.Instance < 0 || ch.Instance >= n || pids[ch.Instance] != 0 || ch.PID <= 1 {
			return nil
		}
		pids[ch.Instance] = ch.PID
	}
	return pids
}

// servingSet waits until status lists exactly n children, serving, instances
// 0..n-1 (the replaced ones gone), and returns their PIDs by instance.
func (c *cluster) servingSet(n int, timeout time.Duration) ([]int, control.Status) {
	c.tb.Helper()
	var st control.Status
	var pids []int
	if !c.poll(timeout, func() bool { st = c.status(); pids = setOf(st, n); return pids != nil }) {
		c.tb.Fatalf("status did not list exactly %d serving children, instances 0..%d, within %v (handoff running: %v); children: %s",
			n, n-1, timeout, c.Running(), itest.JSON(st.Children))
	}
	return pids, st
}

// checkChild asserts that pid is a live child of handoff that leads its own
// process group, runs node and has HANDOFF_INSTANCE=instance.
func (c *cluster) checkChild(t testing.TB, pid, instance int) {
	t.Helper()
	st, ok := itest.ReadStat(pid)
	if !ok || st.PPID != c.PID || st.PGRP != pid || !strings.HasPrefix(st.Comm, "node") || st.State == 'Z' {
		t.Errorf("instance %d: pid %d is %+v (found %v), want a live node child of handoff %d leading its own group", instance, pid, st, ok, c.PID)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Errorf("instance %d: %v", instance, err)
		return
	}
	want := fmt.Sprintf("HANDOFF_INSTANCE=%d", instance)
	if !slices.Contains(strings.Split(string(env), "\x00"), want) {
		t.Errorf("child %d has no %s in its environment", pid, want)
	}
}

// upgrade runs handoff upgrade --pidfile F --wait (90s at most).
func (c *cluster) upgrade(tb testing.TB) itest.Result {
	tb.Helper()
	cmd := exec.Command(itest.Binary(tb, "handoff-v1"), "upgrade", "--pidfile", c.PIDFile, "--wait")
	cmd.Env = itest.CleanEnv(nil)
	return itest.RunCmd(tb, 90*time.Second, cmd)
}

var clusterUpgradedRE = regexp.MustCompile(`^upgraded: pid (\d+) -> (\d+), version \S+, generation (\d+), ready in [0-9.]+ ms\n$`)

// parseClusterUpgraded parses handoff upgrade's success line: handoff's PID,
// the new child it names, the new generation.
func parseClusterUpgraded(tb testing.TB, stdout string) (handoffPID, child, generation int) {
	tb.Helper()
	m := clusterUpgradedRE.FindStringSubmatch(stdout)
	if m == nil {
		tb.Fatalf("handoff upgrade stdout %q does not match %v", stdout, clusterUpgradedRE)
	}
	handoffPID, _ = strconv.Atoi(m[1])
	child, _ = strconv.Atoi(m[2])
	generation, _ = strconv.Atoi(m[3])
	return
}

// stop sends SIGTERM to handoff and waits until it exited 0 and its output
// reached EOF: the logs are then complete.
func (c *cluster) stop(t testing.TB) {
	t.Helper()
	if err := syscall.Kill(c.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if st := c.Wait(t, 30*time.Second); st.ExitCode() != 0 {
		t.Errorf("handoff run exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
}

// loggedChildren returns every child PID handoff logged as started.
func (c *cluster) loggedChildren() []int { return itest.LoggedChildren(c.Proc) }

// checkLoggedStarts asserts, once the output reached EOF, that handoff logged
// each of pids as started, with its instance (pids[i] is instance i % 3).
func (c *cluster) checkLoggedStarts(t testing.TB, from int, pids []int) {
	t.Helper()
	for i, pid := range pids {
		l, _, ok := c.Logs.First(from, "child started", itest.NumIs("child_pid", pid))
		if !ok {
			t.Errorf("no child started log line for child %d", pid)
			continue
		}
		if n, _ := l.Num("instance"); int(n) != i%3 {
			t.Errorf("child %d started as instance %d, want %d: %s", pid, n, i%3, l.Raw)
		}
	}
}

// checkDrainedExit0 asserts, once the output reached EOF, that every replaced
// child exited 0 by itself and that none was killed at the drain deadline.
func (c *cluster) checkDrainedExit0(t testing.TB, replaced []int) {
	t.Helper()
	for _, pid := range replaced {
		l, _, ok := c.Logs.First(0, "old child exited", itest.NumIs("child_pid", pid))
		switch {
		case !ok:
			t.Errorf("no old child exited log line for replaced child %d", pid)
		case l.Str("status") != "exit status 0":
			t.Errorf("replaced child %d exited with %q, want exit status 0 (drained): %s", pid, l.Str("status"), l.Raw)
		}
	}
	if ls, _ := c.Logs.Find(0, "child still running at the drain deadline: killing its process group", nil); len(ls) > 0 {
		t.Errorf("handoff killed %d children at the drain deadline: %s", len(ls), ls[0].Raw)
	}
}

// ours reports whether pid is alive and runs our script (its command line
// names the temp dir), so that a recycled PID is never killed.
func (c *cluster) ours(pid int) bool { return itest.RunsIn(pid, c.Dir) }

// kill is the cleanup: the harness's, as for its Runner.
func (c *cluster) kill() { itest.KillRun(c.tb, c.Proc, c.Dir) }

// heldConns counts the connections to 127.0.0.1:port (established or half
// closed) whose server side each of pids holds a descriptor for, with one
// scan of /proc/net/tcp (slow on a busy host).
func heldConns(port int, pids ...int) map[int]int {
	held := map[uint64]int{}
	for _, pid := range pids {
		for ino := range socketInodes(pid) {
			held[ino] = pid
		}
	}
	out := map[int]int{}
	for _, e := range itest.ReadTCP() {
		if e.LocalPort == port && (e.State == itest.TCPEstablished || e.State == itest.TCPCloseWait) && held[e.Inode] != 0 {
			out[held[e.Inode]]++
		}
	}
	return out
}

// socketInodes returns the inodes of the sockets pid holds descriptors for.
func socketInodes(pid int) map[uint64]bool {
	ts, _ := itest.FDTargets(pid)
	out := map[uint64]bool{}
	for _, t := range ts {
		_, target, _ := strings.Cut(t, " -> ")
		if s, ok := strings.CutPrefix(target, "socket:["); ok {
			if n, err := strconv.ParseUint(strings.TrimSuffix(s, "]"), 10, 64); err == nil {
				out[n] = true
			}
		}
	}
	return out
}

// waitLoadReached waits until each of pids has been seen holding a
// connection to the port, which only the load tool makes meanwhile.
func (c *cluster) waitLoadReached(t testing.TB, pids []int, timeout time.Duration) {
	t.Helper()
	seen := map[int]bool{}
	start := time.Now()
	// The kernel does not spread connections evenly across idle processes
	// that accept on one socket: a child seen with a connection is paused
	// (SIGSTOP) while others are still unseen, so that the next connections
	// go to them. Its requests wait, they do not fail; all resume at the end.
	var paused []int
	if len(pids) > 0 {
		// Children not waited for step aside too.
		want := map[int]bool{}
		for _, pid := range pids {
			want[pid] = true
		}
		for _, ch := range c.status().Children {
			if !want[ch.PID] && ch.Phase == "serving" && syscall.Kill(ch.PID, syscall.SIGSTOP) == nil {
				paused = append(paused, ch.PID)
			}
		}
	}
	defer func() {
		for _, pid := range paused {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
		t.Logf("the load reached children %v in %v", pids, time.Since(start).Round(time.Millisecond))
	}()
	if !c.poll(timeout, func() bool {
		for pid, n := range heldConns(c.Port, pids...) {
			if n > 0 && !seen[pid] {
				seen[pid] = true
				if len(seen) < len(pids) && syscall.Kill(pid, syscall.SIGSTOP) == nil {
					paused = append(paused, pid)
				}
			}
		}
		return len(seen) == len(pids)
	}) {
		t.Fatalf("within %v, only children %v of %v were seen holding a connection of the load tool", timeout, seen, pids)
	}
}

// waitAnswerFrom checks that each of pids answers GET /healthz on a new
// connection, and no other process: a child that answered is stopped
// (SIGSTOP) until the others have, so that the next connection goes to
// another one (an idle set can hand every connection to the same child),
// then all are let go (SIGCONT). Requests sent meanwhile on a stopped
// child's connections wait, they do not fail.
func (c *cluster) waitAnswerFrom(t testing.TB, pids []int, timeout time.Duration) {
	t.Helper()
	var stopped []int
	defer func() {
		for _, pid := range stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}()
	deadline := time.Now().Add(timeout)
	for len(stopped) < len(pids) {
		if time.Now().After(deadline) {
			t.Fatalf("within %v, GET /healthz answered from %v only, want each of %v", timeout, stopped, pids)
		}
		r, err := itest.Get(c.Addr, "/healthz")
		if err != nil {
			t.Fatalf("GET /healthz: %v", err)
		}
		if r.Status != 200 || !slices.Contains(pids, r.PID) || slices.Contains(stopped, r.PID) {
			t.Fatalf("GET /healthz: status %d from pid %d, want 200 from one of %v not stopped (%v)", r.Status, r.PID, pids, stopped)
		}
		if len(stopped) == len(pids)-1 {
			break
		}
		if st, ok := itest.ReadStat(r.PID); !ok || st.PPID != c.PID {
			t.Fatalf("refusing to stop %d: not a child of handoff %d", r.PID, c.PID)
		}
		if err := syscall.Kill(r.PID, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		stopped = append(stopped, r.PID)
	}
}

// slowReq is a request of startSlowBatch; resp and err are set once doneC
// is closed.
type slowReq struct {
	conn       net.Conn
	br         *bufio.Reader
	clientPort int
	holder     int // the child holding the server side of its connection
	doneC      chan struct{}
	resp       itest.Response
	err        error
}

func (r *slowReq) done() bool {
	select {
	case <-r.doneC:
		return true
	default:
		return false
	}
}

func (r *slowReq) String() string {
	if r.err != nil {
		return fmt.Sprintf("client port %d: error %v", r.clientPort, r.err)
	}
	return fmt.Sprintf("client port %d: status %d pid %d body %q", r.clientPort, r.resp.Status, r.resp.PID, r.resp.Body)
}

// dialHeld opens a keep-alive connection to addr and sends GET /healthz on
// it: the Handoff-Pid of the answer is the child that holds the connection.
func dialHeld(t testing.TB, addr string) *slowReq {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.SetDeadline(time.Now().Add(60 * time.Second)); err != nil {
		t.Fatal(err)
	}
	r := &slowReq{conn: conn, br: bufio.NewReader(conn), clientPort: conn.LocalAddr().(*net.TCPAddr).Port, doneC: make(chan struct{})}
	if _, err := io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: "+addr+"\r\n\r\n"); err != nil {
		t.Fatalf("write GET /healthz: %v", err)
	}
	resp, err := readResponse(r.br)
	if err != nil || resp.Status != 200 || resp.Body != "ok" {
		t.Fatalf("GET /healthz on a keep-alive connection: %+v, %v", resp, err)
	}
	r.holder = resp.PID
	return r
}

func readResponse(br *bufio.Reader) (itest.Response, error) {
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return itest.Response{}, err
	}
	return itest.ReadResponse(resp)
}

// sendSlow sends GET path (Connection: close) on each of reqs' connections,
// reads the responses in the background, and returns once the server side
// of every connection has read its request (one scan of /proc/net/tcp per
// poll for all of them, which stays quick enough on a busy host).
func sendSlow(t testing.TB, port int, reqs []*slowReq, path string) {
	t.Helper()
	for _, r := range reqs {
		if _, err := io.WriteString(r.conn, "GET "+path+" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatalf("write %s: %v", path, err)
		}
		go func() {
			defer close(r.doneC)
			r.resp, r.err = readResponse(r.br)
		}()
	}
	itest.Eventually(t, 20*time.Second, func() bool {
		read := map[int]bool{}
		for _, e := range itest.ReadTCP() {
			if e.LocalPort == port && e.State == itest.TCPEstablished && e.RxQueue == 0 {
				read[e.RemPort] = true
			}
		}
		for _, r := range reqs {
			if !read[r.clientPort] {
				return false
			}
		}
		return true
	}, "the server to read %d requests %s", len(reqs), path)
}

func sortedCopy(xs []int) []int {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s
}

// responses returns how many responses the load tool got from pid.
func responses(res *loadgen.Result, pid int) int64 {
	ps, _ := itest.PIDStat(res, pid)
	return ps.Count
}
