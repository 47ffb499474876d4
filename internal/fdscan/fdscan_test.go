package fdscan

import (
	"os"
	"os/exec"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHoldersAndParent(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer r.Close()
	defer w.Close()
	link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(int(r.Fd())))
	require.NoError(t, err)
	links := map[string]bool{link: true}
	assert.True(t, HoldsAny(os.Getpid(), links))
	assert.Empty(t, Holders(links), "this process is never among the holders")

	cmd := exec.Command("sleep", "30")
	cmd.ExtraFiles = []*os.File{r} // the child holds the pipe as fd 3
	require.NoError(t, cmd.Start())
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	assert.Equal(t, []int{cmd.Process.Pid}, Holders(links))
	assert.Equal(t, os.Getpid(), Parent(cmd.Process.Pid))
	assert.Equal(t, os.Getppid(), Parent(os.Getpid()))
	assert.Zero(t, Parent(-1))
	assert.Empty(t, Holders(nil))
}
