package supervisor

import (
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"syscall"
)

// Shim is the exec shim behind ShimCommand: it sets LISTEN_PID to its own PID,
// which exec keeps, and execs args. It returns only on failure, with an exit
// code for the caller to exit with (127, as a shell does).
func Shim(args []string, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "handoff: "+ShimCommand+": no command")
		return 127
	}
	path, err := exec.LookPath(args[0])
	if err != nil {
		fmt.Fprintf(stderr, "handoff: cannot run %s: %v\n", args[0], err)
		return 127
	}
	os.Setenv(envListenPID, strconv.Itoa(os.Getpid()))
	err = syscall.Exec(path, args, os.Environ())
	fmt.Fprintf(stderr, "handoff: cannot run %s: %v\n", path, err)
	return 127
}
