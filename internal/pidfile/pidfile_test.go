package pidfile

import (
	"os"
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
