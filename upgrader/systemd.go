package upgrader

import (
	"fmt"
	"net"
	"os"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"
)

// systemd integration, through go-systemd:
//
//   - readiness: every generation sends "MAINPID=<its pid>\nREADY=1" at Ready, so
//     that systemd follows the new process (Type=notify needs NotifyAccess=all,
//     since the new generation is not the main process yet when it sends it);
//   - an upgrade sends "RELOADING=1\nMONOTONIC_USEC=..." when it starts; a failed
//     one sends "STATUS=upgrade failed: ..." and then "READY=1", so that systemctl
//     reload never hangs (Type=notify-reload, whose reload signal is SIGHUP);
//   - a final stop sends "STOPPING=1"; a handoff never does;
//   - socket activation: at first start, listeners passed in LISTEN_FDS (only when
//     LISTEN_PID is ours) are used for the addresses they are bound to, and then
//     handed on across upgrades like any other listener.
//
// NOTIFY_SOCKET stays in the environment: every generation needs it. The
// notification sequence itself is internal/sdnotify's.

// activated is a socket systemd passed at first start: a listener
// (ListenStream=) or a datagram socket (ListenDatagram=).
type activated struct {
	name string
	ln   net.Listener   // a stream socket
	pc   net.PacketConn // a datagram socket
}

func (a activated) addr() net.Addr {
	if a.pc != nil {
		return a.pc.LocalAddr()
	}
	return a.ln.Addr()
}

func (a activated) Close() error {
	if a.pc != nil {
		return a.pc.Close()
	}
	return a.ln.Close()
}

// takeActivated adopts systemd's sockets; it unsets LISTEN_* so that they reach
// nobody else.
func takeActivated() ([]activated, error) {
	var out []activated
	for _, f := range activation.Files(true) {
		a, err := adopt(f)
		f.Close()
		if err != nil {
			for _, a := range out {
				a.Close()
			}
			return nil, fmt.Errorf("use socket %s from systemd: %w", f.Name(), err)
		}
		out = append(out, a)
	}
	return out, nil
}

// adopt makes a listener or a packet socket of f, as its type says.
func adopt(f *os.File) (activated, error) {
	// Not f.Fd(), which would put the socket, shared with every process that
	// holds it (the other children of handoff run), in blocking mode.
	rc, err := f.SyscallConn()
	if err != nil {
		return activated{}, fmt.Errorf("socket type: %w", err)
	}
	var typ int
	if cerr := rc.Control(func(fd uintptr) { typ, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE) }); cerr != nil {
		err = cerr
	}
	if err != nil {
		return activated{}, fmt.Errorf("socket type: %w", err)
	}
	a := activated{name: f.Name()}
	if typ == unix.SOCK_DGRAM {
		a.pc, err = net.FilePacketConn(f)
	} else {
		a.ln, err = net.FileListener(f)
	}
	return a, err
}

// sameAddr reports whether a listener bound to have serves the network and
// address a caller asks for (an address or systemd's name for the socket).
func sameAddr(network, want string, a activated) bool {
	have := a.addr()
	if want == a.name {
		return true
	}
	switch network {
	case "unix", "unixgram":
		return have.Network() == network && have.String() == want
	case "udp", "udp4", "udp6":
		h, ok := have.(*net.UDPAddr)
		if !ok {
			return false
		}
		w, err := net.ResolveUDPAddr(network, want)
		if err != nil || w.Port != h.Port {
			return false
		}
		return w.IP.Equal(h.IP) || (len(w.IP) == 0 || w.IP.IsUnspecified()) && h.IP.IsUnspecified()
	case "tcp", "tcp4", "tcp6":
		h, ok := have.(*net.TCPAddr)
		if !ok {
			return false
		}
		w, err := net.ResolveTCPAddr(network, want)
		if err != nil || w.Port != h.Port {
			return false
		}
		return w.IP.Equal(h.IP) || (len(w.IP) == 0 || w.IP.IsUnspecified()) && h.IP.IsUnspecified()
	}
	return false
}
