package itest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// ServerOpts configure [StartServer]. The zero value runs
// DIR/handoff serve --listen 127.0.0.1:0 with the test's environment.
type ServerOpts struct {
	Dir            string   // where the live binary, PID file and control socket go; default tb.TempDir()
	Listen         string   // --listen; default 127.0.0.1:0
	UpgradeTimeout string   // --upgrade-timeout; default 3s
	DrainTimeout   string   // --drain-timeout; default 10s
	Args           []string // more serve flags
	ExtraFiles     []*os.File
	Wrap           []string // run Wrap... LIVE serve ...; the wrapper must exec (keep the PID)
	// CleanEnv runs the server with CleanEnv(Env): the test's environment
	// without systemd's variables, plus Env. Without it the server inherits
	// the test's environment as is.
	CleanEnv bool
	Env      []string
}

// Server is `handoff serve` under test. Its first generation is Proc, the
// leader of the process group that every later generation is in too; they
// all share its stdout and stderr, so Logs (Proc.Logs) has every one's
// output. The live generation is the one the PID file names ([Server.LivePID]).
type Server struct {
	Proc    *Proc
	Logs    *Logs
	Dir     string
	Live    string // DIR/handoff, the path exec'd on every upgrade
	PIDFile string // DIR/handoff.pid; the control socket is PIDFile+".sock"
	Addr    string // 127.0.0.1:PORT from the "listening" log line
	Port    int
	Inode   uint64 // the listening socket's inode
	Version string // version of the current generation

	tb testing.TB
}

// StartServer copies handoff-v1 to DIR/handoff and runs [Wrap...]
// DIR/handoff serve --listen L --pidfile DIR/handoff.pid --log-format json ...
// with [StartCmd]. It blocks until the first generation serves: it logged
// listening and ready, the PID file names it, GET /healthz answers from it,
// and it holds the one LISTEN socket of its port.
func StartServer(tb testing.TB, o ServerOpts) *Server {
	tb.Helper()
	if o.Dir == "" {
		o.Dir = tb.TempDir()
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	if o.UpgradeTimeout == "" {
		o.UpgradeTimeout = "3s"
	}
	if o.DrainTimeout == "" {
		o.DrainTimeout = "10s"
	}
	s := &Server{
		tb:      tb,
		Dir:     o.Dir,
		Live:    filepath.Join(o.Dir, "handoff"),
		PIDFile: filepath.Join(o.Dir, "handoff.pid"),
		Version: "v1",
	}
	CopyFile(tb, Binary(tb, "handoff-v1"), s.Live, 0o755)

	args := append([]string{s.Live, "serve",
		"--listen", o.Listen,
		"--pidfile", s.PIDFile,
		"--log-format", "json",
		"--upgrade-timeout", o.UpgradeTimeout,
		"--drain-timeout", o.DrainTimeout}, o.Args...)
	args = append(append([]string(nil), o.Wrap...), args...)
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = o.Dir
	if o.CleanEnv {
		cmd.Env = CleanEnv(o.Env)
	}
	cmd.ExtraFiles = o.ExtraFiles
	s.Proc = StartCmd(tb, cmd)
	s.Logs = s.Proc.Logs

	first := s.Proc.PID
	l := s.Logs.Wait(tb, 0, "listening", PIDIs(first), 15*time.Second)
	s.Addr = l.Str("addr")
	host, portStr, err := net.SplitHostPort(s.Addr)
	if err != nil || host != "127.0.0.1" {
		tb.Fatalf("listening log line has addr %q, want 127.0.0.1:PORT: %s", s.Addr, l.Raw)
	}
	s.Port, _ = strconv.Atoi(portStr)
	if s.Port == 0 {
		tb.Fatalf("listening log line has port 0: %s", l.Raw)
	}
	s.Logs.Wait(tb, 0, "ready", PIDIs(first), 15*time.Second)
	Eventually(tb, 10*time.Second, func() bool { p, err := s.ReadPID(); return err == nil && p == first },
		"PID file %s to name the first process %d", s.PIDFile, first)
	s.WaitServing(first, "v1", 10*time.Second)
	ins := ListenInodes(s.Port)
	if len(ins) != 1 {
		tb.Fatalf("LISTEN sockets on 127.0.0.1:%d in /proc/net/tcp: %v, want exactly one", s.Port, ins)
	}
	s.Inode = ins[0]
	if !HasSocketInode(first, s.Inode) {
		tb.Fatalf("first process %d has no descriptor for the listening socket inode %d", first, s.Inode)
	}
	return s
}

// ReadPID returns the PID that the PID file names (see [ReadPIDFile]).
func (s *Server) ReadPID() (int, error) { return ReadPIDFile(s.PIDFile) }

// LivePID returns the PID that the PID file names, failing the test when
// there is none.
func (s *Server) LivePID() int {
	s.tb.Helper()
	return ReadPID(s.tb, s.PIDFile)
}

// Procs returns the live processes of the server's process group.
func (s *Server) Procs() []int { return GroupProcs(s.Proc.PID) }

// DeployFile copies src to DIR/handoff.new with mode and renames it over DIR/handoff.
func (s *Server) DeployFile(src string, mode os.FileMode) {
	s.tb.Helper()
	tmp := s.Live + ".new"
	CopyFile(s.tb, src, tmp, mode)
	if err := os.Rename(tmp, s.Live); err != nil {
		s.tb.Fatal(err)
	}
}

// Deploy installs handoff-VERSION as DIR/handoff.
func (s *Server) Deploy(version string) {
	s.tb.Helper()
	s.DeployFile(Binary(s.tb, "handoff-"+version), 0o755)
}

// Signal sends sig to pid, which must be above 1.
func (s *Server) Signal(pid int, sig syscall.Signal) {
	s.tb.Helper()
	if pid <= 1 {
		s.tb.Fatalf("refusing to send %v to pid %d", sig, pid)
	}
	if err := syscall.Kill(pid, sig); err != nil {
		s.tb.Fatalf("kill(%d, %v): %v", pid, sig, err)
	}
}

// WaitServing waits until GET /healthz on a fresh connection answers 200 "ok"
// from pid with version.
func (s *Server) WaitServing(pid int, version string, timeout time.Duration) {
	s.tb.Helper()
	var last string
	if !Poll(timeout, func() bool {
		r, err := Get(s.Addr, "/healthz")
		if err != nil {
			last = err.Error()
			return false
		}
		last = fmt.Sprintf("status %d pid %d version %q body %q", r.Status, r.PID, r.Version, r.Body)
		return r.Status == 200 && r.PID == pid && r.Version == version && r.Body == "ok"
	}) {
		s.tb.Fatalf("GET /healthz never answered from pid %d version %s within %v; last answer: %s", pid, version, timeout, last)
	}
}

// WaitNewPID waits until the PID file names a live process other than old,
// and returns it.
func (s *Server) WaitNewPID(old int, timeout time.Duration) int {
	s.tb.Helper()
	var p int
	Eventually(s.tb, timeout, func() bool {
		var err error
		p, err = s.ReadPID()
		return err == nil && p != old && Alive(p)
	}, "PID file to name a live process other than %d", old)
	return p
}

// WaitGone waits until pid has exited. It sleeps on a pidfd until the process
// exits, where it can, rather than reading /proc every PollEvery: a
// benchmark's windows then see no CPU of it.
func (s *Server) WaitGone(pid int, timeout time.Duration) {
	s.tb.Helper()
	deadline := time.Now().Add(timeout)
	waitExit(pid, deadline)
	Eventually(s.tb, max(time.Until(deadline), PollEvery), func() bool { return !Alive(pid) }, "old generation %d to exit", pid)
}

// Upgrade deploys version, HUPs the PID-file PID, waits for the new
// generation to be in the PID file and to serve /healthz with its pid and
// version, and then (oldGone at most) for the old one to be gone. It returns
// both PIDs.
func (s *Server) Upgrade(version string, oldGone time.Duration) (oldPID, newPID int) {
	s.tb.Helper()
	oldPID = s.LivePID()
	s.Deploy(version)
	s.Signal(oldPID, syscall.SIGHUP)
	newPID = s.WaitNewPID(oldPID, 20*time.Second)
	s.WaitServing(newPID, version, 10*time.Second)
	s.WaitGone(oldPID, oldGone)
	s.Version = version
	return oldPID, newPID
}

// CheckListener asserts that 127.0.0.1:PORT still has exactly one LISTEN
// socket, the one the first generation bound, and that pid holds it.
func (s *Server) CheckListener(t testing.TB, pid int) {
	t.Helper()
	if ins := ListenInodes(s.Port); len(ins) != 1 || ins[0] != s.Inode {
		t.Errorf("LISTEN sockets on 127.0.0.1:%d: inodes %v, want exactly the original [%d]", s.Port, ins, s.Inode)
	}
	if !HasSocketInode(pid, s.Inode) {
		ts, _ := FDTargets(pid)
		t.Errorf("pid %d holds no descriptor for the listening socket inode %d; its fds: %v", pid, s.Inode, ts)
	}
}

// CheckOneProcess asserts that exactly one process, pid, is left in the
// server's process group (10s at most).
func (s *Server) CheckOneProcess(t testing.TB, pid int) {
	t.Helper()
	if !Poll(10*time.Second, func() bool { ps := s.Procs(); return len(ps) == 1 && ps[0] == pid }) {
		t.Errorf("live processes in the server's group: %v, want exactly [%d]", s.Procs(), pid)
	}
}

// WaitSlowThenSettled is the end of a queued upgrade p1 -> p2 -> p3: slow, a
// request that p1 was serving, must complete (15s) with 200 from p1; then p2
// must exit (15s), leaving p3 the only process, holding the listener.
func (s *Server) WaitSlowThenSettled(t testing.TB, slow *Inflight, p1, p2, p3 int) {
	t.Helper()
	if !WaitChan(slow.Done, 15*time.Second) {
		t.Fatalf("slow request did not complete")
	}
	if slow.Err != nil || slow.Resp.Status != 200 || slow.Resp.PID != p1 {
		t.Errorf("slow request: %v, want 200 from pid %d", slow, p1)
	}
	s.WaitGone(p2, 15*time.Second)
	s.CheckOneProcess(t, p3)
	s.CheckListener(t, p3)
}

// KillInGroup SIGKILLs pid after checking that it belongs to the server's
// process group and is none of the server generations given.
func (s *Server) KillInGroup(t testing.TB, pid int, generations ...int) {
	t.Helper()
	KillInGroup(t, s.Proc.PID, pid, generations...)
}

// CopyFile copies src to dst with mode (whatever the umask).
func CopyFile(tb testing.TB, src, dst string, mode os.FileMode) {
	tb.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		tb.Fatal(err)
	}
	if err := os.Chmod(dst, mode); err != nil { // WriteFile's mode is subject to umask
		tb.Fatal(err)
	}
}
