package sockaddr

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSplit(t *testing.T) {
	for spec, want := range map[string][2]string{
		"127.0.0.1:8080":     {"tcp", "127.0.0.1:8080"},
		":0":                 {"tcp", ":0"},
		"[::1]:80":           {"tcp", "[::1]:80"},
		"unix:/run/app.sock": {"unix", "/run/app.sock"},
	} {
		network, addr := Split(spec)
		assert.Equal(t, want, [2]string{network, addr}, spec)
	}
}

func TestRemoveStale(t *testing.T) {
	dir := t.TempDir()
	live := filepath.Join(dir, "live.sock")
	ln, err := net.Listen("unix", live)
	require.NoError(t, err)
	defer ln.Close()

	stale := filepath.Join(dir, "stale.sock")
	l2, err := net.Listen("unix", stale)
	require.NoError(t, err)
	l2.(*net.UnixListener).SetUnlinkOnClose(false)
	l2.Close()
	regular := filepath.Join(dir, "file")
	require.NoError(t, os.WriteFile(regular, nil, 0o644))

	RemoveStale(live)
	RemoveStale(stale)
	RemoveStale(regular)
	assert.FileExists(t, live, "a socket someone listens on stays")
	assert.NoFileExists(t, stale)
	assert.FileExists(t, regular, "not a socket: left alone")
}
