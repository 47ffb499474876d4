package supervisor

import (
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/fdscan"
)

// reaper waits for every child process of this one: the children it started,
// whose exits it reports, and orphans re-parented to it (as PID 1 in a
// container, or as a child subreaper, which it makes this process while it
// runs), which it only reaps. It is the only caller of wait4 in the process:
// while it runs, nothing else may wait for children (os/exec's Cmd.Wait would
// fail with "no child processes").
type reaper struct {
	mu      sync.Mutex // held across start and register, and across each wait4 sweep
	watched map[int]func(int, syscall.WaitStatus)
	sigC    chan os.Signal
	done    chan struct{}
	orphans func(pid int)
}

func newReaper(orphans func(pid int)) *reaper {
	r := &reaper{
		watched: make(map[int]func(int, syscall.WaitStatus)),
		sigC:    make(chan os.Signal, 1),
		done:    make(chan struct{}),
		orphans: orphans,
	}
	// Orphans of our children's process trees come to us rather than to init.
	unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
	signal.Notify(r.sigC, syscall.SIGCHLD)
	go r.loop()
	return r
}

// start starts a process and registers onExit for it, with no gap in which its
// exit could be reaped unseen. onExit runs in its own goroutine. The caller
// keeps attr.Files open until start returns.
func (r *reaper) start(argv []string, attr *syscall.ProcAttr, onExit func(int, syscall.WaitStatus)) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	// syscall rather than os.StartProcess: that one takes *os.File and calls
	// Fd on each, which puts the descriptor in blocking mode (see spawn).
	pid, _, err := syscall.StartProcess(argv[0], argv, attr)
	if err != nil {
		return 0, err
	}
	r.watched[pid] = onExit
	return pid, nil
}

func (r *reaper) loop() {
	for {
		select {
		case <-r.sigC:
			r.sweep()
		case <-r.done:
			return
		}
	}
}

// sweep reaps every child that has exited.
func (r *reaper) sweep() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		var ws syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
		if err == syscall.EINTR {
			continue
		}
		if err != nil || pid <= 0 {
			return
		}
		if onExit, ok := r.watched[pid]; ok {
			delete(r.watched, pid)
			go onExit(pid, ws)
		} else if r.orphans != nil {
			r.orphans(pid)
		}
	}
}

// signal sends sig to pid (to its process group with group set) only while pid
// is a child not yet reaped: once reaped, the PID may be another process's.
func (r *reaper) signal(pid int, sig syscall.Signal, group bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.watched[pid]; !ok || pid <= 1 {
		return
	}
	if group {
		pid = -pid
	}
	syscall.Kill(pid, sig)
}

// killOrphans kills with SIGKILL each process that was orphaned to this one
// (its parent is now this process, and it is not a child started here) and
// holds a descriptor whose /proc link is in links; it returns their PIDs.
func (r *reaper) killOrphans(links map[string]bool) []int {
	self := os.Getpid()
	var killed []int
	for _, pid := range fdscan.Holders(links) {
		if fdscan.Parent(pid) != self {
			continue
		}
		// Checked again under the lock: while it is held nothing is reaped,
		// so a PID whose parent is still this process is that orphan (alive
		// or a zombie), not a reused one; and a child being started is
		// registered before the lock is free.
		r.mu.Lock()
		if _, ours := r.watched[pid]; !ours && fdscan.Parent(pid) == self && syscall.Kill(pid, syscall.SIGKILL) == nil {
			killed = append(killed, pid)
		}
		r.mu.Unlock()
	}
	return killed
}

func (r *reaper) stop() {
	signal.Stop(r.sigC)
	close(r.done)
	unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
}
