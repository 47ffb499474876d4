package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/handoff-dev/handoff/internal/gate"
)

func TestDecodeRequest(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Request
		err  string
	}{
		{in: `{"v":1,"cmd":"status"}` + "\n", want: Request{V: 1, Cmd: "status"}},
		{in: `{"v":1,"cmd":"upgrade","wait":true}`, want: Request{V: 1, Cmd: "upgrade", Wait: true}},
		{in: `{"v":2,"cmd":"status"}`, err: "unsupported protocol version 2"},
		{in: `{"v":1,"cmd":"reboot"}`, err: `unknown command "reboot"`},
		{in: `{"v":1,"cmd":"status","extra":1}`, err: "unknown field"},
		{in: `{"v":1,"cmd":"status"} {"v":1}`, err: "more than one document"},
		{in: `not json`, err: "decode request"},
		{in: ``, err: "read request"},
		{in: `{"v":1,"cmd":"status"` + strings.Repeat(" ", MaxMessage) + "}\n", err: "longer than"},
		{in: `{"v":1,"cmd":"status"` + strings.Repeat(" ", 5000) + "}\n", want: Request{V: 1, Cmd: "status"}},
	} {
		t.Run(tc.in[:min(len(tc.in), 40)], func(t *testing.T) {
			got, err := decodeRequest(strings.NewReader(tc.in))
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

// FuzzDecodeRequest: any input gives a valid request or an error, never a panic,
// and a valid request survives a round trip.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{`{"v":1,"cmd":"status"}`, `{"v":1,"cmd":"upgrade","wait":true}` + "\n",
		`{"v":1}`, `[]`, `{"v":1,"cmd":"status"}{}`, "\x00\xff", strings.Repeat("{", 100)} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		req, err := decodeRequest(bytes.NewReader(in))
		if err != nil {
			return
		}
		if req.V != ProtocolVersion || (req.Cmd != CmdStatus && req.Cmd != CmdUpgrade) {
			t.Fatalf("accepted an invalid request %+v from %q", req, in)
		}
		b, _ := json.Marshal(req)
		again, err := decodeRequest(bytes.NewReader(b))
		if err != nil || again != req {
			t.Fatalf("round trip of %+v: %+v, %v", req, again, err)
		}
	})
}

type fakeController struct{ st Status }

var _ Controller = fakeController{}

func (f fakeController) Status() Status { return f.st }
func (f fakeController) Upgrade(ctx context.Context, wait bool) (Result, error) {
	return Result{}, errors.New("not here")
}

func (f fakeController) Stop(ctx context.Context) (Drain, error) {
	return Drain{Requests: 3}, nil
}

// A control socket served for a fake controller: malformed and oversized input get an error answer, and the
// socket goes on answering.
func TestControlAnswersBadInputAndKeepsServing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	ctl := fakeController{Status{Generation: 7, Version: "v-test", Phase: gate.Serving}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Serve(ln, ctl, slog.New(slog.DiscardHandler))
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})

	for _, in := range []string{"garbage\n", strings.Repeat("x", MaxMessage+10), `{"v":9,"cmd":"status"}` + "\n"} {
		c, err := net.Dial("unix", path)
		require.NoError(t, err)
		c.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Write([]byte(in))
		require.NoError(t, err)
		var ans Answer
		require.NoError(t, json.NewDecoder(c).Decode(&ans))
		c.Close()
		assert.False(t, ans.OK)
		assert.Equal(t, KindBadRequest, ans.Kind)
		assert.NotEmpty(t, ans.Error)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ans, err := Ask(ctx, path, Request{Cmd: CmdStatus})
	require.NoError(t, err)
	require.True(t, ans.OK)
	assert.Equal(t, 7, ans.Status.Generation)
	assert.Equal(t, "v-test", ans.Status.Version)
	assert.Equal(t, gate.Serving, ans.Status.Phase)

	_, err = Ask(ctx, filepath.Join(t.TempDir(), "none.sock"), Request{Cmd: CmdStatus})
	assert.ErrorIs(t, err, ErrNoAnswer)
}

func serveFake(t *testing.T) (path string, ln *net.UnixListener, done chan struct{}) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	done = make(chan struct{})
	go func() {
		defer close(done)
		Serve(ln, fakeController{Status{Phase: gate.Serving}}, slog.New(slog.DiscardHandler))
	}()
	t.Cleanup(func() {
		ln.Close()
		<-done
	})
	return path, ln, done
}

// A client that writes a 10 MB line before it reads gets the error answer, not
// a reset.
func TestOversizedRequestIsAnswered(t *testing.T) {
	path, _, _ := serveFake(t)
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	_, err = c.Write(append(bytes.Repeat([]byte("x"), 10<<20), '\n'))
	require.NoError(t, err, "the server reads the whole line")
	require.NoError(t, c.(*net.UnixConn).CloseWrite())
	var ans Answer
	require.NoError(t, json.NewDecoder(c).Decode(&ans))
	assert.Equal(t, KindBadRequest, ans.Kind)
	assert.Contains(t, ans.Error, "longer than")
}

// An idle connection does not hold the server's close.
func TestIdleConnectionDoesNotDelayClose(t *testing.T) {
	path, ln, done := serveFake(t)
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer c.Close()
	// Proof that it was accepted: a second connection is answered meanwhile.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = Ask(ctx, path, Request{Cmd: CmdStatus})
	require.NoError(t, err)
	start := time.Now()
	ln.Close()
	select {
	case <-done:
	case <-time.After(4 * time.Second):
		t.Fatal("Serve waited for an idle connection")
	}
	t.Logf("Serve returned %v after the close", time.Since(start))
}

// lockedBuffer is a bytes.Buffer for a logger written from other goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Out of descriptors, accept fails (EMFILE): the control socket must not stop
// answering for good, as it did when Serve returned on any accept error.
func TestServeSurvivesRunningOutOfDescriptors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	ln, err := Listen(path)
	require.NoError(t, err)
	logs := &lockedBuffer{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		Serve(ln, fakeController{Status{Phase: gate.Serving}}, slog.New(slog.NewTextHandler(logs, nil)))
	}()
	defer func() {
		ln.Close()
		<-done
	}()

	var orig syscall.Rlimit
	require.NoError(t, syscall.Getrlimit(syscall.RLIMIT_NOFILE, &orig))
	restore := func() { syscall.Setrlimit(syscall.RLIMIT_NOFILE, &orig) }
	defer restore()
	fds, err := os.ReadDir("/proc/self/fd")
	require.NoError(t, err)
	low := orig
	low.Cur = uint64(len(fds) + 8)
	require.NoError(t, syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low))
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 64 {
		c, err := net.Dial("unix", path)
		if err != nil {
			break // this process is out of descriptors too
		}
		conns = append(conns, c)
	}
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "accept failed") }, 10*time.Second,
		5*time.Millisecond, "the server never hit a failed accept")
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	restore()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ans, err := Ask(ctx, path, Request{Cmd: CmdStatus})
	require.NoError(t, err, "the control socket answers again once descriptors are free")
	assert.True(t, ans.OK)
}
