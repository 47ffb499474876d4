package main_test

// Fault injection (issue 8: "Failure paths keep the promise: the old process
// keeps serving, whatever fails"). Each test breaks an upgrade or a stop of the
// real binary in one way, under load, and checks from the outside what the
// promise says: no request fails on the process that survives (requests in
// flight on a process the test itself SIGKILLs excepted), the listening socket
// is the one the first process bound, Unix socket paths and the control socket
// stay and answer, systemd hears no STOPPING=1 but on a real stop, exit codes
// are those of the README, and nothing is left holding the port.
//
// The harness is internal/itest (see helpers_test.go); what it lacks is here,
// prefixed with fault. Every wait is bounded, and every process runs in a
// process group that the test's cleanup kills and waits for.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/itest"
)

// faultRate is the load of the handoff serve tests, in requests per second:
// enough for every process to take part, light enough for two cores.
// faultRunRate is that of the handoff run tests, whose Node.js children
// serve slower (as run_test.go's light load does).
const (
	faultRate    = 400
	faultRunRate = 200
)

// faultLoadArgs is the mix: pooled keep-alive connections, 30% of the
// requests on a new connection, and a share of slow ones.
func faultLoadArgs(slowFraction, slow string) []string {
	return []string{"--conns", "8", "--new-conn-fraction", "0.3", "--slow-fraction", slowFraction, "--slow", slow}
}

// faultUpgradeToHang deploys testdata/hang and starts handoff upgrade, in the
// background; it returns once the new process said it blocks (logged after
// mark), with its PID.
func faultUpgradeToHang(t *testing.T, s *itest.Server, mark int) (*itest.Running, int) {
	t.Helper()
	s.DeployFile(itest.Binary(t, "hang"), 0o755)
	bg := faultStartCLI(t, "upgrade", "--pidfile", s.PIDFile)
	hangRE := regexp.MustCompile(`^testdata-hang: pid (\d+) blocking forever$`)
	hl := s.Logs.Wait(t, mark, "", func(l itest.Line) bool { return hangRE.MatchString(l.Raw) }, 15*time.Second)
	pid, _ := strconv.Atoi(hangRE.FindStringSubmatch(hl.Raw)[1])
	return bg, pid
}

// faultStartCLI starts handoff-v1 args... (a client that waits for a
// verdict) in its own process group, killed after 2 minutes at most.
func faultStartCLI(t *testing.T, args ...string) *itest.Running {
	t.Helper()
	cmd := exec.Command(itest.Binary(t, "handoff-v1"), args...)
	cmd.Env = itest.CleanEnv(nil)
	return itest.Go(t, 2*time.Minute, cmd)
}

// faultScript renames a new shell script with body over path.
func faultScript(t testing.TB, path, body string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// faultHolders returns every process that holds a descriptor for socket inode.
func faultHolders(inode uint64) []int {
	want := fmt.Sprintf("socket:[%d]", inode)
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		dir := "/proc/" + e.Name() + "/fd/"
		fds, _ := os.ReadDir(dir)
		for _, fd := range fds {
			if l, _ := os.Readlink(dir + fd.Name()); l == want {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// faultOnlyHolder asserts that pid is, within 10s, the one process holding
// socket inode.
func faultOnlyHolder(t testing.TB, inode uint64, pid int) {
	t.Helper()
	var hs []int
	if !itest.Poll(10*time.Second, func() bool { hs = faultHolders(inode); return len(hs) == 1 && hs[0] == pid }) {
		var what []string
		for _, h := range hs {
			what = append(what, itest.Describe(h))
		}
		t.Errorf("holders of the listening socket inode %d: %v, want only pid %d:\n%s", inode, hs, pid, strings.Join(what, "\n"))
	}
}

// faultPortReleased asserts that, within 15s, no process holds socket inode,
// port has no LISTEN socket left and can be bound again.
func faultPortReleased(t testing.TB, inode uint64, port int) {
	t.Helper()
	var why string
	if !itest.Poll(15*time.Second, func() bool {
		if hs := faultHolders(inode); len(hs) > 0 {
			why = fmt.Sprintf("processes %v hold the listening socket inode %d", hs, inode)
			return false
		}
		if ins := itest.ListenInodes(port); len(ins) > 0 {
			why = fmt.Sprintf("LISTEN sockets on 127.0.0.1:%d: %v", port, ins)
			return false
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			why = err.Error()
			return false
		}
		ln.Close()
		return true
	}) {
		t.Errorf("port %d not released within 15s: %s", port, why)
	}
}

// faultScriptChild waits (10s) for the shell script that wrote its PID to
// pidFile to have a live child running comm, and returns both PIDs. The
// test's cleanup kills them if they still run then (each only if its command
// line is still the one seen here: a reused PID is never killed).
func faultScriptChild(t *testing.T, pidFile, comm string) (sh, child int) {
	t.Helper()
	itest.Eventually(t, 10*time.Second, func() bool {
		b, err := os.ReadFile(pidFile)
		if err != nil {
			return false
		}
		if sh, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil || sh <= 1 {
			return false
		}
		for _, c := range itest.LiveChildren(sh) {
			if c.Comm == comm {
				child = c.PID
				return true
			}
		}
		return false
	}, "the script of %s to fork %s", pidFile, comm)
	for _, pid := range []int{sh, child} {
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		t.Cleanup(func() {
			if now, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err != nil || string(now) != string(cmdline) || !itest.Alive(pid) {
				return
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
			if !itest.Poll(10*time.Second, func() bool { return !itest.Alive(pid) }) {
				t.Errorf("pid %d not gone 10s after SIGKILL", pid)
			}
		})
	}
	return sh, child
}

// faultGetUnix does GET path on the HTTP server of Unix socket sock, on a
// fresh connection (10s at most).
func faultGetUnix(sock, path string) (itest.Response, error) {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := c.Get("http://unix" + path)
	if err != nil {
		return itest.Response{}, err
	}
	return itest.ReadResponse(resp)
}

// faultSocketsServe asserts that the socket files exist and that the Unix
// HTTP socket app and the control socket answer from pid.
func faultSocketsServe(t *testing.T, s *itest.Server, app string, pid int, when string) {
	t.Helper()
	for _, p := range []string{app, s.PIDFile + ".sock"} {
		if fi, err := os.Stat(p); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("%s: socket file %s: %v (mode %v), want a socket", when, p, err, fi)
		}
	}
	if r, err := faultGetUnix(app, "/hello/unix"); err != nil || r.Status != 200 || r.Body != "Hello unix!!!" || r.PID != pid {
		t.Errorf("%s: GET /hello/unix on %s: %+v %v, want 200 \"Hello unix!!!\" from pid %d", when, app, r, err, pid)
	}
	if r := itest.CLI(t, "status", "--pidfile", s.PIDFile); r.Code != 0 || !strings.HasPrefix(r.Stdout, fmt.Sprintf("pid %d,", pid)) {
		t.Errorf("%s: handoff status: exit %d, want 0 and an answer from pid %d\n%v", when, r.Code, pid, r)
	}
}

// faultNoStopping asserts that no datagram so far says STOPPING=1.
func faultNoStopping(t *testing.T, ns *itest.NotifySocket, when string) {
	t.Helper()
	for _, m := range ns.Flush(t) {
		if strings.Contains(m.Text, "STOPPING=1") {
			t.Errorf("%s: pid %d sent %q to NOTIFY_SOCKET: systemd would stop the unit", when, m.PID, m.Text)
		}
	}
}

// faultLastUpgrade waits (10s) for status to be answered by pid in phase
// serving (the phase settles a moment after the verdict) and returns its last
// upgrade, which must have failed with kind.
func faultLastUpgrade(t *testing.T, s *itest.Server, pid int, kind control.Kind) *control.Outcome {
	t.Helper()
	var st control.Status
	itest.Poll(10*time.Second, func() bool { st = s.Status(t); return st.PID == pid && st.Phase == "serving" })
	if st.PID != pid || st.Phase != "serving" || st.LastUpgrade == nil || st.LastUpgrade.OK || st.LastUpgrade.Kind != kind {
		t.Errorf("status after the failed upgrade: %s, want pid %d, phase serving and last_upgrade ok=false kind=%s", itest.JSON(st), pid, kind)
	}
	if st.LastUpgrade == nil {
		return &control.Outcome{}
	}
	return st.LastUpgrade
}

var faultExitedRE = regexp.MustCompile(`(?m)^upgrade failed: new process (\d+) exited before ready: (.+)$`)

// ---------------------------------------------------------------------------
// A. handoff serve: a new generation that fails after taking its sockets (the
// wrapper adds a --listen on a busy port; or it panics). The old generation's
// Unix socket paths and control socket stay and answer, systemd hears no
// STOPPING=1 until the real stop at the end, and the sequence is exact.

func TestFaultServeNewGenerationFailsHoldingSockets(t *testing.T) {
	ns := itest.ListenNotify(t)
	dir := t.TempDir()
	app := filepath.Join(dir, "app.sock")
	s := itest.StartServer(t, itest.ServerOpts{Dir: dir, CleanEnv: true, Env: []string{"NOTIFY_SOCKET=" + ns.Path},
		Args: []string{"--listen", "unix:" + app}})
	p1 := s.LivePID()
	faultSocketsServe(t, s, app, p1, "at start")

	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	realBin := filepath.Join(dir, "handoff-real")
	itest.CopyFile(t, itest.Binary(t, "handoff-v2"), realBin, 0o755)
	notready := itest.Binary(t, "notready")
	load := itest.StartLoad(t, s.Addr, faultRate, faultLoadArgs("0.05", "300ms")...)

	cases := []struct {
		name, script, status, marker string
	}{
		{"busy-port", fmt.Sprintf("exec %q \"$@\" --listen %s\n", realBin, busy.Addr()), "exit status 3", "address already in use"},
		{"panic", fmt.Sprintf("exec %q \"$@\" --notready-mode panic\n", notready), "exit status 2", "panic: testdata-notready: pid"},
	}
	for _, c := range cases {
		mark := s.Logs.Mark()
		faultScript(t, s.Live, c.script)
		r := s.UpgradeCLI(t)
		if r.Code != 1 || !strings.HasSuffix(r.Stderr, fmt.Sprintf("pid %d keeps serving\n", p1)) {
			t.Errorf("%s: handoff upgrade exit %d, want 1 and \"pid %d keeps serving\"\n%v", c.name, r.Code, p1, r)
		}
		m := faultExitedRE.FindStringSubmatch(r.Stderr)
		if m == nil || m[2] != c.status {
			t.Fatalf("%s: handoff upgrade stderr has no \"new process N exited before ready: %s\":\n%s", c.name, c.status, r.Stderr)
		}
		newPID, _ := strconv.Atoi(m[1])
		// It took the sockets first: it logged listening on both (the panic
		// case logs nothing, but panics holding them, as its message says).
		if c.name == "busy-port" {
			for _, addr := range []string{s.Addr, app} {
				s.Logs.Wait(t, mark, "listening", func(l itest.Line) bool { return l.PID() == newPID && l.Str("addr") == addr }, 10*time.Second)
			}
		}
		if !s.Logs.WaitContains(mark, c.marker, 10*time.Second) {
			t.Errorf("%s: no %q in the output: the new process did not fail as intended", c.name, c.marker)
		}
		fl := s.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(p1), 10*time.Second)
		if fl.Str("kind") != "exited" {
			t.Errorf("%s: upgrade failed log: %s, want kind exited", c.name, fl.Raw)
		}
		if lu := faultLastUpgrade(t, s, p1, control.KindExited); lu.PID != newPID || lu.ExitStatus != c.status {
			t.Errorf("%s: last_upgrade %s, want pid %d exit_status %q", c.name, itest.JSON(lu), newPID, c.status)
		}
		if itest.Alive(newPID) {
			t.Errorf("%s: the failed new process %d is still alive", c.name, newPID)
		}
		if p, err := s.ReadPID(); err != nil || p != p1 {
			t.Errorf("%s: PID file names %d (%v), want %d", c.name, p, err, p1)
		}
		faultSocketsServe(t, s, app, p1, c.name)
		s.WaitServing(p1, "v1", 5*time.Second)
		s.CheckOneProcess(t, p1)
		s.CheckListener(t, p1)
		faultOnlyHolder(t, s.Inode, p1)
		faultNoStopping(t, ns, c.name)
	}
	load.StopAndCheck(t)

	// The real stop: exit 0, and only now STOPPING=1, and the sockets go.
	s.Signal(p1, syscall.SIGTERM)
	if st := s.Proc.Wait(t, 20*time.Second); st.ExitCode() != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	faultPortReleased(t, s.Inode, s.Port)
	for _, p := range []string{app, s.PIDFile + ".sock", s.PIDFile} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s after the final stop: stat error %v, want it removed", p, err)
		}
	}
	msgs := faultNotifications(t, ns)
	reloading := func(text string) bool {
		v, ok := strings.CutPrefix(strings.TrimSuffix(text, "\n"), "RELOADING=1\nMONOTONIC_USEC=")
		n, err := strconv.ParseUint(v, 10, 64)
		return ok && err == nil && n > 0
	}
	failed := func(status string) func(string) bool {
		return func(text string) bool {
			return strings.HasPrefix(text, "STATUS=upgrade failed: ") && strings.Contains(text, status) && !strings.Contains(text, "\n")
		}
	}
	exact := func(want string) func(string) bool { return func(text string) bool { return text == want } }
	want := []struct {
		what string
		ok   func(string) bool
	}{
		{"ready", exact(fmt.Sprintf("MAINPID=%d\nREADY=1\nSTATUS=serving: generation 1, version v1", p1))},
		{"busy-port: reloading", reloading},
		{"busy-port: failed", failed("exit status 3")},
		{"busy-port: ready again", exact("READY=1")},
		{"panic: reloading", reloading},
		{"panic: failed", failed("exit status 2")},
		{"panic: ready again", exact("READY=1")},
		{"stopping", exact("STOPPING=1")},
	}
	if len(msgs) != len(want) {
		t.Errorf("%d notify datagrams, want %d", len(msgs), len(want))
	}
	for i := 0; i < len(msgs) && i < len(want); i++ {
		if msgs[i].PID != p1 || !want[i].ok(msgs[i].Text) {
			t.Errorf("datagram %d (%s): pid %d %q, want it from pid %d", i+1, want[i].what, msgs[i].PID, msgs[i].Text, p1)
		}
	}
}

// ---------------------------------------------------------------------------
// B. handoff serve: the new binary is a script that forks and hangs (its
// sleep inherits every descriptor). At --upgrade-timeout the upgrade fails
// with kind timeout and the sleep is killed too: the server alone holds the
// listening socket; after SIGTERM it exits 0 and the port is free.

func TestFaultServeWrapperForksAndHangs(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "2s"})
	p1 := s.LivePID()
	load := itest.StartLoad(t, s.Addr, faultRate, faultLoadArgs("0.05", "300ms")...)

	mark := s.Logs.Mark()
	pidFile := filepath.Join(s.Dir, "wrapper.pid")
	faultScript(t, s.Live, fmt.Sprintf("echo $$ > %q\necho \"testdata-fault: sh $$ forks a sleep\" >&2\nsleep 1000\nexit 0\n", pidFile))
	bg := faultStartCLI(t, "upgrade", "--pidfile", s.PIDFile)
	sh, sleep := faultScriptChild(t, pidFile, "sleep")
	r := bg.Wait(t, 90*time.Second)
	t.Logf("%s", r)
	if r.Code != 1 || !strings.Contains(r.Stderr, "timed out") || !strings.HasSuffix(r.Stderr, fmt.Sprintf("pid %d keeps serving\n", p1)) {
		t.Errorf("handoff upgrade: exit %d, want 1 with \"timed out\" and \"pid %d keeps serving\"\n%v", r.Code, p1, r)
	}
	if r.Took < 2*time.Second || r.Took > 15*time.Second {
		t.Errorf("verdict after %v with --upgrade-timeout 2s, want 2s..15s", r.Took)
	}
	if fl := s.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(p1), 10*time.Second); fl.Str("kind") != "timeout" {
		t.Errorf("upgrade failed log: %s, want kind timeout", fl.Raw)
	}
	faultLastUpgrade(t, s, p1, control.KindTimeout)
	if !strings.Contains(r.Stderr, fmt.Sprintf("new process %d timed out", sh)) {
		t.Errorf("handoff upgrade does not name the wrapper %d as the new process:\n%s", sh, r.Stderr)
	}
	for _, p := range []int{sh, sleep} {
		if !itest.Poll(10*time.Second, func() bool { return !itest.Alive(p) }) {
			t.Errorf("%s of the wrapper outlived the failed upgrade", itest.Describe(p))
		}
	}
	faultOnlyHolder(t, s.Inode, p1)
	s.CheckOneProcess(t, p1)
	s.CheckListener(t, p1)
	s.WaitServing(p1, "v1", 5*time.Second)
	load.StopAndCheck(t)

	s.Signal(p1, syscall.SIGTERM)
	if st := s.Proc.Wait(t, 20*time.Second); st.ExitCode() != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	faultPortReleased(t, s.Inode, s.Port)
}

// ---------------------------------------------------------------------------
// C. handoff serve: a new generation that serves but never becomes ready
// (testdata/notready), under load with 800 ms requests, --upgrade-timeout 1s.
// It is told to stop and drains what it accepted, instead of being killed:
// no request fails, the verdict is timeout, the old generation serves on.

func TestFaultServeNewGenerationNeverReady(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "1s", DrainTimeout: "10s"})
	p1 := s.LivePID()
	load := itest.StartLoad(t, s.Addr, faultRate, faultLoadArgs("0.1", "800ms")...)

	mark := s.Logs.Mark()
	s.DeployFile(itest.Binary(t, "notready"), 0o755)
	r := s.UpgradeCLI(t)
	if r.Code != 1 || !strings.Contains(r.Stderr, "timed out before ready and was told to stop") ||
		!strings.HasSuffix(r.Stderr, fmt.Sprintf("pid %d keeps serving\n", p1)) {
		t.Errorf("handoff upgrade: exit %d, want 1 with \"timed out before ready and was told to stop\" and \"pid %d keeps serving\"\n%v", r.Code, p1, r)
	}
	if fl := s.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(p1), 10*time.Second); fl.Str("kind") != "timeout" {
		t.Errorf("upgrade failed log: %s, want kind timeout", fl.Raw)
	}
	newPID := faultLastUpgrade(t, s, p1, control.KindTimeout).PID
	if newPID <= 1 || newPID == p1 {
		t.Fatalf("last_upgrade names new process %d", newPID)
	}
	// It drained on its own: its drained line, and no kill.
	d := s.Logs.Wait(t, mark, "drained", itest.PIDIs(newPID), 15*time.Second)
	if cut, _ := d.Num("cut"); cut != 0 {
		t.Errorf("the not-ready process cut %d connections: %s", cut, d.Raw)
	}
	s.Logs.None(t, mark, "the new process did not stop in time: killing it", nil, "the not-ready process drains by itself")
	itest.Eventually(t, 10*time.Second, func() bool { return !itest.Alive(newPID) }, "the not-ready process %d to exit", newPID)
	faultOnlyHolder(t, s.Inode, p1)
	s.CheckOneProcess(t, p1)
	s.CheckListener(t, p1)
	s.WaitServing(p1, "v1", 5*time.Second)

	res := load.StopAndCheck(t)
	ps, _ := itest.PIDStat(res, newPID)
	n, _ := d.Num("requests")
	t.Logf("the not-ready process %d answered %d load requests, %d of them while draining", newPID, ps.Count, n)
	if ps.Count == 0 || ps.Version != "notready" {
		t.Errorf("precondition: the not-ready process %d answered no load request (%+v): it never served", newPID, ps)
	}
}

// C2. A stop (SIGTERM) that reaches a new generation before its Ready: Ready
// fails, so the old generation does not hand over to a process that is about
// to drain and exit; it serves on, and the PID file still names it.
func TestFaultServeStopBeforeReady(t *testing.T) {
	faultStopBeforeReady(t, "ready-on-usr1", "waiting for SIGUSR1 to call Ready", func(s *itest.Server, mark, newPID int) {
		s.Signal(newPID, syscall.SIGTERM)
		s.Logs.Wait(t, mark, "stop requested", itest.PIDIs(newPID), 10*time.Second)
		s.Signal(newPID, syscall.SIGUSR1)
	}, "stop requested before ready")
}

// A PID file that cannot be put in place at Ready (here its temporary file,
// written from New, is gone) fails Ready before the handover: the old
// generation serves on and the PID file still names it.
func TestFaultServePIDFileLostBeforeReady(t *testing.T) {
	faultStopBeforeReady(t, "ready-on-usr1", "waiting for SIGUSR1 to call Ready", func(s *itest.Server, mark, newPID int) {
		tmp, _ := filepath.Glob(filepath.Join(filepath.Dir(s.PIDFile), "."+filepath.Base(s.PIDFile)+".tmp-"+strconv.Itoa(newPID)+"-*"))
		if len(tmp) != 1 {
			t.Fatalf("temporary PID files of pid %d: %v, want one", newPID, tmp)
		}
		if err := os.Remove(tmp[0]); err != nil {
			t.Fatal(err)
		}
		s.Signal(newPID, syscall.SIGUSR1)
	}, "cannot write pid file")
}

// The same, for a SIGTERM that reaches the new process before it has even
// called upgrader.New: it is caught all the same (a new generation of a
// server that handles signals catches them from package init), New acts on
// it, and Ready fails.
func TestFaultServeStopBeforeNew(t *testing.T) {
	faultStopBeforeReady(t, "new-after-sigterm", "waiting for SIGTERM to call New", func(s *itest.Server, mark, newPID int) {
		if w, _, _ := s.Logs.First(mark, "waiting for SIGTERM to call New", itest.PIDIs(newPID)); w.Str("early_signals") != "true" {
			t.Errorf("the new process does not catch signals from init: %s", w.Raw)
		}
		s.Signal(newPID, syscall.SIGTERM)
		s.Logs.Wait(t, mark, "stop requested", itest.PIDIs(newPID), 10*time.Second)
	}, "stop requested before ready")
}

// faultStopBeforeReady upgrades to testdata/notready in mode, waits for its
// line waiting, lets act break the upgrade, and checks that Ready failed with
// wantErr and the old generation serves on.
func faultStopBeforeReady(t *testing.T, mode, waiting string, act func(s *itest.Server, mark, newPID int), wantErr string) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "30s", DrainTimeout: "10s"})
	p1 := s.LivePID()
	mark := s.Logs.Mark()
	faultScript(t, s.Live, fmt.Sprintf("exec %q \"$@\" --notready-mode %s\n", itest.Binary(t, "notready"), mode))
	bg := faultStartCLI(t, "upgrade", "--pidfile", s.PIDFile)
	w := s.Logs.Wait(t, mark, waiting, nil, 15*time.Second)
	newPID := w.PID()
	if newPID <= 1 || newPID == p1 {
		t.Fatalf("the waiting line names pid %d: %s", newPID, w.Raw)
	}
	act(s, mark, newPID)
	if l := s.Logs.Wait(t, mark, "ready failed", itest.PIDIs(newPID), 10*time.Second); !strings.Contains(l.Str("error"), wantErr) {
		t.Errorf("Ready: %s, want an error %q", l.Raw, wantErr)
	}
	r := bg.Wait(t, 30*time.Second)
	if r.Code != 1 || !strings.HasSuffix(r.Stderr, fmt.Sprintf("pid %d keeps serving\n", p1)) {
		t.Errorf("handoff upgrade: exit %d, want 1 and \"pid %d keeps serving\"\n%v", r.Code, p1, r)
	}
	itest.Eventually(t, 10*time.Second, func() bool { return !itest.Alive(newPID) }, "the stopped new process %d to exit", newPID)
	if pid, err := itest.ReadPIDFile(s.PIDFile); err != nil || pid != p1 {
		t.Errorf("the PID file names %d (%v), want %d", pid, err, p1)
	}
	s.CheckOneProcess(t, p1)
	s.WaitServing(p1, "v1", 5*time.Second)
}

// ---------------------------------------------------------------------------
// D. handoff serve --preflight: SIGTERM while the preflight check of the new
// binary hangs (--upgrade-timeout 60s). The server drains and exits 0 within
// a few seconds, answering what it accepted, and leaves no process behind.

func TestFaultServeStopDuringPreflight(t *testing.T) {
	ns := itest.ListenNotify(t)
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "60s", Args: []string{"--preflight"},
		CleanEnv: true, Env: []string{"NOTIFY_SOCKET=" + ns.Path}})
	p1 := s.LivePID()
	realBin := filepath.Join(s.Dir, "handoff-real")
	itest.CopyFile(t, itest.Binary(t, "handoff-v2"), realBin, 0o755)
	load := itest.StartLoad(t, s.Addr, faultRate, faultLoadArgs("0.05", "300ms")...)

	pidFile := filepath.Join(s.Dir, "preflight.pid")
	faultScript(t, s.Live, fmt.Sprintf("case \" $* \" in *\" --check \"*) echo $$ > %q; sleep 1000; exit 0;; esac\nexec %q \"$@\"\n", pidFile, realBin))
	bg := faultStartCLI(t, "upgrade", "--pidfile", s.PIDFile)
	sh, sleep := faultScriptChild(t, pidFile, "sleep")
	if st := s.StatusOf(t, p1); st.Phase != "upgrading" {
		t.Errorf("status during the preflight: %s, want phase upgrading", itest.JSON(st))
	}
	// No request fails up to the stop; the stop itself refuses new
	// connections, so the load ends here and requests in flight across the
	// SIGTERM are checked one by one.
	load.StopAndCheck(t)
	var slow []*itest.Inflight
	for range 3 {
		slow = append(slow, itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=1500", 30*time.Second))
	}
	mark := s.Logs.Mark()
	start := time.Now()
	s.Signal(p1, syscall.SIGTERM)
	if !itest.WaitChan(s.Proc.Exited(), 20*time.Second) {
		t.Fatalf("pid %d still running 20s after SIGTERM during a hanging preflight (upgrade timeout 60s): processes %v",
			p1, s.Procs())
	}
	took := time.Since(start)
	if st := s.Proc.Wait(t, 10*time.Second); st.ExitCode() != 0 {
		t.Errorf("exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	t.Logf("exited %v after SIGTERM", took.Round(time.Millisecond))
	if took > 10*time.Second {
		t.Errorf("exited %v after SIGTERM, want within 10s (the preflight may not hold the stop for its 60s)", took)
	}
	s.Logs.Wait(t, mark, "draining", func(l itest.Line) bool { return l.PID() == p1 && l.Str("reason") == "stop" }, time.Second)
	for i, r := range slow {
		if !itest.WaitChan(r.Done, 10*time.Second) {
			t.Errorf("request %d in flight at SIGTERM did not complete", i)
		} else if r.Err != nil || r.Resp.Status != 200 || r.Resp.PID != p1 {
			t.Errorf("request %d in flight at SIGTERM: %v, want 200 from pid %d", i, r, p1)
		}
	}
	if r := bg.Wait(t, 90*time.Second); r.Code == 0 {
		t.Errorf("handoff upgrade exit 0 for an upgrade stopped in its preflight\n%v", r)
	} else {
		t.Logf("%s", r)
	}
	for _, p := range []int{sh, sleep} {
		if !itest.Poll(10*time.Second, func() bool { return !itest.Alive(p) }) {
			t.Errorf("%s of the preflight outlived the server", itest.Describe(p))
		}
	}
	if !itest.Poll(10*time.Second, func() bool { return len(s.Procs()) == 0 }) {
		t.Errorf("processes left in the server's group after it exited: %v", s.Procs())
	}
	faultPortReleased(t, s.Inode, s.Port)
	faultStopOnce(t, ns, p1)
}

// ---------------------------------------------------------------------------
// Three more rows of the matrix on handoff serve, one server, under load:
// the new process SIGKILLed before it is ready; the old generation SIGKILLed
// while it drains; SIGTERM while an upgrade runs.

func TestFaultServeKills(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "60s"})
	p1 := s.LivePID()
	load := itest.StartLoad(t, s.Addr, faultRate, faultLoadArgs("0.05", "300ms")...)

	// 1. SIGKILL of the new process before it is ready (it hangs, holding
	// the sockets): exit 1, kind exited, the old one serves on.
	mark := s.Logs.Mark()
	bg, hangPID := faultUpgradeToHang(t, s, mark)
	s.KillInGroup(t, hangPID, p1)
	r := bg.Wait(t, 90*time.Second)
	t.Logf("kill -9 before ready: %s", r)
	if r.Code != 1 || !strings.Contains(r.Stderr, "exited before ready: signal: killed") || !strings.HasSuffix(r.Stderr, fmt.Sprintf("pid %d keeps serving\n", p1)) {
		t.Errorf("kill -9 before ready: handoff upgrade exit %d, want 1 with \"exited before ready: signal: killed\" and \"pid %d keeps serving\"\n%v", r.Code, p1, r)
	}
	faultLastUpgrade(t, s, p1, control.KindExited)
	s.CheckOneProcess(t, p1)
	faultOnlyHolder(t, s.Inode, p1)

	// 2. SIGKILL of the old generation while it drains a slow request: the
	// new one goes from draining-previous to serving, and upgrades again.
	slow := itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=20000", 30*time.Second)
	p2 := s.GoodUpgrade(t, "v2", 2)
	if st := s.StatusOf(t, p2); st.Phase != "draining-previous" || st.PreviousPID != p1 {
		t.Fatalf("precondition: status %s, want pid %d draining-previous with previous_pid %d", itest.JSON(st), p2, p1)
	}
	// Only the slow request is left on p1 (its load connections closed as it
	// drained): nothing of the load is in flight on the process killed.
	itest.Eventually(t, 15*time.Second, func() bool { return faultConnsOf(p1, s.Port) == 1 },
		"pid %d to hold only the slow request's connection", p1)
	s.KillInGroup(t, p1, p2)
	if !itest.WaitChan(slow.Done, 10*time.Second) {
		t.Errorf("the slow request on the killed pid %d did not end", p1)
	}
	itest.Eventually(t, 10*time.Second, func() bool { return s.Status(t).Phase == "serving" },
		"pid %d to leave draining-previous after pid %d was killed", p2, p1)
	faultOnlyHolder(t, s.Inode, p2)
	p3 := s.GoodUpgrade(t, "v3", 3)
	s.WaitGone(p2, 20*time.Second)
	s.CheckOneProcess(t, p3)
	s.CheckListener(t, p3)

	load.StopAndCheck(t)
}

// SIGTERM while an upgrade runs (the new process hangs, the upgrade timeout is
// 60s): the server drains what it holds and exits 0 at once, the hanging
// process is killed, nothing is left; systemd hears STOPPING=1 once.
func TestFaultServeStopMidUpgrade(t *testing.T) {
	ns := itest.ListenNotify(t)
	s := itest.StartServer(t, itest.ServerOpts{UpgradeTimeout: "60s", CleanEnv: true, Env: []string{"NOTIFY_SOCKET=" + ns.Path}})
	p1 := s.LivePID()
	load := itest.StartLoad(t, s.Addr, faultRate, faultLoadArgs("0.05", "300ms")...)
	mark := s.Logs.Mark()
	bg, _ := faultUpgradeToHang(t, s, mark)
	load.StopAndCheck(t) // the stop refuses new connections: the load ends before it
	var slow []*itest.Inflight
	for range 3 {
		slow = append(slow, itest.StartRequest(t, s.Addr, s.Port, "/slow?ms=1000", 30*time.Second))
	}
	start := time.Now()
	s.Signal(p1, syscall.SIGTERM)
	if !itest.WaitChan(s.Proc.Exited(), 20*time.Second) {
		t.Fatalf("pid %d still running 20s after SIGTERM during a hanging upgrade: processes %v", p1, s.Procs())
	}
	took := time.Since(start)
	if st := s.Proc.Wait(t, 10*time.Second); st.ExitCode() != 0 {
		t.Errorf("exit status %d after SIGTERM mid-upgrade, want 0 (%v)", st.ExitCode(), st)
	}
	t.Logf("exited %v after SIGTERM", took.Round(time.Millisecond))
	if took > 10*time.Second {
		t.Errorf("exited %v after SIGTERM mid-upgrade, want within 10s", took)
	}
	for i, r := range slow {
		if !itest.WaitChan(r.Done, 10*time.Second) || r.Err != nil || r.Resp.Status != 200 || r.Resp.PID != p1 {
			t.Errorf("request %d in flight at SIGTERM: %v, want 200 from pid %d", i, r, p1)
		}
	}
	r := bg.Wait(t, 90*time.Second)
	t.Logf("%s", r)
	if r.Code == 0 {
		t.Errorf("handoff upgrade exit 0 for an upgrade ended by a stop")
	}
	if !itest.Poll(10*time.Second, func() bool { return len(s.Procs()) == 0 }) {
		t.Errorf("processes left in the server's group after SIGTERM: %v", s.Procs())
	}
	faultPortReleased(t, s.Inode, s.Port)
	faultStopOnce(t, ns, p1)
}

// faultNotifications returns the datagrams received on ns, without the
// sentinels of earlier flushes, and logs them.
func faultNotifications(t *testing.T, ns *itest.NotifySocket) []itest.NotifyMsg {
	t.Helper()
	var msgs []itest.NotifyMsg
	var got strings.Builder
	for _, m := range ns.Flush(t) {
		if !strings.HasPrefix(m.Text, "TEST-FLUSH-") {
			msgs = append(msgs, m)
			fmt.Fprintf(&got, "  %d. pid %d: %q\n", len(msgs), m.PID, m.Text)
		}
	}
	t.Logf("notify datagrams:\n%s", got.String())
	return msgs
}

// faultStopOnce asserts the datagrams of a stop during an upgrade: all from
// pid, READY (with MAINPID), RELOADING, then STOPPING=1, which comes once.
// What follows STOPPING=1 is only logged.
func faultStopOnce(t *testing.T, ns *itest.NotifySocket, pid int) {
	t.Helper()
	msgs := faultNotifications(t, ns)
	want := []func(string) bool{
		func(s string) bool { return strings.HasPrefix(s, fmt.Sprintf("MAINPID=%d\nREADY=1\n", pid)) },
		func(s string) bool { return strings.HasPrefix(s, "RELOADING=1\nMONOTONIC_USEC=") },
		func(s string) bool { return s == "STOPPING=1" },
	}
	stops := 0
	for i, m := range msgs {
		if m.PID != pid {
			t.Errorf("datagram %d from pid %d, want only pid %d: %q", i+1, m.PID, pid, m.Text)
		}
		if i < len(want) && !want[i](m.Text) {
			t.Errorf("datagram %d: %q, want READY (MAINPID=%d), RELOADING, STOPPING=1 in this order", i+1, m.Text, pid)
		}
		if strings.Contains(m.Text, "STOPPING=1") {
			stops++
		}
	}
	if len(msgs) < len(want) || stops != 1 {
		t.Errorf("%d datagrams with %d STOPPING=1, want at least READY, RELOADING, STOPPING=1 and exactly one STOPPING=1", len(msgs), stops)
	}
}

// faultConnsOf counts the established connections to port whose server side
// pid holds.
func faultConnsOf(pid, port int) int {
	ts, _ := itest.FDTargets(pid)
	held := map[string]bool{}
	for _, t := range ts {
		if _, target, ok := strings.Cut(t, " -> "); ok {
			held[target] = true
		}
	}
	n := 0
	for _, e := range itest.ReadTCP() {
		if e.LocalPort == port && e.State == itest.TCPEstablished && held[fmt.Sprintf("socket:[%d]", e.Inode)] {
			n++
		}
	}
	return n
}

// ---------------------------------------------------------------------------
// handoff run.

// faultGoodApp saves the example the runner's children run as DIR/good.js,
// for wrappers to require and to put back.
func faultGoodApp(t *testing.T, h *itest.Runner) (path, src string) {
	t.Helper()
	b, err := os.ReadFile(h.App)
	if err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(h.Dir, "good.js")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path, string(b)
}

// faultStartRun starts handoff-v1 run args... in dir with itest.StartCmd; its
// cleanup is itest.KillRun.
func faultStartRun(t *testing.T, dir string, args ...string) *itest.Proc {
	t.Helper()
	cmd := exec.Command(itest.Binary(t, "handoff-v1"), append([]string{"run"}, args...)...)
	cmd.Dir = dir
	cmd.Env = itest.CleanEnv(nil)
	p := itest.StartCmd(t, cmd)
	t.Cleanup(func() { itest.KillRun(t, p, dir) })
	return p
}

// E. handoff run SIGKILLed: its child gets its stop signal (Pdeathsig),
// answers what it holds, drains and exits, releasing the port; a new handoff
// run with the same --pidfile (stale PID file and control socket left
// behind) and address starts, serves, upgrades, and exits 0 at SIGTERM.
func TestFaultRunSupervisorKilled(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{})
	cur := h.ServingChild()
	ins := itest.ListenInodes(h.Port)
	if len(ins) != 1 {
		t.Fatalf("LISTEN sockets on %s: %v, want one", h.Addr, ins)
	}
	inode := ins[0]
	load := itest.StartLoad(t, h.Addr, faultRunRate, faultLoadArgs("0.05", "300ms")...)
	cur, _ = h.Upgrade()
	h.WaitHealthz(cur, 10*time.Second)
	load.StopAndCheck(t) // handoff's death stops the service: the load ends before it
	var slow []*itest.Inflight
	for range 3 {
		slow = append(slow, itest.StartRequest(t, h.Addr, h.Port, "/slow?ms=1500", 30*time.Second))
	}

	if err := syscall.Kill(h.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.Wait(t, 15*time.Second)
	for i, r := range slow {
		if !itest.WaitChan(r.Done, 15*time.Second) {
			t.Errorf("request %d in flight when handoff run was killed did not complete", i)
		} else if r.Err != nil || r.Resp.Status != 200 || r.Resp.PID != cur {
			t.Errorf("request %d in flight when handoff run was killed: %v, want 200 from child %d (it drains)", i, r, cur)
		}
	}
	if !itest.Poll(15*time.Second, func() bool { return !itest.Alive(cur) }) {
		t.Errorf("child %s still alive 15s after handoff run was SIGKILLed", itest.Describe(cur))
	}
	faultPortReleased(t, inode, h.Port)
	for _, f := range []string{h.PIDFile, h.Control} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("precondition: %s was not left behind by the killed handoff run: %v", f, err)
		}
	}

	// A new handoff run on the same address and PID file.
	p := faultStartRun(t, h.Dir, "--listen", h.Addr, "--pidfile", h.PIDFile, "--log-format", "json",
		"--ready-timeout", "10s", "--", "node", h.App)
	p.Logs.Wait(t, 0, "ready", itest.PIDIs(p.PID), 15*time.Second)
	itest.Eventually(t, 10*time.Second, func() bool { q, err := itest.ReadPIDFile(h.PIDFile); return err == nil && q == p.PID },
		"the PID file to name the new handoff run %d", p.PID)
	st := itest.Status(t, h.PIDFile)
	if st.PID != p.PID || st.Phase != "serving" || len(st.Children) != 1 {
		t.Fatalf("status of the new handoff run: %s, want pid %d serving one child", itest.JSON(st), p.PID)
	}
	child := st.Children[0].PID
	if r, err := itest.Get(h.Addr, "/healthz"); err != nil || r.Status != 200 || r.PID != child {
		t.Errorf("GET /healthz from the new handoff run: %+v %v, want 200 from child %d", r, err, child)
	}
	load = itest.StartLoad(t, h.Addr, faultRunRate, faultLoadArgs("0.05", "300ms")...)
	if r := itest.CLI(t, "upgrade", "--pidfile", h.PIDFile, "--wait"); r.Code != 0 {
		t.Errorf("upgrade of the new handoff run: %v", r)
	}
	load.StopAndCheck(t)
	ins = itest.ListenInodes(h.Port)
	if len(ins) != 1 {
		t.Fatalf("LISTEN sockets of the new handoff run on %s: %v, want one", h.Addr, ins)
	}
	if err := syscall.Kill(p.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if st := p.Wait(t, 20*time.Second); st.ExitCode() != 0 {
		t.Errorf("new handoff run: exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	faultPortReleased(t, ins[0], h.Port)
}

// F. handoff run: the serving child dies while an upgrade's new child is not
// ready yet, and that child then fails: it exits, or it is not ready within
// --ready-timeout. handoff must not stay without a serving child: status
// shows one serving within a bounded wait, the load (started after the kill:
// connections wait in handoff's backlog) loses nothing, and a later upgrade
// succeeds.
func TestFaultRunChildDiesDuringUpgrade(t *testing.T) {
	t.Run("new-child-exits", func(t *testing.T) { faultChildDiesDuringUpgrade(t, true) })
	t.Run("new-child-times-out", func(t *testing.T) { faultChildDiesDuringUpgrade(t, false) })
}

func faultChildDiesDuringUpgrade(t *testing.T, exits bool) {
	readyTimeout, verdict := "3s", "timed out before ready"
	if exits {
		readyTimeout, verdict = "30s", "exited before ready: exit status 1"
	}
	h := itest.StartRunner(t, itest.RunnerOpts{ReadyTimeout: readyTimeout})
	cur := h.ServingChild()
	_, good := faultGoodApp(t, h)
	release := filepath.Join(h.Dir, "release")
	const marker = "fault-test: not ready"
	// Never ready; with exits, it exits 1 once the release file exists.
	h.WriteApp(fmt.Sprintf(`const fs = require('node:fs');
console.error(%q);
setInterval(() => { if (%v && fs.existsSync(%q)) { console.error('fault-test: exiting 1'); process.exit(1); } }, 10);
`, marker, exits, release))

	mark := h.Logs.Mark()
	bg := faultStartCLI(t, "upgrade", "--pidfile", h.PIDFile, "--wait")
	var broken int
	h.WaitFor(15*time.Second, func() bool {
		l, _, ok := h.Logs.First(mark, "", func(l itest.Line) bool { return strings.HasSuffix(l.Raw, "] "+marker) })
		if ok {
			fmt.Sscanf(l.Raw, "[pid %d]", &broken)
		}
		return ok
	}, "the upgrade's new child to start")
	if st := h.Status(); st.Phase != "upgrading" || len(st.Children) != 2 {
		t.Errorf("status while the new child starts: %s, want phase upgrading with two children", itest.JSON(st))
	}

	if err := syscall.Kill(cur, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.Logs.Wait(t, mark, "child died while serving: restarting it", itest.NumIs("child_pid", cur), 10*time.Second)
	load := itest.StartLoad(t, h.Addr, faultRunRate, faultLoadArgs("0.05", "300ms")...)
	h.WriteApp(good) // what the restart will run
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r := bg.Wait(t, 90*time.Second)
	t.Logf("%s", r)
	if want := fmt.Sprintf("new process %d %s", broken, verdict); r.Code != 1 || !strings.Contains(r.Stderr, want) {
		t.Errorf("handoff upgrade: exit %d, want 1 with %q\n%v", r.Code, want, r)
	}
	var st control.Status
	h.WaitFor(15*time.Second, func() bool {
		st = h.Status()
		for _, c := range st.Children {
			if c.Phase == "serving" {
				return st.Phase == "serving" || st.Phase == "draining-previous"
			}
		}
		return false
	}, "status to show a serving child after the failed upgrade")
	var restarted int
	for _, c := range st.Children {
		if c.Phase == "serving" {
			restarted = c.PID
		}
	}
	t.Logf("status after the failed upgrade: %s", itest.JSON(st))
	if restarted == cur || restarted == broken {
		t.Errorf("serving child %d, want a new one (killed %d, failed %d)", restarted, cur, broken)
	}
	h.WaitHealthz(restarted, 10*time.Second)
	h.CheckHandoff(t)
	res := load.StopAndCheck(t)
	if ps, ok := itest.PIDStat(res, restarted); !ok || ps.Count == 0 {
		t.Errorf("the restarted child %d answered no load request", restarted)
	}

	// A later upgrade succeeds (an ordinary one, under load in run_test.go).
	next, out := h.Upgrade()
	t.Logf("later upgrade: %s", strings.TrimSpace(out))
	h.WaitHealthz(next, 10*time.Second)
	h.WaitOnlyChild(next, "node", 15*time.Second)
}

// G. handoff run: a new child that serves but never says it is ready, under
// load with 800 ms requests, --ready-timeout 3s (not 1s: the first child,
// a Node.js start, must be ready within it too, and on two busy cores that
// took over 1s). It gets its stop signal and
// drains (exit status 0, no kill): no request fails, the verdict is timeout,
// the old child serves on.
func TestFaultRunNewChildNeverReady(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{ReadyTimeout: "3s", DrainTimeout: "10s"})
	cur := h.ServingChild()
	goodPath, _ := faultGoodApp(t, h)
	h.WriteApp(fmt.Sprintf(`delete process.env.HANDOFF_READY_FD; // serves, never says ready
process.env.APP_VERSION = 'notready';
console.error('fault-test: pid ' + process.pid + ' serving, never ready');
require(%q);
`, goodPath))
	load := itest.StartLoad(t, h.Addr, faultRunRate, faultLoadArgs("0.1", "800ms")...)

	mark := h.Logs.Mark()
	errOut, took := h.UpgradeFails()
	t.Logf("handoff upgrade exit 1 after %v:\n%s", took.Round(time.Millisecond), errOut)
	m := regexp.MustCompile(`new process (\d+) timed out before ready and was told to stop`).FindStringSubmatch(errOut)
	if m == nil || !strings.Contains(errOut, fmt.Sprintf("pid %d keeps serving", h.PID)) {
		t.Fatalf("handoff upgrade stderr lacks \"new process N timed out before ready and was told to stop\" or \"pid %d keeps serving\":\n%s", h.PID, errOut)
	}
	broken, _ := strconv.Atoi(m[1])
	if broken <= 1 || broken == cur {
		t.Fatalf("handoff upgrade names new child %d (serving child %d)", broken, cur)
	}
	if fl := h.Logs.Wait(t, mark, "upgrade failed", itest.PIDIs(h.PID), 10*time.Second); fl.Str("kind") != "timeout" {
		t.Errorf("upgrade failed log: %s, want kind timeout", fl.Raw)
	}
	h.CheckDrained(t, []int{broken})
	h.WaitOnlyChild(cur, "node", 15*time.Second)
	h.WaitHealthz(cur, 5*time.Second)
	h.CheckHandoff(t)
	if st := h.Status(); st.Phase != "serving" || st.LastUpgrade == nil || st.LastUpgrade.Kind != control.KindTimeout {
		t.Errorf("status after the failed upgrade: %s, want phase serving, last_upgrade kind timeout", itest.JSON(st))
	}
	res := load.StopAndCheck(t)
	ps, _ := itest.PIDStat(res, broken)
	t.Logf("the never-ready child %d answered %d load requests", broken, ps.Count)
	if ps.Count == 0 || ps.Version != "notready" {
		t.Errorf("precondition: the never-ready child %d answered no load request (%+v): it never served", broken, ps)
	}
}

// H. handoff run: SIGTERM while the child ignores its stop signal, with
// --drain-timeout 1s. The child is killed at the drain deadline and handoff
// run exits 0 (README: "a drain cut at its deadline" is a clean stop).
func TestFaultRunStopChildIgnoresSignal(t *testing.T) {
	h := itest.StartRunner(t, itest.RunnerOpts{DrainTimeout: "1s"})
	goodPath, _ := faultGoodApp(t, h)
	h.WriteApp(fmt.Sprintf(`const on = process.on;
process.on('SIGTERM', () => console.error('fault-test: pid ' + process.pid + ' ignores SIGTERM'));
process.on = function (ev, fn) { return ev === 'SIGTERM' ? this : on.call(this, ev, fn); };
require(%q);
`, goodPath))
	load := itest.StartLoad(t, h.Addr, faultRunRate, faultLoadArgs("0.05", "300ms")...)
	deaf, _ := h.Upgrade()
	h.WaitHealthz(deaf, 10*time.Second)
	load.StopAndCheck(t) // the stop refuses new connections: the load ends before it
	ins := itest.ListenInodes(h.Port)
	if len(ins) != 1 {
		t.Fatalf("LISTEN sockets on %s: %v, want one", h.Addr, ins)
	}
	cutReq := itest.StartRequest(t, h.Addr, h.Port, "/slow?ms=30000", 40*time.Second)

	mark := h.Logs.Mark()
	start := time.Now()
	if err := syscall.Kill(h.PID, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	st := h.Wait(t, 15*time.Second)
	took := time.Since(start)
	t.Logf("handoff run exited %v after SIGTERM: %v", took.Round(time.Millisecond), st)
	if st.ExitCode() != 0 {
		t.Errorf("handoff run exit status %d after a drain cut at its deadline, want 0 (%v)", st.ExitCode(), st)
	}
	if took < time.Second || took > 10*time.Second {
		t.Errorf("handoff run exited %v after SIGTERM with --drain-timeout 1s, want 1s..10s", took)
	}
	if !h.Logs.Contains(mark, fmt.Sprintf("[pid %d] fault-test: pid %d ignores SIGTERM", deaf, deaf)) {
		t.Errorf("the child %d never logged that it ignored SIGTERM", deaf)
	}
	if _, _, ok := h.Logs.First(mark, "child still running at the drain deadline: killing its process group", itest.NumIs("child_pid", deaf)); !ok {
		t.Errorf("no log line of the kill at the drain deadline for child %d", deaf)
	}
	if !itest.WaitChan(cutReq.Done, 10*time.Second) {
		t.Errorf("the 30s request's connection is still open after handoff run exited")
	}
	if itest.Alive(deaf) {
		t.Errorf("child %s still alive after handoff run exited", itest.Describe(deaf))
	}
	faultPortReleased(t, ins[0], h.Port)
	for _, f := range []string{h.PIDFile, h.Control} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("%s after SIGTERM: stat error %v, want it removed", f, err)
		}
	}
}
