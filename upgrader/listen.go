package upgrader

import (
	"context"
	"fmt"
	"net"

	"github.com/cloudflare/tableflip"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/sockaddr"
)

// Listen returns the listener for network ("tcp", "tcp4", "tcp6" or "unix") and
// addr inherited from the previous generation, or creates one. The same network
// and addr strings must be used in every generation: they are the key.
func (u *Upgrader) Listen(network, addr string) (net.Listener, error) {
	return u.ListenAs("", network, addr)
}

// ListenAs is Listen for a listener that the next generation finds again by
// name rather than by network and address: for two listeners whose address
// strings are the same ("127.0.0.1:0", a port chosen by the kernel, given for
// both), say. An empty name is Listen.
func (u *Upgrader) ListenAs(name, network, addr string) (net.Listener, error) {
	key := addr
	if name != "" {
		key = "handoff-name:" + name
	}
	ln, err := u.listen(network, addr, key)
	if err == nil {
		u.mu.Lock()
		u.listeners = append(u.listeners, control.ListenerInfo{Network: network, Addr: ln.Addr().String()})
		u.mu.Unlock()
	}
	return ln, err
}

// listen inherits the listener for network and key, or creates one on addr
// and hands it on under key.
func (u *Upgrader) listen(network, addr, key string) (net.Listener, error) {
	if ln, err := u.tf.Listener(network, key); ln != nil || err != nil {
		return ln, err
	}
	if ln, err := u.claimActivated(network, addr); ln != nil || err != nil {
		return ln, err
	}
	if network == "unix" {
		sockaddr.RemoveStale(addr)
	}
	// tableflip formats the callback's error with %s; keep ours, so that
	// errors.Is(err, syscall.EADDRINUSE) works.
	var lerr error
	ln, err := u.tf.ListenWithCallback(network, key, func(network, _ string) (net.Listener, error) {
		ln, err := new(net.ListenConfig).Listen(context.Background(), network, addr)
		lerr = err
		return ln, err
	})
	if lerr != nil {
		err = lerr
	}
	if err != nil {
		return nil, fmt.Errorf("listen on %s %s: %w", network, addr, err)
	}
	if network == "unix" {
		u.mu.Lock()
		u.created = append(u.created, addr)
		u.mu.Unlock()
	}
	return ln, nil
}

// listenControl opens the control socket (inherited after an upgrade), mode 0600.
func (u *Upgrader) listenControl(path string) (*net.UnixListener, error) {
	ln, err := u.listen("unix", path, path)
	if err != nil {
		return nil, err
	}
	return control.Chmod(ln.(*net.UnixListener), path)
}

// claimActivated returns the socket systemd passed for network and addr, and
// registers it to be handed on under that key.
func (u *Upgrader) claimActivated(network, addr string) (net.Listener, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, a := range u.activated {
		if a.ln == nil || !sameAddr(network, addr, a) {
			continue
		}
		u.activated = append(u.activated[:i], u.activated[i+1:]...)
		if err := u.tf.AddListener(network, addr, a.ln.(tableflip.Listener)); err != nil {
			a.ln.Close()
			return nil, fmt.Errorf("hand on socket from systemd: %w", err)
		}
		return a.ln, nil
	}
	return nil, nil
}

// claimActivatedPacket is claimActivated for datagram sockets.
func (u *Upgrader) claimActivatedPacket(network, addr string) (net.PacketConn, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for i, a := range u.activated {
		if a.pc == nil || !sameAddr(network, addr, a) {
			continue
		}
		u.activated = append(u.activated[:i], u.activated[i+1:]...)
		if err := u.tf.AddPacketConn(network, addr, a.pc.(tableflip.PacketConn)); err != nil {
			a.pc.Close()
			return nil, fmt.Errorf("hand on socket from systemd: %w", err)
		}
		return a.pc, nil
	}
	return nil, nil
}

// ListenPacket is Listen for datagram sockets ("udp", "udp4", "udp6", "unixgram").
func (u *Upgrader) ListenPacket(network, addr string) (net.PacketConn, error) {
	pc, err := u.listenPacket(network, addr)
	if err == nil {
		u.mu.Lock()
		u.listeners = append(u.listeners, control.ListenerInfo{Network: network, Addr: pc.LocalAddr().String()})
		u.mu.Unlock()
	}
	return pc, err
}

func (u *Upgrader) listenPacket(network, addr string) (net.PacketConn, error) {
	if pc, err := u.tf.PacketConn(network, addr); pc != nil || err != nil {
		return pc, err
	}
	if pc, err := u.claimActivatedPacket(network, addr); pc != nil || err != nil {
		return pc, err
	}
	var lerr error
	pc, err := u.tf.ListenPacketWithCallback(network, addr, func(network, addr string) (net.PacketConn, error) {
		pc, err := new(net.ListenConfig).ListenPacket(context.Background(), network, addr)
		lerr = err
		return pc, err
	})
	if lerr != nil {
		err = lerr
	}
	if err != nil {
		return nil, fmt.Errorf("listen on %s %s: %w", network, addr, err)
	}
	return pc, nil
}

func (u *Upgrader) closeActivated() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, a := range u.activated {
		u.log.Warn("socket from systemd not used by any listener: closing it", "name", a.name, "addr", a.addr().String())
		a.Close()
	}
	u.activated = nil
}
