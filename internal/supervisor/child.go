package supervisor

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/tail"
)

// Environment of a child, after the systemd socket-activation convention.
const (
	envListenFds     = "LISTEN_FDS"
	envListenFdNames = "LISTEN_FDNAMES"
	envListenPID     = "LISTEN_PID"
	envNotifySocket  = "NOTIFY_SOCKET"
	// EnvReadyFd names the descriptor on which a child that cannot send to a
	// datagram socket (Node.js) writes the line "READY=1" when it is ready.
	EnvReadyFd = "HANDOFF_READY_FD"
	// EnvInstance is the child's instance number, from 0 (--instances).
	EnvInstance = "HANDOFF_INSTANCE"
)

// listenFdsStart is where socket activation puts the first descriptor.
const listenFdsStart = 3

// child is one supervised process.
type child struct {
	pid        int
	instance   int // 0 to Instances-1, in its environment as HANDOFF_INSTANCE
	generation int
	started    time.Time
	readyAt    time.Time
	restarts   int // of its instance before it
	phase      control.ChildPhase
	since      time.Time // when it entered phase

	timedOut bool // killed for not becoming ready in time
	restart  bool // started to replace a child that died while serving

	notify *net.UnixConn
	output sync.WaitGroup // the stdout and stderr copiers

	tail tail.Tail // of its stderr, for a verdict
}

// spawn starts a child with the listeners from fd 3 and its readiness channels;
// it reports "ready" to events.
func (s *Supervisor) spawn(generation, instance int) (*child, error) {
	now := time.Now()
	c := &child{generation: generation, instance: instance, started: now, phase: control.ChildStarting, since: now}
	s.spawned++
	notifyPath := filepath.Join(s.dir, notifySocketName(s.spawned))
	var err error
	c.notify, err = net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		return nil, fmt.Errorf("create notify socket: %w", err)
	}
	var opened []*os.File
	closeAll := func() {
		for _, f := range opened {
			f.Close()
		}
	}
	pipe := func() (*os.File, *os.File) {
		r, w, perr := os.Pipe()
		if perr != nil && err == nil {
			err = perr
		}
		opened = append(opened, r, w)
		return r, w
	}
	outR, outW := pipe()
	errR, errW := pipe()
	readyR, readyW := pipe()
	if err != nil {
		closeAll()
		c.notify.Close()
		return nil, fmt.Errorf("create pipes: %w", err)
	}
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		closeAll()
		c.notify.Close()
		return nil, err
	}
	defer devNull.Close()

	// The child's stdin, stdout and stderr are its own: Fd puts them in
	// blocking mode, as a program expects them. The listening sockets are
	// shared by every child and must stay as they are (non-blocking, see
	// nonblock), so their descriptors are taken without Fd.
	files := []uintptr{devNull.Fd(), outW.Fd(), errW.Fd()}
	names := make([]string, len(s.opts.Listeners))
	for i, l := range s.opts.Listeners {
		fd, ferr := rawFd(l.File)
		if ferr != nil {
			closeAll()
			c.notify.Close()
			return nil, fmt.Errorf("listener %s: %w", l.Name, ferr)
		}
		files = append(files, fd)
		names[i] = l.Name
	}
	readyFd := len(files)
	files = append(files, readyW.Fd())

	env := append(cleanEnv(os.Environ()),
		envListenFds+"="+strconv.Itoa(len(s.opts.Listeners)),
		envListenFdNames+"="+strings.Join(names, ":"),
		envNotifySocket+"="+notifyPath,
		EnvReadyFd+"="+strconv.Itoa(readyFd),
		EnvInstance+"="+strconv.Itoa(instance),
	)
	argv := append(append([]string(nil), s.opts.Shim...), s.opts.Command...)
	c.output.Add(2) // before the exit callback can wait on it
	pid, err := s.reaper.start(argv, &syscall.ProcAttr{
		Env:   env,
		Files: files,
		// Its own process group, so that what it leaves behind goes with it;
		// and its stop signal if this process dies (kill -9 of handoff run),
		// so that it drains and exits rather than serving on, orphaned, on a
		// port the next handoff run needs. (The signal is tied to the thread
		// that forks; Go does not end its threads, and LockOSThread is never
		// used here.)
		Sys: &syscall.SysProcAttr{Setpgid: true, Pdeathsig: s.opts.StopSignal},
	}, func(pid int, status syscall.WaitStatus) {
		// What it left behind in its process group goes with it (the group
		// outlives its leader while members remain, so the id is not reused).
		killGroup(pid)
		// What it forked into a process group of its own (a daemon, a
		// detached worker) was orphaned to us as it exited: the ones that
		// hold a listening socket would keep the port and accept for no one.
		for _, o := range s.reaper.killOrphans(s.listenerLinks) {
			s.log.Warn("killed a process left holding a listening socket", "child_pid", pid, "orphan_pid", o)
		}
		// Its last words first; a grandchild may hold the pipes, so not forever.
		done := make(chan struct{})
		go func() {
			c.output.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(time.Second):
		}
		s.send(event{kind: evExit, pid: pid, status: status})
	})
	for _, l := range s.opts.Listeners {
		runtime.KeepAlive(l.File) // open until the fork has its copies
	}
	// The child has its copies; ours of its ends go.
	outW.Close()
	errW.Close()
	readyW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		readyR.Close()
		c.notify.Close()
		return nil, fmt.Errorf("start %s: %w", s.opts.Command[0], err)
	}
	c.pid = pid
	prefix := fmt.Sprintf("[pid %d] ", pid)
	go func() {
		defer c.output.Done()
		copyLines(outR, s.opts.Stdout, prefix, nil)
	}()
	go func() {
		defer c.output.Done()
		copyLines(errR, s.opts.Stderr, prefix, c.tail.Add)
	}()
	go s.waitReadyLine(readyR, pid)
	go s.readNotify(c)
	return c, nil
}

// cleanEnv drops what the supervisor sets for each child, so that none of its
// own (from systemd, say) reaches the child.
func cleanEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch k {
		case envListenFds, envListenFdNames, envListenPID, envNotifySocket, EnvReadyFd, EnvInstance, "LISTEN_PIDFDID":
			continue
		}
		out = append(out, kv)
	}
	return out
}

// maxLine bounds what copyLines holds of one line: a longer one is copied in
// pieces, so a child that writes without newlines costs no memory here (other
// children's lines may then land between the pieces).
const maxLine = 64 << 10

// copyLines copies r to w line by line with prefix, handing the start of each
// line (at most maxLine bytes) to keep.
func copyLines(r io.ReadCloser, w io.Writer, prefix string, keep func(string)) {
	defer r.Close()
	br := bufio.NewReaderSize(r, maxLine)
	var buf []byte
	atStart := true // of a line
	for {
		chunk, err := br.ReadSlice('\n')
		if len(chunk) > 0 {
			buf = buf[:0]
			if atStart {
				buf = append(buf, prefix...)
			}
			buf = append(buf, chunk...)
			ended := chunk[len(chunk)-1] == '\n'
			if !ended && err != bufio.ErrBufferFull { // the last line, unterminated
				buf = append(buf, '\n')
				ended = true
			}
			w.Write(buf)
			if atStart && keep != nil {
				keep(strings.TrimRight(string(chunk), "\n"))
			}
			atStart = ended
		}
		if err != nil && err != bufio.ErrBufferFull {
			return
		}
	}
}

// waitReadyLine reports ready when the child writes "READY=1" on its ready fd.
func (s *Supervisor) waitReadyLine(r *os.File, pid int) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		if strings.TrimSpace(sc.Text()) == "READY=1" {
			s.send(event{kind: evReady, pid: pid, how: "ready fd"})
		}
	}
}

// readNotify reads sd_notify datagrams until the child's notify socket closes.
func (s *Supervisor) readNotify(c *child) {
	buf := make([]byte, 4096)
	for {
		n, err := c.notify.Read(buf)
		if err != nil {
			return
		}
		for _, line := range strings.Split(string(buf[:n]), "\n") {
			switch {
			case line == "READY=1":
				s.send(event{kind: evReady, pid: c.pid, how: "sd_notify"})
			case strings.HasPrefix(line, "STATUS="):
				s.log.Info("child status", "child_pid", c.pid, "status", strings.TrimPrefix(line, "STATUS="))
			}
		}
	}
}

// rawFd is f's descriptor, taken without os.File.Fd, which would put it in
// blocking mode.
func rawFd(f *os.File) (uintptr, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var fd uintptr
	if err := rc.Control(func(d uintptr) { fd = d }); err != nil {
		return 0, err
	}
	return fd, nil
}

// nonblock puts the listening sockets in non-blocking mode. Every child gets
// the same open socket (one file description, whose O_NONBLOCK flag they all
// share), and several accept on it at once: during an upgrade, and with
// --instances. On a blocking socket, a child woken for a connection that
// another took first blocks in accept(2) until the next one arrives; a
// single-threaded server (Node.js, whose libuv accepts until EAGAIN) then
// stops answering the requests it holds and cannot act on its stop signal.
func nonblock(ls []Listener) error {
	for _, l := range ls {
		rc, err := l.File.SyscallConn()
		if err != nil {
			return fmt.Errorf("listener %s: %w", l.Name, err)
		}
		var serr error
		if err := rc.Control(func(fd uintptr) { serr = syscall.SetNonblock(int(fd), true) }); err != nil {
			return fmt.Errorf("listener %s: %w", l.Name, err)
		}
		if serr != nil {
			return fmt.Errorf("listener %s: set non-blocking: %w", l.Name, serr)
		}
	}
	return nil
}

// close releases what the supervisor holds for an exited child.
func (c *child) close() {
	c.notify.Close()
	os.Remove(c.notify.LocalAddr().String())
}
