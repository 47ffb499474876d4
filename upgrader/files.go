package upgrader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/pidfile"
)

// resolveBinary makes argv0 absolute against dir the way the shell found it,
// without resolving symlinks: a path with a slash is joined to dir, a bare name is
// looked up in PATH.
func resolveBinary(argv0, dir string) (string, error) {
	if argv0 == "" {
		return "", errors.New("resolve binary: empty os.Args[0]")
	}
	if !strings.Contains(argv0, "/") {
		p, err := exec.LookPath(argv0)
		if err != nil {
			return "", fmt.Errorf("resolve binary %s: %w", argv0, err)
		}
		argv0 = p
	}
	if !filepath.IsAbs(argv0) {
		argv0 = filepath.Join(dir, argv0)
	}
	return filepath.Clean(argv0), nil
}

// checkBinary says why path cannot be exec'd, before anything is forked.
func checkBinary(path string) error {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("%w: %s: no such file or directory", ErrBinaryMissing, path)
	}
	if err != nil {
		return fmt.Errorf("%s: %w: %w", path, ErrBinaryNotExecutable, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("%s: %w: not a regular file", path, ErrBinaryNotExecutable)
	}
	if err := unix.Access(path, unix.X_OK); err != nil || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s: %w: mode %v", path, ErrBinaryNotExecutable, fi.Mode().Perm())
	}
	return nil
}

// Check verifies what New would need from opts without starting anything: that
// the binary can be found and that the PID file and control socket can be
// written. It is the core of a server's preflight (--check) mode.
func Check(opts Options) error {
	wd, err := os.Getwd()
	if err != nil {
		return fmt.Errorf("get working directory: %w", err)
	}
	binary, err := resolveBinary(os.Args[0], wd)
	if err != nil {
		return err
	}
	if err := checkBinary(binary); err != nil {
		return err
	}
	if opts.PIDFile != "" {
		if err := pidfile.CheckDir(opts.PIDFile); err != nil {
			return err
		}
	}
	if opts.ControlPath != "" {
		if fi, err := os.Stat(filepath.Dir(opts.ControlPath)); err != nil || !fi.IsDir() {
			return fmt.Errorf("control socket %s: directory %s does not exist", opts.ControlPath, filepath.Dir(opts.ControlPath))
		}
	}
	return nil
}
