package upgrader

import (
	"net"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// A ListenDatagram= socket from systemd is adopted as a packet socket (it used
// to make New fail) and found by ListenPacket's network and address; a stream
// socket stays a listener.
func TestAdoptActivatedSockets(t *testing.T) {
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	require.NoError(t, err)
	defer udp.Close()
	uf, err := udp.(*net.UDPConn).File()
	require.NoError(t, err)
	defer uf.Close()
	a, err := adopt(named(t, uf, "dns"))
	require.NoError(t, err)
	defer a.Close()
	require.NotNil(t, a.pc, "a datagram socket")
	assert.Nil(t, a.ln)
	assert.True(t, sameAddr("udp", udp.LocalAddr().String(), a))
	assert.True(t, sameAddr("udp", "dns", a), "by FDNAME")
	assert.False(t, sameAddr("tcp", udp.LocalAddr().String(), a))

	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer tcp.Close()
	tf, err := tcp.(*net.TCPListener).File()
	require.NoError(t, err)
	defer tf.Close()
	b, err := adopt(named(t, tf, "web"))
	require.NoError(t, err)
	defer b.Close()
	require.NotNil(t, b.ln, "a stream socket")
	assert.True(t, sameAddr("tcp", tcp.Addr().String(), b))
}

// named is a copy of f under systemd's name for it.
func named(t *testing.T, f *os.File, name string) *os.File {
	fd, err := unix.Dup(int(f.Fd()))
	require.NoError(t, err)
	nf := os.NewFile(uintptr(fd), name)
	t.Cleanup(func() { nf.Close() })
	return nf
}
