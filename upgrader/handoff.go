package upgrader

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"
)

// tableflip's own marker variable and descriptors (v1.2.3, parent.go): the child
// finds its parent by this variable, reads names on fd 4 and signals readiness on fd 3.
const (
	tableflipEnv     = "TABLEFLIP_HAS_PARENT_7DIU3"
	tableflipReadyFd = 3
	tableflipNamesFd = 4
)

// channelName is the name under which a generation passes its children one end
// of a datagram socket pair: the parent sends a hello (the child's generation)
// before the fork, and the child answers with a report (its PID and version) at
// Ready, so that the parent learns which process took over.
const channelName = "handoff-channel"

// maxMessage bounds a datagram on the channel.
const maxMessage = 4096

// The messages on the channel. Each is one JSON datagram; Type is empty in the
// hello and the report, as binaries before the "started" and "abort" messages
// sent them, so that a generation of either kind understands the other.
const (
	msgStarted = "started" // child to parent, at New: its PID, before anything else
	msgAbort   = "abort"   // parent to child: given up on; stop and drain what you accepted
)

type hello struct {
	Type       string `json:"type,omitempty"`
	Generation int    `json:"generation"`
	Handover   []byte `json:"handover,omitempty"` // Options.Handover's
}

type report struct {
	Type       string `json:"type,omitempty"`
	PID        int    `json:"pid"`
	Version    string `json:"version"`
	Generation int    `json:"generation"`
	Moves      bool   `json:"moves,omitempty"` // it takes moved connections
}

// scrubInherited removes what tableflip leaves behind in a new process so that it
// does not leak into processes the server starts: the marker variable, and the
// close-on-exec flag on the two pipes it passes (it sets it only on fds 5 and up).
func scrubInherited(tf *tableflip.Upgrader) {
	if !tf.HasParent() {
		return
	}
	os.Unsetenv(tableflipEnv)
	syscall.CloseOnExec(tableflipReadyFd)
	syscall.CloseOnExec(tableflipNamesFd)
}

// parentChannel is this generation's end of the channel to its parent; nil at
// first start.
type parentChannel struct {
	f    *os.File      // the descriptor, until open makes conn of it
	conn *net.UnixConn // nil if open failed; set before sent is closed
	sent chan struct{} // closed once open has run and sent the started message (or failed)
}

// claimParentChannel takes the channel from the parent, if there is one, and
// reads the hello that was queued on it before the fork. It reads from the
// descriptor directly: net.FileConn (half a dozen syscalls) waits for open,
// which runs in the background, off the critical path of the upgrade.
func claimParentChannel(tf *tableflip.Upgrader) (*parentChannel, hello, error) {
	f, err := tf.File(channelName)
	if err != nil || f == nil {
		return nil, hello{}, err
	}
	p := &parentChannel{f: f, sent: make(chan struct{})}
	buf := make([]byte, maxMessage)
	n, err := recvNow(f, buf) // not Fd: it would make the descriptor blocking for the parent's copy too
	if err != nil {           // not queued yet: wait for it, a second at most
		if err = p.dial(); err == nil {
			p.conn.SetReadDeadline(time.Now().Add(time.Second))
			n, err = p.conn.Read(buf)
			p.conn.SetReadDeadline(time.Time{})
		}
	}
	var h hello
	if err == nil {
		if h, err = decodeHello(buf[:n]); err != nil {
			err = fmt.Errorf("decode hello from parent: %w", err)
		}
	} else {
		err = fmt.Errorf("read hello from parent: %w", err)
	}
	if err != nil {
		p.discard()
		return nil, hello{}, err
	}
	return p, h, nil
}

// decodeHello decodes the hello. The usual one, {"generation":N}, is read by
// hand: encoding/json's first Unmarshal in a process builds its reflection
// caches, 0.05 to 0.1 ms on the critical path of an upgrade. Any other goes
// through json.Unmarshal.
func decodeHello(b []byte) (hello, error) {
	if rest, ok := bytes.CutPrefix(b, []byte(`{"generation":`)); ok {
		if digits, ok := bytes.CutSuffix(rest, []byte("}")); ok {
			if g, err := strconv.Atoi(string(digits)); err == nil && g >= 0 {
				return hello{Generation: g}, nil
			}
		}
	}
	var h hello
	err := json.Unmarshal(b, &h)
	return h, err
}

// dial makes conn of f.
func (p *parentChannel) dial() error {
	if p.conn != nil {
		return nil
	}
	c, err := net.FileConn(p.f)
	p.f.Close()
	if err != nil {
		return fmt.Errorf("open parent channel: %w", err)
	}
	p.conn = c.(*net.UnixConn)
	return nil
}

// discard closes the channel of a New that failed.
func (p *parentChannel) discard() {
	if p.conn != nil {
		p.conn.Close()
	} else {
		p.f.Close()
	}
}

// open makes the connection, tells the parent this process's PID and that it
// understands an abort message, then calls onAbort if the parent gives up on
// this process. It returns when the channel is closed (at Ready, by
// sendReport).
func (p *parentChannel) open(log *slog.Logger, onAbort func()) {
	err := p.dial()
	if err == nil {
		b, _ := json.Marshal(report{Type: msgStarted, PID: os.Getpid()})
		_, err = p.conn.Write(b)
	}
	close(p.sent)
	if err != nil {
		log.Warn("cannot tell the previous generation this one started", "error", err)
		return
	}
	buf := make([]byte, maxMessage)
	for {
		n, err := p.conn.Read(buf)
		if err != nil {
			return
		}
		var h hello
		if json.Unmarshal(buf[:n], &h) == nil && h.Type == msgAbort {
			onAbort()
		}
	}
}

// close ends open; it may be called more than once.
func (p *parentChannel) close() {
	if p != nil {
		<-p.sent
		if p.conn != nil {
			p.conn.Close()
		}
	}
}

func (p *parentChannel) sendReport(r report) error {
	if p == nil {
		return nil
	}
	<-p.sent // the started message first, as the parent reads them
	if p.conn == nil {
		return errors.New("no channel to the previous generation")
	}
	b, _ := json.Marshal(r)
	_, err := p.conn.Write(b)
	p.conn.Close()
	return err
}

// childChannel is this generation's end of the channel to the children it starts;
// made at the first upgrade and kept for the life of the process.
type childChannel struct {
	mine   *net.UnixConn // we read reports here
	theirs *net.UnixConn // our copy of the children's end, kept to discard stale hellos
	primed int           // the generation of a plain hello queued ahead (prime), for the next attempt; 0: none
}

func newChildChannel(tf *tableflip.Upgrader) (*childChannel, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("create child channel: %w", err)
	}
	mine, err := fileUnixConn(fds[0], "handoff-channel-parent")
	if err != nil {
		unix.Close(fds[1])
		return nil, err
	}
	theirsFile := os.NewFile(uintptr(fds[1]), "handoff-channel-child")
	defer theirsFile.Close()
	if err := tf.AddFile(channelName, theirsFile); err != nil {
		mine.Close()
		return nil, fmt.Errorf("pass child channel: %w", err)
	}
	c, err := net.FileConn(theirsFile)
	if err != nil {
		mine.Close()
		return nil, fmt.Errorf("open child channel: %w", err)
	}
	return &childChannel{mine: mine, theirs: c.(*net.UnixConn)}, nil
}

func fileUnixConn(fd int, name string) (*net.UnixConn, error) {
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	c, err := net.FileConn(f)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", name, err)
	}
	return c.(*net.UnixConn), nil
}

// prepare discards what an earlier, failed child left on the channel and queues
// the hello for the next one.
func (c *childChannel) prepare(h hello) error {
	c.primed = 0
	discard(c.mine)
	discard(c.theirs)
	b, _ := json.Marshal(h)
	_, err := c.mine.Write(b)
	return err
}

// prime queues the plain hello of generation ahead of the attempt, off the
// critical path of the upgrade: the attempt then sends it as it is (see
// hello), unless Options.Handover adds to it.
func (c *childChannel) prime(generation int) {
	if c.prepare(hello{Generation: generation}) == nil {
		c.primed = generation
	}
}

// hello queues h for the attempt, unless it is queued already (prime); the
// child takes it.
func (c *childChannel) hello(h hello) error {
	primed := c.primed
	c.primed = 0
	if primed != 0 && primed == h.Generation && h.Type == "" && h.Handover == nil {
		return nil
	}
	return c.prepare(h)
}

// readReport waits up to timeout for the new generation's report, skipping its
// started message.
func (c *childChannel) readReport(timeout time.Duration) (report, error) {
	buf := make([]byte, maxMessage)
	c.mine.SetReadDeadline(time.Now().Add(timeout))
	defer c.mine.SetReadDeadline(time.Time{})
	for {
		var r report
		n, err := c.mine.Read(buf)
		if err != nil {
			return r, fmt.Errorf("read report from new generation: %w", err)
		}
		if err := json.Unmarshal(buf[:n], &r); err != nil {
			return r, fmt.Errorf("decode report from new generation: %w", err)
		}
		if r.Type != msgStarted {
			return r, nil
		}
	}
}

// started returns the PID the new generation sent at its start, or 0 if it sent
// none (yet, or at all: a program that is not built on this package). It does
// not wait.
func (c *childChannel) started() int {
	buf := make([]byte, maxMessage)
	pid := 0
	for {
		n, err := recvNow(c.mine, buf)
		if err != nil {
			return pid
		}
		var r report
		if json.Unmarshal(buf[:n], &r) == nil && r.Type == msgStarted {
			pid = r.PID
		}
	}
}

// abort tells the new generation that it was given up on.
func (c *childChannel) abort() error {
	b, _ := json.Marshal(hello{Type: msgAbort})
	_, err := c.mine.Write(b)
	return err
}

// theirsLink is what /proc/PID/fd/N reads for the children's end of the
// channel, "socket:[INODE]": every process that holds it descends from a child
// this generation started (see killHolders).
func (c *childChannel) theirsLink() string {
	raw, err := c.theirs.SyscallConn()
	if err != nil {
		return ""
	}
	var st unix.Stat_t
	if cerr := raw.Control(func(fd uintptr) { err = unix.Fstat(int(fd), &st) }); cerr != nil || err != nil {
		return ""
	}
	return fmt.Sprintf("socket:[%d]", st.Ino)
}

func (c *childChannel) Close() {
	if c != nil {
		c.mine.Close()
		c.theirs.Close()
	}
}

func discard(conn *net.UnixConn) {
	buf := make([]byte, maxMessage)
	for {
		if _, err := recvNow(conn, buf); err != nil {
			return
		}
	}
}

// recvNow reads the datagram waiting on c, if there is one, without waiting
// and without changing the descriptor's mode. (A read with a deadline already
// past would not do: Go's poller answers it with a timeout without reading at
// all.)
func recvNow(c syscall.Conn, buf []byte) (int, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var rerr error
	if err := raw.Control(func(fd uintptr) {
		n, _, rerr = unix.Recvfrom(int(fd), buf, unix.MSG_DONTWAIT)
	}); err != nil {
		return 0, err
	}
	return n, rerr
}
