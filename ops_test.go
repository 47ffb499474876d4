package main_test

// Integration tests of the operator's tools around an upgrade: handoff verify
// (the proof on a running server), handoff stop (a graceful stop through the
// control socket), the --metrics endpoint of serve and run, and the Ansible
// rollout of scripts/ansible. Like the other integration tests, they run the
// real binary through internal/itest, each process in its own process group
// that the test's cleanup kills, and wait for conditions with deadlines
// (nothing sleeps to synchronise); logs are read for addresses while the
// process runs, and asserted on only after its output reached EOF.

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/itest"
)

// ---------------------------------------------------------------------------
// handoff verify

var (
	opsVerifyOKRE     = regexp.MustCompile(`^ok: (\d+) requests, 0 failed, 3 of 3 upgrades, handoff median ([0-9]+(?:\.[0-9]+)?) ms$`)
	opsVerifyUpRE     = regexp.MustCompile(`(?m)^upgrade (\d+) at \S+: pid (\d+) -> (\d+), version (\S+), generation (\d+), ready in [0-9.]+ ms$`)
	opsVerifyFailedRE = regexp.MustCompile(`^failed: (\d+) requests, 0 failed, 0 of 3 upgrades; upgrade 1 failed: new process (\d+) exited before ready: exit status 1$`)
)

// TestVerify: handoff verify on a running server upgrades it three times under
// its own load and says so (exit 0); on a server whose binary was replaced by
// a broken one, every upgrade fails, it exits 1 and says why, and the server
// serves on.
func TestVerify(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	p1 := s.LivePID()
	s.Deploy("v2")

	const rate, seconds = 300, 4
	r := itest.CLI(t, "verify", "--pidfile", s.PIDFile, "--target", s.Addr,
		"--upgrades", "3", "--rate", strconv.Itoa(rate), "--duration", fmt.Sprintf("%ds", seconds))
	t.Logf("%s", r)
	if r.Code != 0 {
		t.Fatalf("handoff verify: exit %d, want 0\n%v", r.Code, r)
	}
	m := opsVerifyOKRE.FindStringSubmatch(opsLastLine(r.Stdout))
	if m == nil {
		t.Fatalf("handoff verify: last line %q does not match %s", opsLastLine(r.Stdout), opsVerifyOKRE)
	}
	if n, _ := strconv.Atoi(m[1]); float64(n) < 0.8*rate*seconds {
		t.Errorf("handoff verify sent %d requests, want at least %.0f (80%% of %d/s for %ds)", n, 0.8*rate*seconds, rate, seconds)
	}
	if ms, _ := strconv.ParseFloat(m[2], 64); ms <= 0 || ms > 10000 {
		t.Errorf("handoff verify: handoff median %v ms, want within (0, 10000]", ms)
	}
	ups := opsVerifyUpRE.FindAllStringSubmatch(r.Stdout, -1)
	if len(ups) != 3 {
		t.Fatalf("handoff verify printed %d upgrade lines, want 3 matching %s", len(ups), opsVerifyUpRE)
	}
	prev := p1
	for i, u := range ups {
		old, _ := strconv.Atoi(u[2])
		pid, _ := strconv.Atoi(u[3])
		gen, _ := strconv.Atoi(u[5])
		if u[1] != strconv.Itoa(i+1) || old != prev || pid == old || pid <= 1 || u[4] != "v2" || gen != i+2 {
			t.Errorf("upgrade line %q: want upgrade %d, pid %d -> a new pid, version v2, generation %d", u[0], i+1, prev, i+2)
		}
		prev = pid
	}
	if !strings.Contains(r.Stdout, "p99 during upgrades") {
		t.Errorf("handoff verify does not report the p99 during upgrades:\n%s", r.Stdout)
	}
	last := prev
	if p := s.LivePID(); p != last {
		t.Errorf("the PID file names %d after verify, want the last new pid %d", p, last)
	}
	s.WaitServing(last, "v2", 10*time.Second)
	s.CheckOneProcess(t, last)

	// A broken build: the old process keeps serving through every attempt.
	s.DeployFile(itest.Binary(t, "exit1"), 0o755)
	r = itest.CLI(t, "verify", "--pidfile", s.PIDFile, "--target", s.Addr,
		"--upgrades", "3", "--rate", strconv.Itoa(rate), "--duration", "3s")
	t.Logf("%s", r)
	if r.Code != 1 {
		t.Errorf("handoff verify on a broken build: exit %d, want 1\n%v", r.Code, r)
	}
	if l := opsLastLine(r.Stdout); !opsVerifyFailedRE.MatchString(l) {
		t.Errorf("handoff verify on a broken build: last line %q does not match %s", l, opsVerifyFailedRE)
	}
	for _, want := range []string{"upgrade 1 at ", "upgrade 3 at ", "exited before ready: exit status 1",
		"testdata-exit1: pid", fmt.Sprintf("pid %d keeps serving", last)} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("handoff verify on a broken build does not say %q:\n%s", want, r.Stdout)
		}
	}
	s.WaitServing(last, "v2", 10*time.Second)
	s.CheckOneProcess(t, last)

	// Nothing answers: exit 5, before any load. Not a loopback target: exit 2.
	r = itest.CLI(t, "verify", "--pidfile", filepath.Join(t.TempDir(), "none.pid"), "--target", s.Addr, "--duration", "1s")
	if r.Code != 5 || !strings.Contains(r.Stderr, "no answer on control socket") {
		t.Errorf("handoff verify with nothing on the control socket: exit %d, want 5 with \"no answer on control socket\"\n%v", r.Code, r)
	}
	r = itest.CLI(t, "verify", "--pidfile", s.PIDFile, "--target", "192.0.2.1:80")
	if r.Code != 2 || !strings.Contains(r.Stderr, "not a loopback address") {
		t.Errorf("handoff verify --target 192.0.2.1:80: exit %d, want 2 with \"not a loopback address\"\n%v", r.Code, r)
	}
}

// ---------------------------------------------------------------------------
// handoff stop

var opsStoppedRE = regexp.MustCompile(`^stopped: pid (\d+), drained in [0-9.]+ ms: (\d+) requests answered, (\d+) connections closed(, (\d+) children stopped)?, (\d+) cut\n$`)

// TestStop: handoff stop drains and says what it did.
func TestStop(t *testing.T) {
	// A request in flight is answered, the server exits 0 and removes its PID
	// file and control socket.
	t.Run("serve", func(t *testing.T) {
		s := itest.StartServer(t, itest.ServerOpts{})
		pid := s.LivePID()
		slow := opsStartSlow(t, s, "/slow?ms=500")
		r := itest.CLI(t, "stop", "--pidfile", s.PIDFile)
		t.Logf("%s", r)
		m := opsStoppedRE.FindStringSubmatch(r.Stdout)
		if r.Code != 0 || m == nil || m[1] != strconv.Itoa(pid) || m[2] != "1" || m[6] != "0" || r.Stderr != "" {
			t.Errorf("handoff stop: exit %d, stdout %q, stderr %q; want 0 and \"stopped: pid %d, ...: 1 requests answered, ..., 0 cut\"",
				r.Code, r.Stdout, r.Stderr, pid)
		}
		if !itest.WaitChan(slow.Done, 10*time.Second) {
			t.Fatalf("the slow request was not answered within 10s of the stop")
		}
		if slow.Err != nil || slow.Resp.Status != 200 || slow.Resp.PID != pid {
			t.Errorf("slow request in flight at the stop: %v, want 200 from pid %d", slow, pid)
		}
		if code := s.Proc.ExitCode(t, 15*time.Second); code != 0 {
			t.Errorf("handoff serve exited %d after handoff stop, want 0", code)
		}
		opsCheckGone(t, s.PIDFile, s.PIDFile+".sock")
	})

	// The drain cut at its deadline: handoff stop exits 1 and says so.
	t.Run("cut", func(t *testing.T) {
		s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "100ms"})
		pid := s.LivePID()
		slow := opsStartSlow(t, s, "/slow?ms=5000")
		r := itest.CLI(t, "stop", "--pidfile", s.PIDFile)
		t.Logf("%s", r)
		m := opsStoppedRE.FindStringSubmatch(r.Stdout)
		if r.Code != 1 || m == nil || m[1] != strconv.Itoa(pid) || m[6] == "0" || !strings.Contains(r.Stderr, "the drain was cut short") {
			t.Errorf("handoff stop with --drain-timeout 100ms and a 5s request: exit %d, stdout %q, stderr %q; "+
				"want 1, \"stopped: pid %d, ... N cut\" with N > 0, and \"the drain was cut short\"", r.Code, r.Stdout, r.Stderr, pid)
		}
		if !itest.WaitChan(slow.Done, 10*time.Second) {
			t.Fatalf("the cut request did not end within 10s of the stop")
		}
		if slow.Err == nil && slow.Resp.Status == 200 {
			t.Errorf("the 5s request was answered 200 (%v), want it cut at the 100ms deadline", slow)
		}
		if code := s.Proc.ExitCode(t, 15*time.Second); code != 0 {
			t.Errorf("handoff serve exited %d after a stop whose drain was cut, want 0 (README: exit codes)", code)
		}
		opsCheckGone(t, s.PIDFile, s.PIDFile+".sock")
	})

	// handoff run: every child stops, handoff exits 0.
	t.Run("run", func(t *testing.T) {
		h := opsStartRunner(t, 2)
		kids := h.children(t, 2)
		r := itest.CLI(t, "stop", "--pidfile", h.PIDFile)
		t.Logf("%s", r)
		m := opsStoppedRE.FindStringSubmatch(r.Stdout)
		if r.Code != 0 || m == nil || m[1] != strconv.Itoa(h.PID) || m[5] != "2" || m[6] != "0" {
			t.Errorf("handoff stop on handoff run --instances 2: exit %d, stdout %q, stderr %q; want 0 and \"stopped: pid %d, ..., 2 children stopped, 0 cut\"",
				r.Code, r.Stdout, r.Stderr, h.PID)
		}
		if code := h.ExitCode(t, 30*time.Second); code != 0 {
			t.Errorf("handoff run exited %d after handoff stop, want 0", code)
		}
		for _, k := range kids {
			if h.ours(k) {
				t.Errorf("child %d still runs after handoff run exited", k)
			}
		}
		opsCheckGone(t, h.PIDFile, h.PIDFile+".sock")
	})
}

// opsStartSlow sends GET path on a new connection to s and returns once the
// server runs its handler (its control socket reports a request in flight);
// the response is read in the background (30s at most). Unlike
// itest.StartRequest, it does not parse /proc/net/tcp, which takes long on a
// machine with many sockets: a short request would be over before it returns.
func opsStartSlow(t *testing.T, s *itest.Server, path string) *itest.Inflight {
	t.Helper()
	conn, err := net.DialTimeout("tcp", s.Addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", s.Addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.SetDeadline(time.Now().Add(30 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.WriteString(conn, "GET "+path+" HTTP/1.1\r\nHost: "+s.Addr+"\r\nConnection: close\r\n\r\n"); err != nil {
		t.Fatalf("write request: %v", err)
	}
	r := itest.ReadInflight(conn)
	var last string
	if !itest.Poll(10*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		ans, err := control.Ask(ctx, s.PIDFile+".sock", control.Request{Cmd: control.CmdStatus})
		if err != nil || ans.Status == nil {
			last = fmt.Sprintf("error %v", err)
			return false
		}
		last = fmt.Sprintf("in flight %d", ans.Status.InFlight)
		return ans.Status.InFlight >= 1
	}) {
		t.Fatalf("the server did not report %s in flight within 10s; last status: %s", path, last)
	}
	select {
	case <-r.Done:
		t.Fatalf("%s ended before the test could go on (%v): the machine is too slow for this test", path, r)
	default:
	}
	return r
}

// opsCheckGone asserts that none of paths exists.
func opsCheckGone(t *testing.T, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists after the stop (lstat: %v)", p, err)
		}
	}
}

// ---------------------------------------------------------------------------
// The PID file's temporary files

// TestPIDFileTemporaryFilesAreSwept: a new generation writes its PID file
// beside the real one ahead of Ready (".handoff.pid.tmp-PID-RANDOM") and puts it in
// place at Ready. One left by a process that died in between is removed at
// the next start and after the next failed upgrade; a successful upgrade
// leaves none.
func TestPIDFileTemporaryFilesAreSwept(t *testing.T) {
	dir := t.TempDir()
	stale := func() string {
		t.Helper()
		cmd := exec.Command("true")
		if err := cmd.Run(); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, ".handoff.pid.tmp-"+strconv.Itoa(cmd.Process.Pid)+"-left") // a PID no process has
		if err := os.WriteFile(p, []byte("1\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	temporaries := func() []string {
		t.Helper()
		m, err := filepath.Glob(filepath.Join(dir, ".handoff.pid.*"))
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	s1 := stale()
	s := itest.StartServer(t, itest.ServerOpts{Dir: dir})
	if tmp := temporaries(); len(tmp) > 0 {
		t.Errorf("after the first start: %v remain (%s was left by a dead process)", tmp, filepath.Base(s1))
	}

	p1 := s.LivePID()
	p2 := s.GoodUpgrade(t, "v2", 2, "--wait")
	if pid, err := itest.ReadPIDFile(s.PIDFile); err != nil || pid != p2 {
		t.Errorf("after the upgrade from %d the PID file names %d (%v), want %d", p1, pid, err, p2)
	}
	if tmp := temporaries(); len(tmp) > 0 {
		t.Errorf("after a successful upgrade: %v remain", tmp)
	}

	s2 := stale()
	s.DeployFile(itest.Binary(t, "exit1"), 0o755)
	if r := s.UpgradeCLI(t, "--wait"); r.Code != 1 {
		t.Errorf("upgrade to exit1: exit %d, want 1\n%v", r.Code, r)
	}
	if tmp := temporaries(); len(tmp) > 0 {
		t.Errorf("after a failed upgrade: %v remain (%s was left by a dead process)", tmp, filepath.Base(s2))
	}
	if pid, err := itest.ReadPIDFile(s.PIDFile); err != nil || pid != p2 {
		t.Errorf("after the failed upgrade the PID file names %d (%v), want %d", pid, err, p2)
	}
}

// ---------------------------------------------------------------------------
// --metrics

// TestMetrics: serve's /metrics answers throughout upgrades (one of them
// failing), its counters continue across generations, and the drain of a
// generation is reported by the next; run's /metrics counts its children.
func TestMetrics(t *testing.T) {
	t.Run("serve", func(t *testing.T) {
		// --listen localhost:0, not 127.0.0.1:0 like --metrics: listeners are
		// found again across upgrades by their address strings (see
		// TestMetricsSameAddressAsListen).
		s := itest.StartServer(t, itest.ServerOpts{Listen: "localhost:0", Args: []string{"--metrics", "127.0.0.1:0"}})
		p1 := s.LivePID()
		maddr := opsMetricsAddr(t, s.Logs, p1)
		m := opsMustScrape(t, maddr)
		opsWant(t, m, "first generation", map[string]float64{"handoff_generation": 1})
		for _, name := range []string{"process_resident_memory_bytes", "go_goroutines", "handoff_requests_in_flight",
			"process_start_time_seconds"} {
			if _, ok := m[name]; !ok {
				t.Errorf("/metrics has no %s", name)
			}
		}
		if m["process_resident_memory_bytes"] <= 0 || m["go_goroutines"] <= 0 {
			t.Errorf("process_resident_memory_bytes %v, go_goroutines %v: want both positive",
				m["process_resident_memory_bytes"], m["go_goroutines"])
		}

		load := itest.StartLoad(t, s.Addr, 300, loadArgs()...)
		scrapes := opsStartScrapeLoop(maddr)
		defer scrapes.stop()

		// An idle keep-alive connection is there at the drain, whatever the
		// load's timing: it moves, and the drain counts it.
		idle, err := net.Dial("tcp", s.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer idle.Close()
		idle.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		if resp, err := http.ReadResponse(bufio.NewReader(idle), nil); err != nil {
			t.Fatal(err)
		} else {
			resp.Body.Close()
		}
		p2 := s.GoodUpgrade(t, "v2", 2, "--wait")
		s.WaitGone(p1, 20*time.Second) // from now on only generation 2 answers
		m = opsScrapeUntil(t, maddr, "generation 2 to report the first drain", func(m map[string]float64) bool {
			return m["handoff_generation"] == 2 && m["handoff_drain_duration_seconds_count"] >= 1
		})
		opsWant(t, m, "after the first upgrade", map[string]float64{`handoff_upgrades_total{result="ok"}`: 1,
			"handoff_drain_duration_seconds_count": 1, "handoff_upgrade_duration_seconds_count": 1})
		drained := opsSum(m, "handoff_drain_connections_total{")
		if drained < 1 {
			t.Errorf("handoff_drain_connections_total after a drain under load: %v in all, want at least 1 (%v)", drained,
				opsFamily(m, "handoff_drain_connections_total{"))
		}

		// A failed upgrade is counted by the generation that saw it...
		s.DeployFile(itest.Binary(t, "exit1"), 0o755)
		if r := s.UpgradeCLI(t, "--wait"); r.Code != 1 || !strings.Contains(r.Stderr, "exit status 1") {
			t.Errorf("upgrade to exit1: exit %d, want 1 with \"exit status 1\"\n%v", r.Code, r)
		}
		m = opsMustScrape(t, maddr)
		opsWant(t, m, "after the failed upgrade", map[string]float64{"handoff_generation": 2,
			`handoff_upgrades_total{result="ok"}`: 1, `handoff_upgrades_total{result="failed"}`: 1})

		// ... and handed over with the next successful one.
		p3 := s.GoodUpgrade(t, "v3", 3, "--wait")
		s.WaitGone(p2, 20*time.Second)
		m = opsScrapeUntil(t, maddr, "generation 3 to report the second drain", func(m map[string]float64) bool {
			return m["handoff_generation"] == 3 && m["handoff_drain_duration_seconds_count"] >= 1
		})
		opsWant(t, m, "after the third upgrade", map[string]float64{`handoff_upgrades_total{result="ok"}`: 2})
		if got, ok := m[`handoff_upgrades_total{result="failed"}`]; got != 1 {
			t.Errorf("%s", fmt.Sprintf("the failed upgrade counted by generation 2 is not handed over to generation 3: "+
				`handoff_upgrades_total{result="failed"} = %v (present: %v), want 1; generation 3's handoff_upgrade_duration_seconds_sum `+
				"= %.3fs (upgrader/handoff.go discard() reads with an already-expired deadline, which Go's poller answers "+
				"without read(2): the hello queued for the failed new process is not discarded, and the next one reads it, "+
				"with the handover snapshot and attempt start of the failed attempt)",
				got, ok, m["handoff_upgrade_duration_seconds_sum"]))
		}
		if d := opsSum(m, "handoff_drain_connections_total{"); d < drained {
			t.Errorf("handoff_drain_connections_total went from %v in generation 2 to %v in generation 3: the counter must continue", drained, d)
		}
		s.WaitServing(p3, "v3", 10*time.Second)

		n, failures, backwards := scrapes.stop()
		load.StopAndCheck(t)
		t.Logf("%d scrapes during the upgrades", n)
		if n < 10 {
			t.Errorf("only %d scrapes during the upgrades, want at least 10", n)
		}
		for _, f := range failures {
			t.Errorf("a scrape during the upgrades failed: %s", f)
		}
		// Two processes answer on the metrics socket for the moment between
		// the new generation's Ready and the old one's drain (each counts the
		// upgrade then): a scrape there can see a value once more. Measured,
		// not asserted.
		if len(backwards) > 0 {
			t.Logf("between two successive scrapes during the upgrades, %s (%d times in all)", backwards[0], len(backwards))
		}
	})

	t.Run("run", func(t *testing.T) {
		h := opsStartRunner(t, 2, "--metrics", "127.0.0.1:0")
		kids := h.children(t, 2)
		maddr := opsMetricsAddr(t, h.Logs, h.PID)
		m := opsScrapeUntil(t, maddr, "two serving children", func(m map[string]float64) bool {
			return m[`handoff_children{phase="serving"}`] == 2
		})
		opsWant(t, m, "handoff run --instances 2", map[string]float64{`handoff_children{phase="serving"}`: 2,
			`handoff_children{phase="starting"}`: 0, `handoff_children{phase="draining"}`: 0,
			`handoff_child_pid{instance="0"}`: float64(kids[0]), `handoff_child_pid{instance="1"}`: float64(kids[1])})
		if m["process_resident_memory_bytes"] <= 0 || m["go_goroutines"] <= 0 {
			t.Errorf("handoff run's /metrics: process_resident_memory_bytes %v, go_goroutines %v: want both positive",
				m["process_resident_memory_bytes"], m["go_goroutines"])
		}
		if r := itest.CLI(t, "stop", "--pidfile", h.PIDFile); r.Code != 0 {
			t.Errorf("handoff stop: %v", r)
		}
		if code := h.ExitCode(t, 30*time.Second); code != 0 {
			t.Errorf("handoff run exited %d after handoff stop, want 0", code)
		}
	})
}

// TestMetricsSameAddressAsListen: handoff serve --listen 127.0.0.1:0
// --metrics 127.0.0.1:0 has two listeners with the same address string; after
// an upgrade, the service and the metrics must both still answer on their
// ports.
func TestMetricsSameAddressAsListen(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{Args: []string{"--metrics", "127.0.0.1:0"}})
	p1 := s.LivePID()
	maddr := opsMetricsAddr(t, s.Logs, p1)
	s.Deploy("v2")
	r := s.UpgradeCLI(t, "--wait")
	if r.Code != 0 {
		t.Fatalf("upgrade: exit %d, want 0\n%v", r.Code, r)
	}
	p2 := itest.ParseUpgraded(t, r).NewPID
	s.WaitGone(p1, 20*time.Second)
	var problems []string
	var last string
	if !itest.Poll(5*time.Second, func() bool {
		resp, err := itest.Get(s.Addr, "/healthz")
		last = fmt.Sprintf("%+v %v", resp, err)
		return err == nil && resp.Status == 200 && resp.PID == p2
	}) {
		problems = append(problems, fmt.Sprintf("the service address %s does not answer from generation 2 (pid %d): %s", s.Addr, p2, last))
	}
	if !itest.Poll(5*time.Second, func() bool {
		m, err := opsScrape(maddr)
		last = fmt.Sprintf("generation %v, error %v", m["handoff_generation"], err)
		return err == nil && m["handoff_generation"] == 2
	}) {
		problems = append(problems, fmt.Sprintf("the metrics address %s does not answer from generation 2: %s", maddr, last))
	}
	if len(problems) == 0 {
		return
	}
	// The evidence, from the logs once the output ended.
	if r := itest.CLI(t, "stop", "--pidfile", s.PIDFile); r.Code != 0 {
		t.Logf("handoff stop: %v", r)
	}
	s.Proc.Wait(t, 30*time.Second)
	var gen2 []string
	for _, msg := range []string{"listening", "metrics"} {
		if l, _, ok := s.Logs.First(0, msg, itest.PIDIs(p2)); ok {
			gen2 = append(gen2, fmt.Sprintf("%s on %s", msg, l.Str("addr")))
		}
	}
	t.Errorf("after an upgrade of serve --listen 127.0.0.1:0 --metrics 127.0.0.1:0: %s; "+
		"generation 1 listened on %s with metrics on %s, generation 2 logged %s "+
		"(the listeners are handed over by their address strings, and the two are the same)",
		strings.Join(problems, "; "), s.Addr, maddr, strings.Join(gen2, ", "))
}

// opsMetricsAddr is the address of the "metrics" log line of pid, which must
// be on the loopback with a port.
func opsMetricsAddr(t *testing.T, logs *itest.Logs, pid int) string {
	t.Helper()
	l := logs.Wait(t, 0, "metrics", itest.PIDIs(pid), 15*time.Second)
	addr := l.Str("addr")
	host, port, err := net.SplitHostPort(addr)
	if err != nil || host != "127.0.0.1" || port == "0" {
		t.Fatalf("metrics log line has addr %q, want 127.0.0.1:PORT: %s", addr, l.Raw)
	}
	return addr
}

var opsScrapeClient = &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// opsScrape gets http://addr/metrics on a new connection (never retried) and
// parses its text format: series (name and labels as written) -> value.
func opsScrape(addr string) (map[string]float64, error) {
	resp, err := opsScrapeClient.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		io.Copy(io.Discard, resp.Body)
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	m := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("malformed line %q", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("malformed line %q: %v", line, err)
		}
		m[line[:i]] = v
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(m) == 0 {
		return nil, errors.New("no samples")
	}
	return m, nil
}

func opsMustScrape(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	m, err := opsScrape(addr)
	if err != nil {
		t.Fatalf("scrape http://%s/metrics: %v", addr, err)
	}
	return m
}

// opsScrapeUntil scrapes (10s at most) until cond holds, and returns that scrape.
func opsScrapeUntil(t *testing.T, addr, what string, cond func(map[string]float64) bool) map[string]float64 {
	t.Helper()
	var m map[string]float64
	var err error
	if !itest.Poll(10*time.Second, func() bool { m, err = opsScrape(addr); return err == nil && cond(m) }) {
		t.Fatalf("timed out after 10s waiting for /metrics to show %s; last scrape: %v, error %v", what, m, err)
	}
	return m
}

// opsWant asserts series values.
func opsWant(t *testing.T, m map[string]float64, when string, want map[string]float64) {
	t.Helper()
	for series, w := range want {
		if got, ok := m[series]; !ok || got != w {
			t.Errorf("%s: %s = %v (present: %v), want %v", when, series, got, ok, w)
		}
	}
}

// opsFamily returns the series whose name starts with prefix.
func opsFamily(m map[string]float64, prefix string) map[string]float64 {
	out := map[string]float64{}
	for k, v := range m {
		if strings.HasPrefix(k, prefix) {
			out[k] = v
		}
	}
	return out
}

func opsSum(m map[string]float64, prefix string) float64 {
	var sum float64
	for _, v := range opsFamily(m, prefix) {
		sum += v
	}
	return sum
}

// opsScrapeLoop scrapes /metrics one scrape after the other, each on a new
// connection, until stopped.
type opsScrapeLoop struct {
	done     chan struct{}
	finished chan struct{}
	once     sync.Once

	n         int
	failures  []string
	backwards []string
}

// opsStartScrapeLoop starts scraping addr every millisecond: an upgrade takes
// a few, and the loop must see the endpoint across them.
func opsStartScrapeLoop(addr string) *opsScrapeLoop {
	l := &opsScrapeLoop{done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		defer close(l.finished)
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		var prev map[string]float64
		for {
			m, err := opsScrape(addr)
			l.n++
			if err != nil {
				l.failures = append(l.failures, fmt.Sprintf("%s: %v", time.Now().Format(time.RFC3339Nano), err))
			} else {
				// What a Prometheus server would see: the generation and the
				// counters never go back.
				for _, series := range []string{"handoff_generation", `handoff_upgrades_total{result="ok"}`,
					`handoff_upgrades_total{result="failed"}`} {
					if prev != nil && m[series] < prev[series] {
						l.backwards = append(l.backwards, fmt.Sprintf("%s went from %v to %v (generation %v to %v) at %s",
							series, prev[series], m[series], prev["handoff_generation"], m["handoff_generation"],
							time.Now().Format(time.RFC3339Nano)))
					}
				}
				prev = m
			}
			select {
			case <-l.done:
				return
			case <-tick.C:
			}
		}
	}()
	return l
}

// stop ends the loop and returns how many scrapes it made, the failed ones,
// and the counters that went back.
func (l *opsScrapeLoop) stop() (n int, failures, backwards []string) {
	l.once.Do(func() { close(l.done) })
	<-l.finished // a scrape takes 5s at most
	return l.n, l.failures, l.backwards
}

// ---------------------------------------------------------------------------
// handoff run --instances N, for these tests

// opsRunner is handoff-v1 run --instances N -- node DIR/app.js (the Node
// example) under test.
type opsRunner struct {
	*itest.Proc
	Dir, PIDFile, Addr string
}

// opsStartRunner starts
//
//	handoff-v1 run --listen 127.0.0.1:0 --pidfile DIR/run.pid --log-format json
//	    --instances N --ready-timeout 30s --drain-timeout 15s EXTRA -- node DIR/app.js
//
// and returns once handoff logged "ready", holds a listening socket and the PID
// file names it. Its cleanup kills handoff and every child (each leads a
// process group of its own). Skipped without node.
func opsStartRunner(t *testing.T, instances int, extra ...string) *opsRunner {
	t.Helper()
	itest.SkipWithout(t, "node")
	root, err := itest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	app := filepath.Join(dir, "app.js")
	itest.CopyFile(t, filepath.Join(root, "examples", "node", "server.js"), app, 0o644)
	h := &opsRunner{Dir: dir, PIDFile: filepath.Join(dir, "run.pid")}
	args := []string{"run", "--listen", "127.0.0.1:0", "--pidfile", h.PIDFile, "--log-format", "json",
		"--instances", strconv.Itoa(instances), "--ready-timeout", "30s", "--drain-timeout", "15s"}
	args = append(append(args, extra...), "--", "node", app)
	cmd := exec.Command(itest.Binary(t, "handoff-v1"), args...)
	cmd.Dir = dir
	cmd.Env = itest.CleanEnv(nil)
	h.Proc = itest.StartCmd(t, cmd)
	t.Cleanup(h.kill) // before the Proc's own kill

	h.WaitLog(t, 0, "ready", itest.PIDIs(h.PID), 60*time.Second)
	var port int
	itest.Eventually(t, 10*time.Second, func() bool { port = itest.ListenPort(h.PID); return port != 0 },
		"a LISTEN socket on 127.0.0.1 held by handoff %d", h.PID)
	h.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	itest.Eventually(t, 10*time.Second, func() bool { p, err := itest.ReadPIDFile(h.PIDFile); return err == nil && p == h.PID },
		"PID file %s to name handoff %d", h.PIDFile, h.PID)
	return h
}

// children waits (30s) until status lists n children, all serving, instances
// 0..n-1, and returns their PIDs by instance.
func (h *opsRunner) children(t *testing.T, n int) []int {
	t.Helper()
	var st control.Status
	var pids []int
	if !itest.Poll(30*time.Second, func() bool {
		st = itest.Status(t, h.PIDFile)
		if len(st.Children) != n {
			return false
		}
		pids = make([]int, n)
		for _, c := range st.Children {
			if c.Phase != control.ChildServing || c.Instance < 0 || c.Instance >= n || pids[c.Instance] != 0 || c.PID <= 1 {
				return false
			}
			pids[c.Instance] = c.PID
		}
		return true
	}) {
		t.Fatalf("status did not list %d serving children within 30s: %s", n, itest.JSON(st.Children))
	}
	return pids
}

// ours reports whether pid is alive and runs our app (its command line names
// the temp dir), so that a recycled PID is never killed.
func (h *opsRunner) ours(pid int) bool {
	if !itest.Alive(pid) {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && strings.Contains(string(b), h.Dir)
}

// kill freezes handoff (it starts no child meanwhile), kills every child's
// process group, then handoff's group, then any child handoff logged that
// still runs.
func (h *opsRunner) kill() {
	if h.Running() {
		_ = syscall.Kill(h.PID, syscall.SIGSTOP)
		for _, k := range itest.Children(h.PID) {
			itest.KillGroup(k.PID)
		}
	}
	h.Proc.Kill()
	var left []int
	ls, _ := h.Logs.Find(0, "child started", itest.PIDIs(h.PID))
	for _, l := range ls {
		if n, ok := l.Num("child_pid"); ok && n > 1 && h.ours(int(n)) {
			itest.KillGroup(int(n))
			left = append(left, int(n))
		}
	}
	if !itest.Poll(10*time.Second, func() bool { return !slices.ContainsFunc(left, itest.Alive) }) {
		fmt.Fprintf(os.Stderr, "ops test: children %v of handoff run still alive 10s after SIGKILL\n", left)
	}
}

// ---------------------------------------------------------------------------
// scripts/ansible

// TestAnsibleRollout runs scripts/ansible/rollout.yml against three handoff
// serve instances on this machine standing in for hosts (local connection),
// each under load: a good build reaches all three; a broken one stops at the
// first host, which keeps serving its version (its binary put back), and the
// others are not touched. No request fails meanwhile.
func TestAnsibleRollout(t *testing.T) {
	playbook, err := exec.LookPath("ansible-playbook")
	if err != nil {
		t.Skip("ansible-playbook is not installed (Debian: apt-get install ansible; .ci/run installs it): " +
			"skipping the test of scripts/ansible/rollout.yml")
	}
	root, err := itest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	var servers []*itest.Server
	var loads []*itest.Load
	for range 3 {
		servers = append(servers, itest.StartServer(t, itest.ServerOpts{}))
	}
	for _, s := range servers {
		loads = append(loads, itest.StartLoad(t, s.Addr, 100, loadArgs()...))
	}

	dir := t.TempDir()
	var inv strings.Builder
	inv.WriteString("[handoff]\n")
	for i, s := range servers {
		fmt.Fprintf(&inv, "host%d ansible_connection=local ansible_python_interpreter=\"{{ ansible_playbook_python }}\""+
			" handoff_binary=%s handoff_pidfile=%s handoff_health_url=http://%s/healthz\n", i+1, s.Live, s.PIDFile, s.Addr)
	}
	inventory := filepath.Join(dir, "inventory.ini")
	if err := os.WriteFile(inventory, []byte(inv.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	play := func(build string) itest.Result {
		t.Helper()
		cmd := exec.Command(playbook, "-i", inventory, filepath.Join(root, "scripts", "ansible", "rollout.yml"),
			"-e", "new_build="+build)
		cmd.Dir = dir
		cmd.Env = itest.CleanEnv([]string{
			"ANSIBLE_CONFIG=" + filepath.Join(root, "scripts", "ansible", "ansible.cfg"),
			"ANSIBLE_HOME=" + filepath.Join(dir, "ansible-home"),
			"ANSIBLE_LOCAL_TEMP=" + filepath.Join(dir, "ansible-local"),
			"ANSIBLE_REMOTE_TEMP=" + filepath.Join(dir, "ansible-remote"),
			"ANSIBLE_NOCOLOR=1", "ANSIBLE_FORCE_COLOR=0", "LC_ALL=C.UTF-8", "LANG=C.UTF-8",
		})
		r := itest.RunCmd(t, 5*time.Minute, cmd)
		t.Logf("ansible-playbook -e new_build=%s: exit %d after %v\n%s\n%s", filepath.Base(build), r.Code,
			r.Took.Round(time.Millisecond), r.Stdout, r.Stderr)
		return r
	}

	// A good build reaches every host, in order.
	before := make([]int, 3)
	for i, s := range servers {
		before[i] = s.LivePID()
	}
	r := play(itest.Binary(t, "handoff-v2"))
	if r.Code != 0 {
		t.Fatalf("rollout of v2: ansible-playbook exit %d, want 0", r.Code)
	}
	at := -1
	after := make([]int, 3)
	for i, s := range servers {
		verdict := fmt.Sprintf("host%d: upgraded: pid %d -> ", i+1, before[i])
		j := strings.Index(r.Stdout, verdict)
		if j < 0 || j < at || !strings.Contains(r.Stdout[j:], "version v2") {
			t.Errorf("rollout of v2: no verdict %q (with version v2) after the previous host's in the output", verdict)
		}
		at = j
		after[i] = s.WaitNewPID(before[i], 10*time.Second)
		s.WaitServing(after[i], "v2", 10*time.Second)
		s.Version = "v2"
		opsCheckVersion(t, s.Live, "v2")
	}

	// A broken build: the rollout stops at the first host.
	sums := make([][32]byte, 3)
	for i, s := range servers {
		sums[i] = opsSHA256(t, s.Live)
	}
	r = play(itest.Binary(t, "exit1"))
	if r.Code == 0 {
		t.Errorf("rollout of a broken build: ansible-playbook exit 0, want non-zero")
	}
	for _, want := range []string{"host1: rollout stopped here", "upgrade failed: new process",
		"exited before ready: exit status 1", "testdata-exit1: pid", fmt.Sprintf("pid %d keeps serving", after[0])} {
		if !strings.Contains(r.Stdout, want) {
			t.Errorf("rollout of a broken build: the output does not say %q", want)
		}
	}
	for _, host := range []string{"[host2]", "[host3]"} {
		if strings.Contains(r.Stdout, host) {
			t.Errorf("rollout of a broken build: %s was reached, want the rollout stopped at host1", host)
		}
	}
	for i, s := range servers {
		if p := s.LivePID(); p != after[i] {
			t.Errorf("host%d: the PID file names %d after the failed rollout, want %d (unchanged)", i+1, p, after[i])
		}
		s.WaitServing(after[i], "v2", 10*time.Second)
		if opsSHA256(t, s.Live) != sums[i] {
			t.Errorf("host%d: %s changed by the failed rollout (host1: the previous binary must be put back)", i+1, s.Live)
		}
		if _, err := os.Lstat(s.Live + ".new"); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("host%d: %s.new left behind (lstat: %v)", i+1, s.Live, err)
		}
		s.CheckOneProcess(t, after[i])
	}
	for _, l := range loads {
		l.StopAndCheck(t)
	}
}

// opsCheckVersion asserts that bin version prints version.
func opsCheckVersion(t *testing.T, bin, version string) {
	t.Helper()
	r := itest.Run(t, 30*time.Second, bin, "version")
	if r.Code != 0 || strings.TrimSpace(r.Stdout) != version {
		t.Errorf("%s version: %v, want %s", bin, r, version)
	}
}

func opsSHA256(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// opsLastLine is the last non-empty line of s.
func opsLastLine(s string) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return lines[len(lines)-1]
}
