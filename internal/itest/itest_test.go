package itest_test

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
)

func TestMain(m *testing.M) { itest.Main(m) }

// The last line a process writes before it exits is in Logs once Wait
// returns, however late the reader gets to it.
func TestProcWaitReadsAllOutput(t *testing.T) {
	for i := range 20 {
		p := itest.Start(t, "/bin/sh", "-c", `i=0; while [ $i -lt 200 ]; do echo "{\"msg\":\"line\",\"n\":$i}"; i=$((i+1)); done; echo '{"msg":"exiting"}' >&2; exit 3`)
		if code := p.ExitCode(t, 10*time.Second); code != 3 {
			t.Fatalf("run %d: exit code %d, want 3", i, code)
		}
		if _, _, ok := p.Logs.First(0, "exiting", nil); !ok {
			t.Fatalf("run %d: no exiting line after Wait", i)
		}
		if ls, _ := p.Logs.Find(0, "line", nil); len(ls) != 200 {
			t.Fatalf("run %d: %d lines, want 200", i, len(ls))
		}
	}
}

func TestLogsWaitFailsFastAtEOF(t *testing.T) {
	p := itest.Start(t, "/bin/sh", "-c", `echo '{"msg":"only"}'`)
	p.Wait(t, 10*time.Second)
	ft := &fakeTB{TB: t}
	start := time.Now()
	func() {
		defer func() { _ = recover() }()
		p.Logs.Wait(ft, 0, "never", nil, 10*time.Second)
	}()
	if !ft.failed || time.Since(start) > 5*time.Second {
		t.Errorf("Wait for a missing line after EOF: failed %v after %v, want a failure at once (%q)", ft.failed, time.Since(start), ft.msg)
	}
}

// fakeTB records a Fatalf and stops the caller with a panic.
type fakeTB struct {
	testing.TB
	failed bool
	msg    string
}

func (f *fakeTB) Helper() {}
func (f *fakeTB) Fatalf(format string, args ...any) {
	f.failed = true
	f.msg = format
	panic("fatal")
}

func TestRunKillsGroupAtTimeout(t *testing.T) {
	r := itest.Go(t, 300*time.Millisecond, exec.Command("/bin/sh", "-c", "sleep 30 & sleep 30"))
	if !itest.Poll(20*time.Second, r.Done) {
		t.Fatalf("not done 20s after a 300ms timeout")
	}
	r2 := itest.Run(t, 10*time.Second, "/bin/sh", "-c", "echo out; echo err >&2; exit 4")
	if r2.Code != 4 || r2.Stdout != "out\n" || r2.Stderr != "err\n" || r2.TimedOut {
		t.Errorf("Run: %+v", r2)
	}
}

func TestSteady(t *testing.T) {
	var prev map[int]bool
	var got []int
	for _, sample := range [][]int{{1, 2}, {1, 2, 3}, {1, 2, 4}} {
		got, prev = itest.SteadyPIDs(prev, sample)
	}
	if len(got) != 2 || got[0] != 1 || got[1] != 2 {
		t.Errorf("steady processes %v, want [1 2]: 3 and 4 lived in one sample only", got)
	}
}

func TestReadPIDFile(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		content string
		want    int
		ok      bool
	}{{"123\n", 123, true}, {"1\n", 0, false}, {"0", 0, false}, {"-5", 0, false}, {"x", 0, false}} {
		path := filepath.Join(dir, "p.pid")
		if err := os.WriteFile(path, []byte(c.content), 0o644); err != nil {
			t.Fatal(err)
		}
		p, err := itest.ReadPIDFile(path)
		if (err == nil) != c.ok || (c.ok && p != c.want) {
			t.Errorf("ReadPIDFile(%q) = %d, %v; want %d ok=%v", c.content, p, err, c.want, c.ok)
		}
	}
}

func TestBinary(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binaries")
	}
	r := itest.Run(t, 30*time.Second, itest.Binary(t, "handoff-v3"), "version")
	if r.Code != 0 || strings.TrimSpace(r.Stdout) != "v3" {
		t.Errorf("handoff-v3 version: %v", r)
	}
}

// A test process that dies without its cleanup (a -timeout panic, a kill)
// leaves nothing of a group it started: not the leader, which Pdeathsig
// stops, nor a process the leader started and left behind, as an upgraded
// generation is.
func TestGroupDiesWithTheTest(t *testing.T) {
	if os.Getenv("ITEST_GUARD_HELPER") == "1" {
		// The test process to kill: it starts a group whose leader has a
		// child, reports that child's PID, and waits to be killed.
		p := itest.Start(t, "/bin/sh", "-c", `sleep 120 & echo "{\"msg\":\"child\",\"child\":$!}"; wait`)
		l := p.WaitLog(t, 0, "child", nil, 10*time.Second)
		n, _ := l.Num("child")
		fmt.Printf("CHILD %d\n", n)
		time.Sleep(60 * time.Second) // killed long before
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestGroupDiesWithTheTest$", "-test.count=1")
	cmd.Env = append(os.Environ(), "ITEST_GUARD_HELPER=1")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	child := make(chan int, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var n int
			if _, err := fmt.Sscanf(sc.Text(), "CHILD %d", &n); err == nil {
				child <- n
			}
		}
		close(child)
	}()
	var pid int
	select {
	case n, ok := <-child:
		if !ok {
			t.Fatal("the helper test process ended without reporting its group's child")
		}
		pid = n
	case <-time.After(30 * time.Second):
		t.Fatal("no report from the helper test process in 30s")
	}
	if !itest.Alive(pid) {
		t.Fatalf("precondition: the group's child %d is not running", pid)
	}
	cmd.Process.Kill() // no cleanup runs
	if !itest.Poll(10*time.Second, func() bool { return !itest.Alive(pid) }) {
		syscall.Kill(pid, syscall.SIGKILL)
		t.Fatalf("the group's child %d outlived the killed test process by 10s", pid)
	}
}
