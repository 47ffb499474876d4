package upgrader

import (
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestResolveBinaryKeepsSymlinks(t *testing.T) {
	dir := t.TempDir()
	release := filepath.Join(dir, "releases", "v1", "app")
	require.NoError(t, os.MkdirAll(filepath.Dir(release), 0o755))
	require.NoError(t, os.WriteFile(release, []byte("#!/bin/sh\n"), 0o755))
	require.NoError(t, os.Symlink(filepath.Join(dir, "releases", "v1"), filepath.Join(dir, "current")))

	got, err := resolveBinary("./current/app", dir)
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "current", "app"), got, "relative to the starting directory, symlink kept")

	got, err = resolveBinary("/usr/../bin/sh", "/elsewhere")
	require.NoError(t, err)
	assert.Equal(t, "/bin/sh", got)

	t.Setenv("PATH", filepath.Join(dir, "current"))
	got, err = resolveBinary("app", "/elsewhere")
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(dir, "current", "app"), got, "a bare name is looked up in PATH")

	_, err = resolveBinary("", dir)
	assert.Error(t, err)
}

func TestCheckBinary(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "exe")
	plain := filepath.Join(dir, "plain")
	require.NoError(t, os.WriteFile(exe, []byte("#!/bin/sh\n"), 0o755))
	require.NoError(t, os.WriteFile(plain, []byte("#!/bin/sh\n"), 0o644))

	assert.NoError(t, checkBinary(exe))
	assert.ErrorIs(t, checkBinary(filepath.Join(dir, "missing")), ErrBinaryMissing)
	assert.ErrorIs(t, checkBinary(plain), ErrBinaryNotExecutable)
	assert.ErrorIs(t, checkBinary(dir), ErrBinaryNotExecutable)
}

func TestPIDFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.pid")
	require.NoError(t, checkPIDFileDir(path))
	entries, _ := os.ReadDir(dir)
	assert.Empty(t, entries, "the check leaves nothing behind")

	require.NoError(t, WritePIDFile(path, 1234))
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "1234\n", string(b))
	entries, _ = os.ReadDir(dir)
	assert.Len(t, entries, 1, "no temporary file left")

	require.NoError(t, RemovePIDFile(path, 999))
	assert.FileExists(t, path, "another process's PID file is left alone")
	require.NoError(t, RemovePIDFile(path, 1234))
	assert.NoFileExists(t, path)

	missing := filepath.Join(dir, "no", "such", "dir", "app.pid")
	assert.ErrorIs(t, checkPIDFileDir(missing), ErrPIDFile)
	assert.ErrorIs(t, WritePIDFile(missing, 1), ErrPIDFile)
}

func TestSplitAddr(t *testing.T) {
	for spec, want := range map[string][2]string{
		"127.0.0.1:8080":     {"tcp", "127.0.0.1:8080"},
		":0":                 {"tcp", ":0"},
		"[::1]:80":           {"tcp", "[::1]:80"},
		"unix:/run/app.sock": {"unix", "/run/app.sock"},
	} {
		network, addr := SplitAddr(spec)
		assert.Equal(t, want, [2]string{network, addr}, spec)
	}
}

func TestRemoveStaleSocket(t *testing.T) {
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

	RemoveStaleSocket(live)
	RemoveStaleSocket(stale)
	RemoveStaleSocket(regular)
	assert.FileExists(t, live, "a socket someone listens on stays")
	assert.NoFileExists(t, stale)
	assert.FileExists(t, regular, "not a socket: left alone")
}
