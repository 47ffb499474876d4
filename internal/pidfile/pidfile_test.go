package pidfile

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPIDFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.pid")
	require.NoError(t, CheckDir(path))
	entries, _ := os.ReadDir(dir)
	assert.Empty(t, entries, "the check leaves nothing behind")

	require.NoError(t, Write(path, 1234))
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "1234\n", string(b))
	entries, _ = os.ReadDir(dir)
	assert.Len(t, entries, 1, "no temporary file left")

	require.NoError(t, Remove(path, 999))
	assert.FileExists(t, path, "another process's PID file is left alone")
	require.NoError(t, Remove(path, 1234))
	assert.NoFileExists(t, path)

	missing := filepath.Join(dir, "no", "such", "dir", "app.pid")
	assert.ErrorIs(t, CheckDir(missing), ErrPIDFile)
	assert.ErrorIs(t, Write(missing, 1), ErrPIDFile)
}

func TestPrepareCommitDiscardSweep(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "app.pid")
	require.NoError(t, Write(path, 1))

	p := Prepare(path, 4321)
	b, _ := os.ReadFile(path)
	assert.Equal(t, "1\n", string(b), "Prepare leaves the PID file as it was")
	require.NoError(t, p.Commit())
	b, _ = os.ReadFile(path)
	assert.Equal(t, "4321\n", string(b))
	entries, _ := os.ReadDir(dir)
	assert.Len(t, entries, 1, "no temporary file left after Commit")

	Prepare(path, 77).Discard()
	entries, _ = os.ReadDir(dir)
	assert.Len(t, entries, 1, "no temporary file left after Discard")

	// A file left by a process that died before its Commit, by one that
	// still runs (this test), and by a PID that is reused: Prepare takes the
	// last over, Sweep removes only the first.
	dead := deadPID(t)
	require.NoError(t, os.WriteFile(tmpName(path, dead), []byte("x"), 0o644))
	require.NoError(t, os.WriteFile(tmpName(path, os.Getppid()), []byte("x"), 0o644))
	require.NoError(t, os.WriteFile(tmpName(path, 555555), []byte("stale"), 0o644))
	require.NoError(t, Prepare(path, 555555).Commit())
	b, _ = os.ReadFile(path)
	assert.Equal(t, "555555\n", string(b))
	Sweep(path)
	assert.NoFileExists(t, tmpName(path, dead))
	assert.FileExists(t, tmpName(path, os.Getppid()), "a running process's file is its own")
	assert.FileExists(t, path)

	missing := filepath.Join(dir, "no", "such", "dir", "app.pid")
	assert.ErrorIs(t, Prepare(missing, 1).Commit(), ErrPIDFile)
	Prepare(missing, 1).Discard() // nothing to remove, no panic
}

// deadPID returns the PID of a process that has exited and been reaped.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}
