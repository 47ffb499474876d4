package upgrader

import (
	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/fdscan"
)

// killHolders sends sig to every other process that holds a descriptor reading
// link (see childChannel.theirsLink) and returns their PIDs.
//
// tableflip starts a new generation without a process group of its own and
// offers no way to give it one (v1.2.3: syscall.StartProcess without
// SysProcAttr), and on its timeout it kills only the direct child. A wrapper
// script that forks and hangs would leave its descendants holding the
// listening sockets, the control socket and the stderr pipe. Every one of them
// inherited the children's end of the channel along with the sockets (the
// server's own subprocesses never do: Go sets close-on-exec), so that
// descriptor names them all, including what an earlier failed attempt left.
// A process that closed every inherited descriptor holds none of ours either.
func killHolders(link string, sig unix.Signal) []int {
	if link == "" {
		return nil
	}
	var killed []int
	for _, pid := range fdscan.Holders(map[string]bool{link: true}) {
		if unix.Kill(pid, sig) == nil {
			killed = append(killed, pid)
		}
	}
	return killed
}
