package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	upgrades    = 10
	conns       = 4 // client connections, shared by the callers
	callers     = 8 // goroutines calling without a pause; the odd ones alternate Sleep and Whoami
	slowDelay   = 300 * time.Millisecond
	callTimeout = 10 * time.Second // no call may take this long: a hang fails the test instead of blocking it
	waitLong    = 30 * time.Second // bound of every wait for the server
)

// TestUpgradesUnderLoad upgrades the server 10 times with SIGHUP while 8
// goroutines call it without a pause over 4 connections, four of them
// alternating slow calls (300 ms, in flight across the upgrades) and fast ones, with no retry policy and fail-fast
// calls (WaitForReady(false)): every call must succeed, and every generation
// must answer, the clients having reconnected on GOAWAY by themselves.
func TestUpgradesUnderLoad(t *testing.T) {
	bin := buildServer(t)
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "grpc.pid")
	srv := startServer(t, dir, bin, "--listen", "127.0.0.1:0", "--pidfile", pidFile, "--drain-timeout", "20s")

	first := srv.waitPIDFile(t, pidFile, 0)
	if first != srv.pgid {
		t.Fatalf("PID file names %d, the server started as %d", first, srv.pgid)
	}
	addr := srv.waitAddr(t, first)
	t.Logf("generation 1: pid %d, serving on %s", first, addr)

	load := startLoad(t, addr)
	eventually(t, waitLong, func() bool { return load.answeredBy(int64(first)) }, "a call answered by generation 1 (%d)", first)

	pids := []int{first}
	replacedAt := map[int64]time.Time{} // when the test saw the PID file name the successor
	for i := 1; i <= upgrades; i++ {
		old := pids[len(pids)-1]
		start := time.Now()
		srv.signal(t, old, syscall.SIGHUP)
		next := srv.waitPIDFile(t, pidFile, old)
		replacedAt[int64(old)] = time.Now()
		ready := time.Since(start)
		eventually(t, waitLong, func() bool { return !alive(old) }, "generation %d (pid %d) to exit after its successor %d was ready", i, old, next)
		exited := time.Since(start)
		eventually(t, waitLong, func() bool { return load.answeredBy(int64(next)) }, "a call answered by generation %d (%d)", i+1, next)
		t.Logf("upgrade %d: pid %d -> %d, ready after %v, old generation gone after %v, answering after %v",
			i, old, next, ready.Round(time.Millisecond), exited.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		pids = append(pids, next)
	}

	res := load.stop(t)
	t.Logf("%d calls (%d slow), %d failed; answered by %d generations: %v", res.calls, res.slow, len(res.failures), len(res.byPID), res.byPID)
	if len(res.failures) > 0 {
		t.Errorf("%d calls failed; the first ones:\n%s", len(res.failures), strings.Join(res.failures, "\n"))
	}
	if len(res.byPID) < 2 {
		t.Errorf("calls were answered by %d generation(s), want every one of %v", len(res.byPID), pids)
	}
	for _, p := range pids {
		if res.byPID[int64(p)] == 0 {
			t.Errorf("generation with pid %d answered no call", p)
		}
	}
	for p := range res.byPID {
		if !slices.Contains(pids, int(p)) {
			t.Errorf("pid %d answered, but the PID file never named it (generations: %v)", p, pids)
		}
	}
	// Slow calls still in flight when their generation was replaced finished in it.
	drained := 0
	for _, c := range res.slowCalls {
		if at, ok := replacedAt[c.pid]; ok && c.done.After(at) {
			drained++
		}
	}
	t.Logf("%d slow calls finished in a generation that had already been replaced", drained)
	if drained == 0 {
		t.Errorf("no slow call was in flight across an upgrade: the test did not test the drain")
	}

	// A final stop: the last generation drains and exits, and removes the PID file.
	last := pids[len(pids)-1]
	srv.signal(t, last, syscall.SIGTERM)
	eventually(t, waitLong, func() bool { return !alive(last) }, "the last generation (%d) to exit after SIGTERM", last)
	if _, err := os.Stat(pidFile); !os.IsNotExist(err) {
		t.Errorf("PID file after the final stop: %v, want it removed", err)
	}
	out := srv.output()
	if n := strings.Count(out, "msg=drained "); n != len(pids) {
		t.Errorf("%d generations logged msg=drained, want %d", n, len(pids))
	}
	for _, bad := range []string{"drain cut short", "level=ERROR", "DATA RACE", "panic:"} {
		if strings.Contains(out, bad) {
			t.Errorf("the server's output holds %q", bad)
		}
	}
}

// buildServer builds this example into a temporary directory, with the race
// detector when the test has it.
func buildServer(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "grpc-example")
	args := []string{"build", "-o", bin}
	t.Logf("building the server, race detector: %v", raceEnabled())
	if raceEnabled() {
		args = append(args, "-race")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", append(args, ".")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return bin
}

func raceEnabled() bool {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return false
	}
	for _, s := range info.Settings {
		if s.Key == "-race" {
			return s.Value == "true"
		}
	}
	return false
}

// server is the example running in its own process group: every generation
// is forked by the previous one, and stays in the group.
type server struct {
	pgid    int
	outPath string
	exited  chan struct{} // closed once the first generation has been reaped
}

// startServer starts bin in its own process group, its output appended to a
// file in dir by every generation. The cleanup kills the group and waits,
// bounded, for every process of it to be gone; on failure it logs the output.
func startServer(t *testing.T, dir, bin string, args ...string) *server {
	t.Helper()
	outPath := filepath.Join(dir, "server.log")
	out, err := os.OpenFile(outPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = out, out // a file: Wait does not wait for the other generations
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// A binary built with -race waits 1 s at exit by default: not for every generation.
	cmd.Env = append(os.Environ(), "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	s := &server{pgid: cmd.Process.Pid, outPath: outPath, exited: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(s.exited)
	}()
	t.Cleanup(func() {
		_ = syscall.Kill(-s.pgid, syscall.SIGKILL)
		select {
		case <-s.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("pid %d not reaped 10s after SIGKILL", s.pgid)
		}
		if !poll(10*time.Second, func() bool { return len(groupProcs(s.pgid)) == 0 }) {
			t.Errorf("processes of group %d alive 10s after SIGKILL: %v", s.pgid, groupProcs(s.pgid))
		}
		if t.Failed() {
			t.Logf("server output:\n%s", s.output())
		}
	})
	return s
}

func (s *server) output() string {
	b, _ := os.ReadFile(s.outPath)
	return string(b)
}

// waitPIDFile waits for the PID file to name a live process of the group
// other than not, and returns it.
func (s *server) waitPIDFile(t *testing.T, path string, not int) int {
	t.Helper()
	var pid int
	eventually(t, waitLong, func() bool {
		p, err := readPIDFile(path)
		if err != nil || p == not || !s.inGroup(p) {
			return false
		}
		pid = p
		return true
	}, "the PID file %s to name a process of the server other than %d", path, not)
	return pid
}

var servingRE = regexp.MustCompile(`msg=serving pid=(\d+) addr=(\S+)`)

// waitAddr waits for generation pid to log the address it serves on.
func (s *server) waitAddr(t *testing.T, pid int) string {
	t.Helper()
	var addr string
	eventually(t, waitLong, func() bool {
		for _, m := range servingRE.FindAllStringSubmatch(s.output(), -1) {
			if m[1] == strconv.Itoa(pid) {
				addr = m[2]
				return true
			}
		}
		return false
	}, "pid %d to log the address it serves on", pid)
	return addr
}

// signal sends sig to pid, a live process of the server's group.
func (s *server) signal(t *testing.T, pid int, sig syscall.Signal) {
	t.Helper()
	if !s.inGroup(pid) {
		t.Fatalf("refusing to send %v to pid %d: not a live process of group %d", sig, pid, s.pgid)
	}
	if err := syscall.Kill(pid, sig); err != nil {
		t.Fatalf("kill(%d, %v): %v", pid, sig, err)
	}
}

func (s *server) inGroup(pid int) bool {
	pgrp, state, ok := readStat(pid)
	return ok && pgrp == s.pgid && state != 'Z' && state != 'X'
}

// load is the callers' state.
type load struct {
	stopping atomic.Bool
	wg       sync.WaitGroup
	cc       []*grpc.ClientConn

	mu        sync.Mutex
	calls     int
	slow      int
	byPID     map[int64]int
	failures  []string
	nFailures int
	slowCalls []slowCall
}

type slowCall struct {
	pid  int64
	done time.Time
}

type loadResult struct {
	calls, slow int
	byPID       map[int64]int
	failures    []string
	slowCalls   []slowCall
}

// startLoad starts the callers. Retries are disabled and calls fail fast:
// only gRPC's transparent retry of a call that never reached a server (the
// stream was refused, or the connection was draining) remains.
func startLoad(t *testing.T, addr string) *load {
	t.Helper()
	l := &load{byPID: map[int64]int{}}
	for range conns {
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDisableRetry())
		if err != nil {
			t.Fatal(err)
		}
		l.cc = append(l.cc, cc)
	}
	t.Cleanup(func() {
		l.stopping.Store(true)
		l.wg.Wait() // bounded: every call has a deadline
		for _, cc := range l.cc {
			cc.Close()
		}
	})
	for i := range callers {
		l.wg.Add(1)
		go l.call(l.cc[i%conns], i%2 == 1)
	}
	return l
}

func (l *load) call(cc *grpc.ClientConn, sometimesSlow bool) {
	defer l.wg.Done()
	for n := 0; !l.stopping.Load(); n++ {
		slow := sometimesSlow && n%2 == 0
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		out := new(wrapperspb.Int64Value)
		var err error
		if slow {
			err = cc.Invoke(ctx, SleepMethod, wrapperspb.Int64(slowDelay.Milliseconds()), out, grpc.WaitForReady(false))
		} else {
			err = cc.Invoke(ctx, WhoamiMethod, &emptypb.Empty{}, out, grpc.WaitForReady(false))
		}
		cancel()
		done := time.Now()
		l.mu.Lock()
		l.calls++
		switch {
		case err != nil:
			l.nFailures++
			if len(l.failures) < 20 {
				l.failures = append(l.failures, fmt.Sprintf("%s: %v", done.Format("15:04:05.000"), err))
			}
		case slow:
			l.slow++
			l.slowCalls = append(l.slowCalls, slowCall{out.GetValue(), done})
			l.byPID[out.GetValue()]++
		default:
			l.byPID[out.GetValue()]++
		}
		l.mu.Unlock()
	}
}

func (l *load) answeredBy(pid int64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byPID[pid] > 0
}

// stop stops the callers, waits (bounded) for their last calls, and returns
// what they saw.
func (l *load) stop(t *testing.T) loadResult {
	t.Helper()
	l.stopping.Store(true)
	done := make(chan struct{})
	go func() { l.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(callTimeout + 5*time.Second):
		t.Fatalf("callers still running %v after being stopped", callTimeout+5*time.Second)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	failures := l.failures
	if l.nFailures > len(failures) {
		failures = append(failures, fmt.Sprintf("... and %d more", l.nFailures-len(failures)))
	}
	return loadResult{calls: l.calls, slow: l.slow, byPID: l.byPID, failures: failures, slowCalls: l.slowCalls}
}

// readPIDFile returns the PID the file names; 1 or less is an error, so that
// a bad file never makes the test signal its own group or init.
func readPIDFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	p, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && p <= 1 {
		err = fmt.Errorf("PID file %s names pid %d", path, p)
	}
	return p, err
}

// readStat returns the process group and state of pid from /proc/PID/stat.
func readStat(pid int) (pgrp int, state byte, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, false
	}
	i := bytes.LastIndexByte(b, ')') // the command may hold spaces and parentheses
	if i < 0 {
		return 0, 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return 0, 0, false
	}
	pgrp, err = strconv.Atoi(f[2])
	return pgrp, f[0][0], err == nil
}

// alive reports whether pid exists and is not a zombie: an exited generation
// whose parent exited too may never be reaped in a container.
func alive(pid int) bool {
	_, state, ok := readStat(pid)
	return ok && state != 'Z' && state != 'X'
}

// groupProcs returns the live processes of process group pgid.
func groupProcs(pgid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if pgrp, state, ok := readStat(pid); ok && pgrp == pgid && state != 'Z' && state != 'X' {
			out = append(out, pid)
		}
	}
	slices.Sort(out)
	return out
}

// poll calls cond every 5 ms until it returns true or timeout elapses, and
// reports whether it did; it asks once more at the deadline.
func poll(timeout time.Duration, cond func() bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(5 * time.Millisecond)
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

// eventually fails the test when cond does not become true within timeout.
func eventually(t *testing.T, timeout time.Duration, cond func() bool, format string, args ...any) {
	t.Helper()
	if !poll(timeout, cond) {
		t.Fatalf("timed out after %v waiting for %s", timeout, fmt.Sprintf(format, args...))
	}
}
