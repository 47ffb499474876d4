package upgrader

import (
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
