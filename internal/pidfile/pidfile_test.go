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

	// A file left by a process that died before its Commit, and one of a
	// process that still runs (this test's parent): Sweep removes only the
	// first.
	dead := deadPID(t)
	leftByDead := filepath.Join(dir, tmpPrefix(path, dead)+"123")
	ofRunning := filepath.Join(dir, tmpPrefix(path, os.Getppid())+"456")
	require.NoError(t, os.WriteFile(leftByDead, []byte("x"), 0o644))
	require.NoError(t, os.WriteFile(ofRunning, []byte("x"), 0o644))
	Sweep(path)
	assert.NoFileExists(t, leftByDead)
	assert.FileExists(t, ofRunning, "a running process's file is its own")
	assert.FileExists(t, path)

	// Nobody can block a Prepare by creating its name first (the name has a
	// random part), and a directory where the PID file should be is never
	// exchanged with it: the commit fails and the directory stays.
	require.NoError(t, os.MkdirAll(filepath.Join(dir, tmpPrefix(path, 4242)+"x", "y"), 0o755))
	require.NoError(t, Prepare(path, 4242).Commit())
	b, _ = os.ReadFile(path)
	assert.Equal(t, "4242\n", string(b))
	asDir := filepath.Join(dir, "dir.pid")
	require.NoError(t, os.Mkdir(asDir, 0o755))
	assert.ErrorIs(t, Prepare(asDir, 7).Commit(), ErrPIDFile)
	assert.DirExists(t, asDir)
	left, _ := filepath.Glob(filepath.Join(dir, ".dir.pid.tmp-*"))
	assert.Empty(t, left, "a failed commit leaves no temporary file")

	missing := filepath.Join(dir, "no", "such", "dir", "app.pid")
	assert.ErrorIs(t, Prepare(missing, 1).Commit(), ErrPIDFile)

	// Swap puts the file in place and leaves the previous one under the
	// temporary name until Cleanup; a temporary file removed meanwhile
	// makes Swap fail and leaves the PID file as it was.
	sw := Prepare(path, 5)
	require.NoError(t, sw.Swap())
	b, _ = os.ReadFile(path)
	assert.Equal(t, "5\n", string(b))
	b, _ = os.ReadFile(sw.tmp)
	assert.Equal(t, "4242\n", string(b), "the previous file, until Cleanup")
	sw.Cleanup()
	assert.NoFileExists(t, sw.tmp)
	gone := Prepare(path, 6)
	require.NoError(t, os.Remove(gone.tmp))
	assert.ErrorIs(t, gone.Swap(), ErrPIDFile)
	b, _ = os.ReadFile(path)
	assert.Equal(t, "5\n", string(b))
	var none *Pending
	assert.NoError(t, none.Swap())
	none.Cleanup()
	none.Revert()

	// Revert puts the previous file back, and a second Swap does nothing.
	rv := Prepare(path, 8)
	require.NoError(t, rv.Swap())
	require.NoError(t, rv.Swap())
	b, _ = os.ReadFile(path)
	assert.Equal(t, "8\n", string(b))
	rv.Revert()
	b, _ = os.ReadFile(path)
	assert.Equal(t, "5\n", string(b), "the previous file is back")
	assert.NoFileExists(t, rv.tmp)
	// Where there was no file, Revert removes the one Swap put there.
	fresh := filepath.Join(dir, "fresh.pid")
	rf := Prepare(fresh, 9)
	require.NoError(t, rf.Swap())
	assert.FileExists(t, fresh)
	rf.Revert()
	assert.NoFileExists(t, fresh)
	Prepare(missing, 1).Discard() // nothing to remove, no panic
}

// deadPID returns the PID of a process that has exited and been reaped.
func deadPID(t *testing.T) int {
	t.Helper()
	cmd := exec.Command("true")
	require.NoError(t, cmd.Run())
	return cmd.Process.Pid
}
