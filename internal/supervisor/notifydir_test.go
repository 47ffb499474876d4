package supervisor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// A supervisor starting removes the notify directories of supervisors that
// are gone (their lock is free) and nothing else: not a live one's, not one
// without a lock file, not another program's.
func TestMakeNotifyDirSweepsOnlyDeadSupervisors(t *testing.T) {
	tmp := shortTempDir(t)
	live, liveLock, err := makeNotifyDir(tmp)
	require.NoError(t, err)
	defer liveLock.Close()
	dead, deadLock, err := makeNotifyDir(tmp)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dead, "notify-1.sock"), nil, 0o600))
	deadLock.Close()                             // what the kernel does when its supervisor dies
	old := filepath.Join(tmp, "handoff-run-123") // an older handoff's: no lock file
	require.NoError(t, os.Mkdir(old, 0o700))
	other := filepath.Join(tmp, "other")
	require.NoError(t, os.Mkdir(other, 0o700))
	require.NoError(t, os.WriteFile(filepath.Join(other, lockName), nil, 0o600))

	mine, mineLock, err := makeNotifyDir(tmp)
	require.NoError(t, err)
	defer mineLock.Close()

	assert.NoDirExists(t, dead, "the dead supervisor's directory")
	for _, d := range []string{live, old, other, mine} {
		assert.DirExists(t, d)
	}
	assert.FileExists(t, filepath.Join(mine, lockName))
	assert.NoFileExists(t, filepath.Join(mine, lockName+".new"))
	assert.Zero(t, sweepNotifyDirs(tmp), "a second sweep: the live ones stay")
}

// A directory the sweeper cannot make fails the supervisor's start with the
// cause; nothing is left.
func TestMakeNotifyDirFailsInAMissingDir(t *testing.T) {
	_, _, err := makeNotifyDir(filepath.Join(t.TempDir(), "missing"))
	assert.ErrorIs(t, err, os.ErrNotExist)
}

// A TMPDIR too long for a socket's path fails at the start, with the remedy,
// and leaves nothing.
func TestMakeNotifyDirRefusesATooLongPath(t *testing.T) {
	tmp := shortTempDir(t)
	long := filepath.Join(tmp, strings.Repeat("x", 100))
	require.NoError(t, os.Mkdir(long, 0o700))
	_, _, err := makeNotifyDir(long)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "set TMPDIR to a shorter directory")
	left, _ := filepath.Glob(filepath.Join(long, notifyDirPattern))
	assert.Empty(t, left)
}

// shortTempDir is a temporary directory with a path short enough for Unix
// sockets under it (t.TempDir's carry the test's name).
func shortTempDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nd-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}
