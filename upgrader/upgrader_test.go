package upgrader

import (
	"context"
	"encoding/json"
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

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
)

// The test binary is re-exec'd by tableflip as the new generation; these
// variables, set by the test before each upgrade, tell it how to behave.
const (
	childModeEnv = "UPGRADER_TEST_CHILD" // ok, exit, hang
	childOutEnv  = "UPGRADER_TEST_OUT"   // where the ok child writes what it saw
	childPIDEnv  = "UPGRADER_TEST_PIDFILE"
)

func TestMain(m *testing.M) {
	if os.Getenv(tableflipEnv) != "" {
		os.Exit(childMain())
	}
	// Every test leaves no goroutine behind, but for tableflip's wait for a new
	// generation that took over: by design it outlives the old one.
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/cloudflare/tableflip.(*child).waitExit"))
}

// childSaw is what a new generation reports back to the test.
type childSaw struct {
	Generation  int      `json:"generation"`
	Addr        string   `json:"addr"`
	UDPAddr     string   `json:"udp_addr"`
	UnixAddr    string   `json:"unix_addr"`
	MarkerInEnv string   `json:"marker_in_env"` // tableflip's variable as a subprocess sees it
	SubprocFds  []string `json:"subproc_fds"`   // open descriptors of a subprocess
}

func childMain() int {
	switch os.Getenv(childModeEnv) {
	case "exit":
		fmt.Fprintln(os.Stderr, "child: failing on purpose")
		return 3
	case "hang":
		time.Sleep(time.Hour) // never ready: tableflip kills it at the upgrade timeout
	}
	u, err := New(Options{Version: "v-child", PIDFile: os.Getenv(childPIDEnv)})
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	ln, err := u.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	pc, err := u.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	ul, err := u.Listen("unix", os.Getenv(childOutEnv)+".sock")
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	saw := childSaw{Generation: u.Generation(), Addr: ln.Addr().String(),
		UDPAddr: pc.LocalAddr().String(), UnixAddr: ul.Addr().String()}
	fds, err := exec.Command("find", "/proc/self/fd", "-mindepth", "1", "-printf", "%f %l\n").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	env, err := exec.Command("env").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	for _, line := range strings.Split(strings.TrimSpace(string(fds)), "\n") {
		fd, target, _ := strings.Cut(line, " ")
		if n, _ := strconv.Atoi(fd); n > 2 {
			saw.SubprocFds = append(saw.SubprocFds, target) // what each descriptor from 3 up is
		}
	}
	for _, kv := range strings.Split(string(env), "\n") {
		if v, ok := strings.CutPrefix(kv, tableflipEnv+"="); ok {
			saw.MarkerInEnv = v
		}
	}
	b, _ := json.Marshal(saw)
	if err := os.WriteFile(os.Getenv(childOutEnv), b, 0o644); err != nil {
		return 1
	}
	if err := u.Ready(); err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 1
	}
	return 0
}

// One real upgrader per process (tableflip's rule), so one test walks through
// the outcomes in order, each upgrade a real exec of this test binary.
func TestUpgradeOutcomes(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "app.pid")
	out := filepath.Join(dir, "child.json")
	t.Setenv(childPIDEnv, pidFile)
	t.Setenv(childOutEnv, out)

	ctlPath := filepath.Join(dir, "ctl.sock")
	u, err := New(Options{PIDFile: pidFile, UpgradeTimeout: 3 * time.Second, Version: "v-parent", ControlPath: ctlPath})
	require.NoError(t, err)
	t.Cleanup(func() { u.Close() })
	assert.Equal(t, 1, u.Generation())
	assert.False(t, u.HasParent())
	ln, err := u.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	pc, err := u.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	defer pc.Close()
	ul, err := u.Listen("unix", out+".sock")
	require.NoError(t, err)
	defer ul.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	t.Run("not ready", func(t *testing.T) {
		_, err := u.Upgrade(ctx)
		assert.ErrorIs(t, err, ErrNotReady)
	})
	require.NoError(t, u.Ready())
	b, err := os.ReadFile(pidFile)
	require.NoError(t, err)
	assert.Equal(t, strconv.Itoa(os.Getpid())+"\n", string(b))
	fi, err := os.Stat(ctlPath)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm(), "ctlPath socket mode")

	t.Run("status", func(t *testing.T) {
		ans, err := control.Ask(ctx, ctlPath, control.Request{Cmd: control.CmdStatus})
		require.NoError(t, err)
		require.True(t, ans.OK)
		st := ans.Status
		assert.Equal(t, os.Getpid(), st.PID)
		assert.Equal(t, gate.Serving, st.Phase)
		assert.Equal(t, "v-parent", st.Version)
		assert.Equal(t, []control.ListenerInfo{{Network: "tcp", Addr: ln.Addr().String()}, {Network: "udp", Addr: pc.LocalAddr().String()}, {Network: "unix", Addr: ul.Addr().String()}}, st.Listeners)
	})

	t.Run("a failed listen keeps its errno", func(t *testing.T) {
		busy, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer busy.Close()
		_, err = u.Listen("tcp", busy.Addr().String())
		assert.ErrorIs(t, err, syscall.EADDRINUSE)
	})
	t.Run("two listeners on the same address string, by name", func(t *testing.T) {
		a, err := u.ListenAs("a", "tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer a.Close()
		b, err := u.ListenAs("b", "tcp", "127.0.0.1:0")
		require.NoError(t, err)
		defer b.Close()
		assert.NotEqual(t, a.Addr().String(), b.Addr().String())
	})

	binary := u.binary
	t.Run("binary missing", func(t *testing.T) {
		u.binary = filepath.Join(dir, "missing")
		defer func() { u.binary = binary }()
		_, err := u.Upgrade(ctx)
		assert.ErrorIs(t, err, ErrBinaryMissing)
	})
	t.Run("binary not executable", func(t *testing.T) {
		u.binary = out + ".plain"
		require.NoError(t, os.WriteFile(u.binary, []byte("x"), 0o644))
		defer func() { u.binary = binary }()
		_, err := u.Upgrade(ctx)
		assert.ErrorIs(t, err, ErrBinaryNotExecutable)
	})
	t.Run("new process exits", func(t *testing.T) {
		t.Setenv(childModeEnv, "exit")
		_, err := u.Upgrade(ctx)
		var exit *ExitError
		require.ErrorAs(t, err, &exit)
		assert.Equal(t, 3, exit.Code)
		assert.Positive(t, exit.PID)
		assert.Contains(t, exit.Stderr, "child: failing on purpose", "the new process's stderr is quoted")
	})
	t.Run("new process exits, asked over the ctlPath socket", func(t *testing.T) {
		t.Setenv(childModeEnv, "exit")
		ans, err := control.Ask(ctx, ctlPath, control.Request{Cmd: control.CmdUpgrade})
		require.NoError(t, err)
		assert.False(t, ans.OK)
		assert.Equal(t, control.KindExited, ans.Kind)
		assert.Equal(t, os.Getpid(), ans.PID, "the old process answers: it keeps serving")
		require.NotNil(t, ans.Upgrade)
		assert.Equal(t, "exit status 3", ans.Upgrade.ExitStatus)
		assert.Contains(t, ans.Upgrade.Stderr, "child: failing on purpose")
		assert.Equal(t, control.KindExited, u.status().LastUpgrade.Kind)
	})
	t.Run("new process hangs, and a second upgrade meanwhile is refused", func(t *testing.T) {
		t.Setenv(childModeEnv, "hang")
		errs := make(chan error, 2)
		for range 2 {
			go func() {
				_, err := u.Upgrade(ctx)
				errs <- err
			}()
		}
		got := []string{kindOf(<-errs), kindOf(<-errs)}
		assert.ElementsMatch(t, []string{"in-progress", "timeout"}, got)
	})
	select {
	case <-u.Done():
		t.Fatal("failed upgrades must not end this generation")
	default:
	}

	t.Run("ready child takes over", func(t *testing.T) {
		// What a subprocess of this test process sees: stdio, the directory
		// handle of find, and whatever this process itself inherited.
		inherited, err := exec.Command("find", "/proc/self/fd", "-mindepth", "1", "-printf", "%l\n").Output()
		require.NoError(t, err)
		baseline := strings.Fields(string(inherited))
		t.Setenv(childModeEnv, "ok")
		res, err := u.Upgrade(ctx)
		require.NoError(t, err)
		assert.Equal(t, "v-child", res.Version)
		assert.Equal(t, 2, res.Generation)
		assert.Positive(t, res.PID)
		assert.NotEqual(t, os.Getpid(), res.PID)
		assert.Equal(t, &res, u.HandedOff())
		select {
		case <-u.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("Done not closed after a successful upgrade")
		}

		b, err := os.ReadFile(pidFile)
		require.NoError(t, err)
		assert.Equal(t, strconv.Itoa(res.PID)+"\n", string(b), "the PID file names the new generation")

		var saw childSaw
		b, err = os.ReadFile(out)
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(b, &saw))
		assert.Equal(t, 2, saw.Generation)
		assert.Equal(t, ln.Addr().String(), saw.Addr, "the TCP listener was inherited")
		assert.Equal(t, pc.LocalAddr().String(), saw.UDPAddr, "the UDP socket was inherited")
		assert.Equal(t, ul.Addr().String(), saw.UnixAddr, "the Unix listener was inherited")
		assert.Empty(t, saw.MarkerInEnv, "tableflip's marker does not reach subprocesses")
		for _, target := range saw.SubprocFds {
			if strings.HasPrefix(target, "socket:") || strings.HasPrefix(target, "pipe:") {
				assert.Contains(t, baseline, target,
					"no socket or pipe of the handoff reaches a subprocess of the new generation")
			}
		}

		_, err = u.Upgrade(ctx)
		assert.ErrorIs(t, err, ErrHandedOff)
	})
	require.NoError(t, u.Close())
	assert.FileExists(t, pidFile, "a generation that handed off leaves the PID file to its successor")
}

func TestDrainContextEndsOnForce(t *testing.T) {
	u := &Upgrader{forcedC: make(chan struct{})}
	ctx, cancel := u.DrainContext(context.Background(), time.Hour)
	defer cancel()
	close(u.forcedC)
	<-ctx.Done()
	assert.ErrorIs(t, context.Cause(ctx), ErrForced)

	ctx2, cancel2 := (&Upgrader{forcedC: make(chan struct{})}).DrainContext(context.Background(), time.Millisecond)
	defer cancel2()
	<-ctx2.Done()
	assert.ErrorIs(t, context.Cause(ctx2), context.DeadlineExceeded)
}

// decodeHello reads the usual hello by hand and any other with encoding/json,
// with the same result as json.Unmarshal.
func TestDecodeHello(t *testing.T) {
	for _, h := range []hello{{Generation: 2}, {Generation: 12345}, {Generation: 3, Handover: []byte("counters")}, {Type: msgAbort}} {
		b, err := json.Marshal(h)
		require.NoError(t, err)
		got, err := decodeHello(b)
		require.NoError(t, err, "%s", b)
		assert.Equal(t, h, got, "%s", b)
	}
	for _, bad := range []string{``, `{"generation":}`, `{"generation":x}`, `{"generation":-1`} {
		_, err := decodeHello([]byte(bad))
		assert.Error(t, err, "%q", bad)
	}
}
