package itest

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// NotifyMsg is a datagram received on a [NotifySocket], with its sender's PID.
type NotifyMsg struct {
	PID  int
	Text string
}

// NotifySocket is a NOTIFY_SOCKET for sd_notify: a unixgram socket with
// SO_PASSCRED that records every datagram with its sender's PID.
type NotifySocket struct {
	Path string

	conn *net.UnixConn
	done chan struct{}
	mu   sync.Mutex
	msgs []NotifyMsg
	errs []string
}

// ListenNotify makes a NotifySocket in a temp dir; it records datagrams until
// the test's cleanup closes it (and waits, 5s at most, for its reader).
func ListenNotify(tb testing.TB) *NotifySocket {
	tb.Helper()
	n := &NotifySocket{Path: filepath.Join(tb.TempDir(), "notify.sock"), done: make(chan struct{})}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.Path, Net: "unixgram"})
	if err != nil {
		tb.Fatal(err)
	}
	n.conn = conn
	raw, err := conn.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) }); err != nil || serr != nil {
		tb.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	go n.read()
	tb.Cleanup(func() {
		conn.Close()
		if !WaitChan(n.done, 5*time.Second) {
			tb.Errorf("notify socket reader did not stop")
		}
	})
	return n
}

func (n *NotifySocket) read() {
	defer close(n.done)
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred)*4)
	for {
		nb, noob, flags, _, err := n.conn.ReadMsgUnix(buf, oob)
		if err != nil {
			return // closed at cleanup
		}
		m := NotifyMsg{Text: string(buf[:nb])}
		var problem string
		if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
			problem = fmt.Sprintf("truncated datagram (flags %#x)", flags)
		}
		scms, err := unix.ParseSocketControlMessage(oob[:noob])
		if err != nil {
			problem = "parse control message: " + err.Error()
		}
		for i := range scms {
			if cred, err := unix.ParseUnixCredentials(&scms[i]); err == nil {
				m.PID = int(cred.Pid)
			}
		}
		if m.PID == 0 && problem == "" {
			problem = "no sender credentials"
		}
		n.mu.Lock()
		n.msgs = append(n.msgs, m)
		if problem != "" {
			n.errs = append(n.errs, fmt.Sprintf("%q: %s", m.Text, problem))
		}
		n.mu.Unlock()
	}
}

// Snapshot returns the datagrams received so far, and the problems found
// with them (truncated, no sender credentials).
func (n *NotifySocket) Snapshot() ([]NotifyMsg, []string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]NotifyMsg(nil), n.msgs...), append([]string(nil), n.errs...)
}

// Flush sends a sentinel datagram from the test and waits (10s) until it is
// read: every datagram queued before it has then been recorded. It returns
// them, without the sentinels of earlier calls.
func (n *NotifySocket) Flush(tb testing.TB) []NotifyMsg {
	tb.Helper()
	sentinel := fmt.Sprintf("%s%d", flushPrefix, time.Now().UnixNano())
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: n.Path, Net: "unixgram"})
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(sentinel)); err != nil {
		tb.Fatal(err)
	}
	var msgs []NotifyMsg
	Eventually(tb, 10*time.Second, func() bool {
		all, _ := n.Snapshot()
		msgs = msgs[:0]
		for _, m := range all {
			if m.Text == sentinel {
				return true
			}
			if !strings.HasPrefix(m.Text, flushPrefix) {
				msgs = append(msgs, m)
			}
		}
		return false
	}, "the sentinel datagram on the notify socket")
	return msgs
}

// flushPrefix starts the sentinel datagrams of Flush.
const flushPrefix = "TEST-FLUSH-"
