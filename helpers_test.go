package main_test

// Helpers shared by the integration tests (integration_test.go) and the
// benchmark (bench_test.go). Everything here drives the real handoff binary:
// it is built once per test process, started in its own process group, and
// observed from the outside only (logs on stderr, the PID file, /proc, HTTP).

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/loadgen"
)

// versions are the good builds; upgrades cycle through them so that every
// upgrade changes the version.
var versions = []string{"v1", "v2", "v3", "v4"}

// nextVersion returns the version after v in the cycle v1 -> v2 -> v3 -> v4 -> v1.
func nextVersion(v string) string {
	for i, x := range versions {
		if x == v {
			return versions[(i+1)%len(versions)]
		}
	}
	return versions[0]
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// bins builds, once per test process and concurrently, handoff-v1..v4 (with
// -X main.version=vN) and the broken programs under testdata/ (exit1, hang),
// and returns the directory that holds them.
func bins(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() {
		buildDir, buildErr = os.MkdirTemp("", "handoff-bins-")
		if buildErr != nil {
			return
		}
		type job struct {
			out  string
			args []string
		}
		var jobs []job
		for _, v := range versions {
			jobs = append(jobs, job{"handoff-" + v, []string{"-ldflags", "-X main.version=" + v, "."}})
		}
		jobs = append(jobs, job{"exit1", []string{"./testdata/exit1"}}, job{"hang", []string{"./testdata/hang"}})
		errs := make([]error, len(jobs))
		var wg sync.WaitGroup
		for i, j := range jobs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
				defer cancel()
				args := append([]string{"build", "-o", filepath.Join(buildDir, j.out)}, j.args...)
				out, err := exec.CommandContext(ctx, "go", args...).CombinedOutput()
				if err != nil {
					errs[i] = fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
				}
			}()
		}
		wg.Wait()
		buildErr = errors.Join(errs...)
	})
	if buildErr != nil {
		tb.Fatalf("building test binaries: %v", buildErr)
	}
	return buildDir
}

// ---------------------------------------------------------------------------
// Polling.

const pollEvery = 5 * time.Millisecond

// poll calls cond until it returns true or timeout elapses; it reports
// whether cond became true. Waiting between attempts uses a ticker.
func poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(pollEvery)
	defer tick.Stop()
	for {
		if cond() {
			return true
		}
		select {
		case <-deadline.C:
			return cond()
		case <-tick.C:
		}
	}
}

// eventually fails the test (from the test goroutine) when cond does not
// become true within timeout.
func eventually(tb testing.TB, timeout time.Duration, cond func() bool, format string, args ...any) {
	tb.Helper()
	if !poll(timeout, cond) {
		tb.Fatalf("timed out after %v waiting for: %s", timeout, fmt.Sprintf(format, args...))
	}
}

// waitChan waits for ch to be closed (or to deliver) within timeout.
func waitChan[T any](ch <-chan T, timeout time.Duration) bool {
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-ch:
		return true
	case <-t.C:
		return false
	}
}

// ---------------------------------------------------------------------------
// Logs.

// logLine is one line the server wrote on stdout or stderr. JSON lines are
// decoded into fields; other lines (a broken binary's message, a panic) keep
// only raw.
type logLine struct {
	stream string
	raw    string
	fields map[string]any
}

func (l logLine) msg() string { return l.str("msg") }

func (l logLine) str(key string) string {
	switch v := l.fields[key].(type) {
	case string:
		return v
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}

// num returns a numeric field (JSON numbers, or numeric strings); ok is
// false when the field is missing or not a number.
func (l logLine) num(key string) (int64, bool) {
	switch v := l.fields[key].(type) {
	case float64:
		return int64(v), true
	case string:
		n, err := strconv.ParseInt(v, 10, 64)
		return n, err == nil
	}
	return 0, false
}

func (l logLine) pid() int {
	n, _ := l.num("pid")
	return int(n)
}

// logStore collects the server's output. A goroutine per stream copies
// lines into it until EOF, that is until every generation (they all share
// the first one's stdout and stderr) has exited.
type logStore struct {
	mu    sync.Mutex
	lines []logLine
	open  int
	done  chan struct{}
}

func newLogStore(streams int) *logStore {
	return &logStore{open: streams, done: make(chan struct{})}
}

func (s *logStore) consume(r io.ReadCloser, stream string) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := logLine{stream: stream, raw: sc.Text()}
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			line.fields = m
		}
		s.mu.Lock()
		s.lines = append(s.lines, line)
		s.mu.Unlock()
	}
	// Keep draining (a line too long for the scanner) so that writers never block.
	_, _ = io.Copy(io.Discard, r)
	s.mu.Lock()
	s.open--
	if s.open == 0 {
		close(s.done)
	}
	s.mu.Unlock()
}

// mark returns the index of the next line to arrive; pass it as from to
// only consider later lines.
func (s *logStore) mark() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lines)
}

// find returns the lines from index from on whose msg is msg (any msg when
// empty) and that satisfy pred (when non-nil), with their indexes.
func (s *logStore) find(from int, msg string, pred func(logLine) bool) ([]logLine, []int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []logLine
	var idx []int
	for i := from; i < len(s.lines); i++ {
		l := s.lines[i]
		if msg != "" && l.msg() != msg {
			continue
		}
		if pred != nil && !pred(l) {
			continue
		}
		out = append(out, l)
		idx = append(idx, i)
	}
	return out, idx
}

func (s *logStore) first(from int, msg string, pred func(logLine) bool) (logLine, int, bool) {
	ls, idx := s.find(from, msg, pred)
	if len(ls) == 0 {
		return logLine{}, -1, false
	}
	return ls[0], idx[0], true
}

// waitLog waits for a line (from index from on) with msg that satisfies pred.
func (s *logStore) waitLog(tb testing.TB, from int, msg string, pred func(logLine) bool, timeout time.Duration) logLine {
	tb.Helper()
	var got logLine
	eventually(tb, timeout, func() bool {
		l, _, ok := s.first(from, msg, pred)
		got = l
		return ok
	}, "log line msg=%q", msg)
	return got
}

// contains reports whether a raw line from index from on contains sub.
func (s *logStore) contains(from int, sub string) bool {
	_, _, ok := s.first(from, "", func(l logLine) bool { return strings.Contains(l.raw, sub) })
	return ok
}

// tail returns the last n lines as text.
func (s *logStore) tail(n int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	start := 0
	if len(s.lines) > n {
		start = len(s.lines) - n
	}
	var b strings.Builder
	if start > 0 {
		fmt.Fprintf(&b, "... (%d earlier lines)\n", start)
	}
	for _, l := range s.lines[start:] {
		b.WriteString(l.stream)
		b.WriteString(": ")
		b.WriteString(l.raw)
		b.WriteByte('\n')
	}
	return b.String()
}

func pidIs(pid int) func(logLine) bool {
	return func(l logLine) bool { return l.pid() == pid }
}

// ---------------------------------------------------------------------------
// /proc.

type procStat struct {
	pid, ppid, pgrp int
	state           byte
}

func readStat(pid int) (procStat, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, false
	}
	// comm may contain spaces and parentheses: the fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return procStat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	pgrp, _ := strconv.Atoi(f[2])
	return procStat{pid: pid, ppid: ppid, pgrp: pgrp, state: f[0][0]}, true
}

// alive reports whether pid exists and is not a zombie (a generation that
// has exited but was not reaped yet counts as gone).
func alive(pid int) bool {
	st, ok := readStat(pid)
	return ok && st.state != 'Z' && st.state != 'X'
}

// isProcess reports whether pid is a process (a thread group's leader), not
// one of its threads: a scan of /proc can, for a moment, meet a thread that is
// being created, with its process's group.
func isProcess(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			return strings.TrimSpace(v) == strconv.Itoa(pid)
		}
	}
	return false
}

// describe names a process for a failure message: its stat line and command.
func describe(pid int) string {
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return fmt.Sprintf("%d [%s] %q", pid, strings.TrimSpace(string(stat)), strings.ReplaceAll(string(cmd), "\x00", " "))
}

// procs returns the processes in /proc for which keep returns true, in
// directory order.
func procs(keep func(procStat) bool) []procStat {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []procStat
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ok := readStat(pid); ok && keep(st) && isProcess(pid) {
			out = append(out, st)
		}
	}
	return out
}

// groupProcs returns the live (non-zombie) processes of process group pgid.
func groupProcs(pgid int) []int {
	var out []int
	for _, st := range procs(func(st procStat) bool { return st.pgrp == pgid && st.state != 'Z' && st.state != 'X' }) {
		out = append(out, st.pid)
	}
	return out
}

// fdTargets returns the targets of /proc/PID/fd/* (e.g. "socket:[123]").
func fdTargets(pid int) ([]string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed while reading
		}
		out = append(out, e.Name()+" -> "+target)
	}
	return out, nil
}

func hasSocketInode(pid int, inode uint64) bool {
	ts, _ := fdTargets(pid)
	want := fmt.Sprintf("socket:[%d]", inode)
	for _, t := range ts {
		if strings.HasSuffix(t, " -> "+want) {
			return true
		}
	}
	return false
}

// vmHWM returns the peak resident set size of pid in KiB.
func vmHWM(pid int) (int64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, err := strconv.ParseInt(f[0], 10, 64)
				return n, err == nil
			}
		}
	}
	return 0, false
}

// TCP states in /proc/net/tcp.
const (
	tcpEstablished = 0x01
	tcpSynRecv     = 0x03
	tcpCloseWait   = 0x08
	tcpListen      = 0x0A
)

type tcpEntry struct {
	localPort, remPort int
	localIP            string // hex, as in /proc/net/tcp
	state              int
	txQueue, rxQueue   int64
	inode              uint64
}

func readTCP() []tcpEntry {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil
	}
	var out []tcpEntry
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		lip, lport, ok1 := strings.Cut(f[1], ":")
		_, rport, ok2 := strings.Cut(f[2], ":")
		tx, rx, ok3 := strings.Cut(f[4], ":")
		if !ok1 || !ok2 || !ok3 {
			continue
		}
		var e tcpEntry
		lp, _ := strconv.ParseInt(lport, 16, 32)
		rp, _ := strconv.ParseInt(rport, 16, 32)
		st, _ := strconv.ParseInt(f[3], 16, 32)
		e.localIP, e.localPort, e.remPort, e.state = lip, int(lp), int(rp), int(st)
		e.txQueue, _ = strconv.ParseInt(tx, 16, 64)
		e.rxQueue, _ = strconv.ParseInt(rx, 16, 64)
		e.inode, _ = strconv.ParseUint(f[9], 10, 64)
		out = append(out, e)
	}
	return out
}

// listenInodes returns the inodes of the LISTEN sockets bound to 127.0.0.1:port.
func listenInodes(port int) []uint64 {
	var out []uint64
	for _, e := range readTCP() {
		if e.state == tcpListen && e.localPort == port && e.localIP == "0100007F" {
			out = append(out, e.inode)
		}
	}
	return out
}

// serverConns counts the server-side sockets of port that may hold a
// descriptor in the server (being accepted, established, or half closed by
// the client).
func serverConns(port int) int {
	n := 0
	for _, e := range readTCP() {
		if e.localPort == port && (e.state == tcpEstablished || e.state == tcpSynRecv || e.state == tcpCloseWait) {
			n++
		}
	}
	return n
}

// ---------------------------------------------------------------------------
// The server under test.

// serverOpts configure startServer. The zero value runs
// DIR/handoff serve --listen 127.0.0.1:0 with the test's environment.
type serverOpts struct {
	dir            string   // where the live binary, PID file and control socket go; default tb.TempDir()
	listen         string   // default 127.0.0.1:0
	upgradeTimeout string   // default 3s
	drainTimeout   string   // default 10s
	args           []string // more serve flags
	extraFiles     []*os.File
	wrap           []string // run wrap... LIVE serve ...; the wrapper must exec (keep the PID)
	// cleanEnv runs the server with ctlEnv(env): the test's environment
	// without systemd's variables (NOTIFY_SOCKET, LISTEN_*), plus env.
	// Without it the server inherits the test's environment as is.
	cleanEnv bool
	env      []string
}

type server struct {
	tb      testing.TB
	bins    string
	dir     string
	live    string // DIR/handoff, the path that is exec'd on every upgrade
	pidfile string
	cmd     *exec.Cmd
	pgid    int
	logs    *logStore
	addr    string // 127.0.0.1:PORT from the "listening" log line
	port    int
	inode   uint64 // the listening socket's inode
	exited  chan struct{}
	version string // version of the current generation
}

// startServer copies handoff-v1 to DIR/handoff and runs [wrap...]
// DIR/handoff serve --listen L --pidfile DIR/handoff.pid --log-format json ...
// in its own process group; it returns once the first generation serves.
// Cleanup kills the whole group and waits for it, and dumps the server's
// output when the test failed.
func startServer(tb testing.TB, o serverOpts) *server {
	tb.Helper()
	if o.dir == "" {
		o.dir = tb.TempDir()
	}
	if o.listen == "" {
		o.listen = "127.0.0.1:0"
	}
	if o.upgradeTimeout == "" {
		o.upgradeTimeout = "3s"
	}
	if o.drainTimeout == "" {
		o.drainTimeout = "10s"
	}
	b := bins(tb)
	s := &server{
		tb:      tb,
		bins:    b,
		dir:     o.dir,
		live:    filepath.Join(o.dir, "handoff"),
		pidfile: filepath.Join(o.dir, "handoff.pid"),
		version: "v1",
	}
	copyFile(tb, filepath.Join(b, "handoff-v1"), s.live, 0o755)

	args := append([]string{s.live, "serve",
		"--listen", o.listen,
		"--pidfile", s.pidfile,
		"--log-format", "json",
		"--upgrade-timeout", o.upgradeTimeout,
		"--drain-timeout", o.drainTimeout}, o.args...)
	args = append(append([]string(nil), o.wrap...), args...)
	s.cmd = exec.Command(args[0], args[1:]...)
	s.cmd.Dir = o.dir
	if o.cleanEnv {
		s.cmd.Env = ctlEnv(o.env)
	}
	s.cmd.ExtraFiles = o.extraFiles
	s.logs, s.exited = startPiped(tb, s.cmd, fmt.Sprintf("server output (%s)", s.dir), 400)
	s.pgid = s.cmd.Process.Pid
	tb.Cleanup(s.kill)

	first := s.cmd.Process.Pid
	l := s.logs.waitLog(tb, 0, "listening", pidIs(first), 15*time.Second)
	s.addr = l.str("addr")
	host, portStr, err := net.SplitHostPort(s.addr)
	if err != nil || host != "127.0.0.1" {
		tb.Fatalf("listening log line has addr %q, want 127.0.0.1:PORT: %s", s.addr, l.raw)
	}
	s.port, _ = strconv.Atoi(portStr)
	if s.port == 0 {
		tb.Fatalf("listening log line has port 0: %s", l.raw)
	}
	s.logs.waitLog(tb, 0, "ready", pidIs(first), 15*time.Second)
	eventually(tb, 10*time.Second, func() bool { p, err := s.readPID(); return err == nil && p == first },
		"PID file %s to name the first process %d", s.pidfile, first)
	s.waitServing(first, "v1", 10*time.Second)
	ins := listenInodes(s.port)
	if len(ins) != 1 {
		tb.Fatalf("LISTEN sockets on 127.0.0.1:%d in /proc/net/tcp: %v, want exactly one", s.port, ins)
	}
	s.inode = ins[0]
	if !hasSocketInode(first, s.inode) {
		tb.Fatalf("first process %d has no descriptor for the listening socket inode %d", first, s.inode)
	}
	return s
}

// kill SIGKILLs the whole process group and waits until nothing of it is left.
func (s *server) kill() {
	_ = syscall.Kill(-s.pgid, syscall.SIGKILL)
	waitGroupGone(s.tb, s.pgid, s.exited, s.logs, "first server process")
}

// exitCode returns the first generation's exit code once it has exited, or
// -1 when it was killed by a signal.
func (s *server) exitCode() int {
	<-s.exited
	return s.cmd.ProcessState.ExitCode()
}

func (s *server) readPID() (int, error) {
	b, err := os.ReadFile(s.pidfile)
	if err != nil {
		return 0, err
	}
	p, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && p <= 1 {
		// Never let a bad PID file make us signal pid 0 (our own group) or init.
		return 0, fmt.Errorf("PID file %s names pid %d", s.pidfile, p)
	}
	return p, err
}

// pid returns the PID named by the PID file, failing the test when there is none.
func (s *server) pid() int {
	s.tb.Helper()
	p, err := s.readPID()
	if err != nil {
		s.tb.Fatalf("reading PID file: %v", err)
	}
	return p
}

func (s *server) procs() []int { return groupProcs(s.pgid) }

// deployFile copies src to DIR/handoff.new with mode and renames it over DIR/handoff.
func (s *server) deployFile(src string, mode os.FileMode) {
	s.tb.Helper()
	tmp := s.live + ".new"
	copyFile(s.tb, src, tmp, mode)
	if err := os.Rename(tmp, s.live); err != nil {
		s.tb.Fatal(err)
	}
}

func (s *server) deploy(version string) {
	s.tb.Helper()
	s.deployFile(filepath.Join(s.bins, "handoff-"+version), 0o755)
}

func (s *server) signal(pid int, sig syscall.Signal) {
	s.tb.Helper()
	if pid <= 1 {
		s.tb.Fatalf("refusing to send %v to pid %d", sig, pid)
	}
	if err := syscall.Kill(pid, sig); err != nil {
		s.tb.Fatalf("kill(%d, %v): %v", pid, sig, err)
	}
}

// waitServing waits until GET /healthz on a fresh connection answers 200 "ok"
// from pid with version.
func (s *server) waitServing(pid int, version string, timeout time.Duration) {
	s.tb.Helper()
	var last string
	if !poll(timeout, func() bool {
		r, err := get(s.addr, "/healthz")
		if err != nil {
			last = err.Error()
			return false
		}
		last = fmt.Sprintf("status %d pid %d version %q body %q", r.status, r.pid, r.version, r.body)
		return r.status == 200 && r.pid == pid && r.version == version && r.body == "ok"
	}) {
		s.tb.Fatalf("GET /healthz never answered from pid %d version %s within %v; last answer: %s", pid, version, timeout, last)
	}
}

// waitNewPID waits until the PID file names a live process other than old.
func (s *server) waitNewPID(old int, timeout time.Duration) int {
	s.tb.Helper()
	var p int
	eventually(s.tb, timeout, func() bool {
		var err error
		p, err = s.readPID()
		return err == nil && p != old && alive(p)
	}, "PID file to name a live process other than %d", old)
	return p
}

func (s *server) waitGone(pid int, timeout time.Duration) {
	s.tb.Helper()
	eventually(s.tb, timeout, func() bool { return !alive(pid) }, "old generation %d to exit", pid)
}

// upgrade renames version in, HUPs the PID-file PID, waits for the new
// generation to be in the PID file and to serve /healthz with its pid and
// version, and then for the old one to be gone. It returns both PIDs.
func (s *server) upgrade(version string, oldGone time.Duration) (oldPID, newPID int) {
	s.tb.Helper()
	oldPID = s.pid()
	s.deploy(version)
	s.signal(oldPID, syscall.SIGHUP)
	newPID = s.waitNewPID(oldPID, 20*time.Second)
	s.waitServing(newPID, version, 10*time.Second)
	s.waitGone(oldPID, oldGone)
	s.version = version
	return oldPID, newPID
}

func copyFile(tb testing.TB, src, dst string, mode os.FileMode) {
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

// startPiped starts cmd in its own process group, its stdout and stderr
// going to pipes of our own (not cmd.StdoutPipe: every process it starts
// inherits the write ends, and reading must go on after cmd exits) that a
// new logStore reads until every writer has exited. exited is closed once
// cmd was reaped (its status is then in cmd.ProcessState). The cleanup it
// registers first, so that it runs last, after the group was killed, logs
// the last tail lines of output under title when the test failed. A failed
// start fails the test.
func startPiped(tb testing.TB, cmd *exec.Cmd, title string, tail int) (logs *logStore, exited chan struct{}) {
	tb.Helper()
	rOut, wOut, err := os.Pipe()
	if err != nil {
		tb.Fatal(err)
	}
	rErr, wErr, err := os.Pipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stdout = wOut
	cmd.Stderr = wErr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	logs, exited = newLogStore(2), make(chan struct{})
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("%s:\n%s", title, logs.tail(tail))
		}
	})
	err = cmd.Start()
	wOut.Close()
	wErr.Close()
	if err != nil {
		rOut.Close()
		rErr.Close()
		tb.Fatalf("start %v: %v", cmd.Args, err)
	}
	go logs.consume(rOut, "stdout")
	go logs.consume(rErr, "stderr")
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	return logs, exited
}

// waitGroupGone waits, once process group pgid was SIGKILLed, for its leader
// who (reaped when exited is closed), every process of the group and the
// writers of logs to be gone, 10s each.
func waitGroupGone(tb testing.TB, pgid int, exited <-chan struct{}, logs *logStore, who string) {
	tb.Helper()
	if !waitChan(exited, 10*time.Second) {
		tb.Errorf("%s %d not reaped 10s after SIGKILL", who, pgid)
	}
	if !poll(10*time.Second, func() bool { return len(groupProcs(pgid)) == 0 }) {
		tb.Errorf("processes of group %d still alive 10s after SIGKILL: %v", pgid, groupProcs(pgid))
	}
	if !waitChan(logs.done, 10*time.Second) {
		tb.Errorf("output pipes of group %d not closed 10s after SIGKILL", pgid)
	}
}

// ---------------------------------------------------------------------------
// HTTP.

var httpClient = &http.Client{
	Timeout:   10 * time.Second,
	Transport: &http.Transport{DisableKeepAlives: true},
}

type response struct {
	status  int
	pid     int
	version string
	body    string
}

// get does GET http://addr+path on a fresh connection.
func get(addr, path string) (response, error) {
	resp, err := httpClient.Get("http://" + addr + path)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, err
	}
	return toResponse(resp, body), nil
}

func toResponse(resp *http.Response, body []byte) response {
	pid, _ := strconv.Atoi(resp.Header.Get("Handoff-Pid"))
	return response{status: resp.StatusCode, pid: pid, version: resp.Header.Get("Handoff-Version"), body: string(body)}
}

// inflight is a request started by startRequest.
type inflight struct {
	done chan struct{}
	resp response
	err  error
}

func (r *inflight) String() string {
	if r.err != nil {
		return "error: " + r.err.Error()
	}
	return fmt.Sprintf("status %d pid %d version %q body %q", r.resp.status, r.resp.pid, r.resp.version, r.resp.body)
}

// startRequest sends GET path on a new connection and returns once the
// server has read the request (the server side of the connection has an
// empty receive queue in /proc/net/tcp), so it is surely being handled by
// the process that accepted it. The response is collected in the background.
func startRequest(tb testing.TB, addr string, serverPort int, path string, timeout time.Duration) *inflight {
	tb.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		tb.Fatalf("dial %s: %v", addr, err)
	}
	tb.Cleanup(func() { conn.Close() })
	clientPort := conn.LocalAddr().(*net.TCPAddr).Port
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		tb.Fatal(err)
	}
	req := "GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nConnection: close\r\n\r\n"
	if _, err := io.WriteString(conn, req); err != nil {
		tb.Fatalf("write request: %v", err)
	}
	eventually(tb, 10*time.Second, func() bool {
		for _, e := range readTCP() {
			if e.localPort == serverPort && e.remPort == clientPort && e.state == tcpEstablished {
				return e.rxQueue == 0
			}
		}
		return false
	}, "the server to read the request %s (client port %d)", path, clientPort)
	r := &inflight{done: make(chan struct{})}
	go func() {
		defer close(r.done)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			r.err = err
			return
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			r.err = err
			return
		}
		r.resp = toResponse(resp, body)
	}()
	return r
}

// ---------------------------------------------------------------------------
// The load tool, run as a separate process (handoff-v1 load ...).

type loadProc struct {
	tb      testing.TB
	cmd     *exec.Cmd
	stdout  bytes.Buffer
	stderr  bytes.Buffer
	rate    int
	started time.Time
	exited  chan struct{}
}

// startLoad runs DIR/handoff-v1 load --target addr --rate rate --duration 120s
// --json plus extra, in its own process group, and returns once it holds
// connections to the server at addr (waitFlowing).
func startLoad(tb testing.TB, binDir, addr string, rate int, extra ...string) *loadProc {
	tb.Helper()
	args := append([]string{"load", "--target", addr, "--rate", strconv.Itoa(rate), "--duration", "120s", "--json"}, extra...)
	l := &loadProc{tb: tb, rate: rate, exited: make(chan struct{})}
	l.cmd = exec.Command(filepath.Join(binDir, "handoff-v1"), args...)
	l.cmd.Stdout = &l.stdout
	l.cmd.Stderr = &l.stderr
	l.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	l.cmd.WaitDelay = 5 * time.Second
	if err := l.cmd.Start(); err != nil {
		tb.Fatalf("start load tool: %v", err)
	}
	l.started = time.Now()
	go func() {
		_ = l.cmd.Wait()
		close(l.exited)
	}()
	pid := l.cmd.Process.Pid
	tb.Cleanup(func() {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if !waitChan(l.exited, 10*time.Second) {
			tb.Errorf("load tool %d not reaped 10s after SIGKILL", pid)
		}
	})
	_, portStr, err := net.SplitHostPort(addr)
	port, _ := strconv.Atoi(portStr)
	if err != nil || port == 0 {
		tb.Fatalf("load target %q has no port", addr)
	}
	l.waitFlowing(port)
	return l
}

// waitFlowing waits until the load tool holds connections to the server;
// the request floor of checkLoad counts from then.
func (l *loadProc) waitFlowing(port int) {
	l.tb.Helper()
	eventually(l.tb, 10*time.Second, func() bool { return serverConns(port) > 0 },
		"load tool connections to port %d", port)
	l.started = time.Now()
}

// waitSlowThenSettled is the end of a queued upgrade p1 -> p2 -> p3: slow, a
// request that p1 was serving, must complete (15s) with 200 from p1; then p2
// must exit (15s), leaving p3 the only process, holding the listener.
func (s *server) waitSlowThenSettled(t *testing.T, slow *inflight, p1, p2, p3 int) {
	t.Helper()
	if !waitChan(slow.done, 15*time.Second) {
		t.Fatalf("slow request did not complete")
	}
	if slow.err != nil || slow.resp.status != 200 || slow.resp.pid != p1 {
		t.Errorf("slow request: %v, want 200 from pid %d", slow, p1)
	}
	s.waitGone(p2, 15*time.Second)
	s.checkOneProcess(t, p3)
	s.checkListener(t, p3)
}

// stop sends SIGINT, waits (bounded) for the load tool to exit and decodes
// its JSON result. It also returns for how long requests were being sent.
func (l *loadProc) stop() (*loadgen.Result, time.Duration) {
	l.tb.Helper()
	sent := time.Since(l.started)
	if err := l.cmd.Process.Signal(syscall.SIGINT); err != nil {
		l.tb.Fatalf("SIGINT load tool: %v (stderr: %s)", err, l.stderr.String())
	}
	if !waitChan(l.exited, 60*time.Second) {
		l.tb.Fatalf("load tool did not exit within 60s of SIGINT")
	}
	var res loadgen.Result
	if err := json.NewDecoder(bytes.NewReader(l.stdout.Bytes())).Decode(&res); err != nil {
		l.tb.Fatalf("decoding load tool JSON: %v\nexit: %v\nstdout: %.2000s\nstderr: %.2000s",
			err, l.cmd.ProcessState, l.stdout.String(), l.stderr.String())
	}
	return &res, sent
}

// checkLoad asserts that the load ran (requests above 80% of rate*duration)
// and that no request failed; the load tool must then have exited 0.
func checkLoad(tb testing.TB, l *loadProc, res *loadgen.Result, sent time.Duration) {
	tb.Helper()
	tb.Logf("load: %d requests, %d ok, %d failed in %v; latency ms p50 %.1f p99 %.1f max %.1f; %d pids",
		res.Requests, res.OK, res.Failed, sent.Round(time.Millisecond), res.Latency.P50, res.Latency.P99, res.Latency.Max, len(res.PIDs))
	if res.Failed != 0 || res.OK != res.Requests {
		tb.Errorf("load: %d of %d requests failed (ok %d); failures by kind %v; first errors:\n%s",
			res.Failed, res.Requests, res.OK, res.Failures, strings.Join(res.Errors, "\n"))
	}
	floor := 0.8 * float64(l.rate) * sent.Seconds()
	if float64(res.Requests) < floor {
		tb.Errorf("load: only %d requests in %v at %d/s, want at least %.0f", res.Requests, sent, l.rate, floor)
	}
	if code := l.cmd.ProcessState.ExitCode(); res.Failed == 0 && code != 0 {
		tb.Errorf("load tool exited %d with zero failures, want 0; stderr: %s", code, l.stderr.String())
	}
}

// pidStat returns the load tool's statistics for pid.
func pidStat(res *loadgen.Result, pid int) (loadgen.PIDStat, bool) {
	for _, p := range res.PIDs {
		if p.PID == pid {
			return p, true
		}
	}
	return loadgen.PIDStat{}, false
}

// ---------------------------------------------------------------------------
// Sampling the process group.

// maxSampler records the largest set of processes that sample returned,
// calling it every few milliseconds until stop.
type maxSampler[P any] struct {
	stopC   chan struct{}
	done    chan struct{}
	max     int
	maxSeen []P
	samples int
}

// steady keeps the processes of a sample that were also in the previous one
// (prev, keyed by PID) and returns the next prev. A process counts only once it
// has lived across two samples: Go's runtime clones a child that exits at once
// (os.checkPidfd's probe, at a process's first StartProcess), which a single
// sample may catch.
func steady[P any](prev map[int]bool, ps []P, pid func(P) int) ([]P, map[int]bool) {
	var out []P
	next := make(map[int]bool, len(ps))
	for _, p := range ps {
		next[pid(p)] = true
		if prev[pid(p)] {
			out = append(out, p)
		}
	}
	return out, next
}

func startMaxSampler[P any](every time.Duration, sample func() []P, pid func(P) int) *maxSampler[P] {
	g := &maxSampler[P]{stopC: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(g.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		var prev map[int]bool
		for {
			var ps []P
			ps, prev = steady(prev, sample(), pid)
			g.samples++
			if len(ps) > g.max {
				g.max, g.maxSeen = len(ps), ps
			}
			select {
			case <-g.stopC:
				return
			case <-tick.C:
			}
		}
	}()
	return g
}

// stop ends the sampling and waits for it; it may be called again.
func (g *maxSampler[P]) stop() {
	select {
	case <-g.stopC:
	default:
		close(g.stopC)
	}
	<-g.done
}

// startGroupSampler counts the live processes of group pgid.
func startGroupSampler(pgid int, every time.Duration) *maxSampler[int] {
	return startMaxSampler(every, func() []int { return groupProcs(pgid) }, func(p int) int { return p })
}

// ---------------------------------------------------------------------------
// Small statistics helpers for the benchmark.

// percentile returns the nearest-rank p-th percentile (0..100) of xs.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(s) {
		i = len(s) - 1
	}
	return s[i]
}

func maxOf(xs []float64) float64 {
	m := 0.0
	for _, x := range xs {
		if x > m {
			m = x
		}
	}
	return m
}
