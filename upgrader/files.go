package upgrader

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
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
		return fmt.Errorf("%s: %w: %v", path, ErrBinaryNotExecutable, err)
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
		if err := checkPIDFileDir(opts.PIDFile); err != nil {
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

// checkPIDFileDir fails early when the PID file could not be written at Ready.
func checkPIDFileDir(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".check-*")
	if err != nil {
		return fmt.Errorf("%w %s: %v", ErrPIDFile, path, err)
	}
	f.Close()
	return os.Remove(f.Name())
}

// WritePIDFile writes pid to path atomically: a temporary file in the same
// directory, renamed over path. An Upgrader does it at Ready (Options.PIDFile).
func WritePIDFile(path string, pid int) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("%w %s: %v", ErrPIDFile, path, err)
	}
	defer os.Remove(f.Name())
	_, err = f.WriteString(strconv.Itoa(pid) + "\n")
	if err == nil {
		err = f.Chmod(0o644)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("%w %s: %v", ErrPIDFile, path, err)
	}
	return nil
}

// RemovePIDFile removes path if it still names pid: a generation that handed
// off must not remove the file its successor wrote.
func RemovePIDFile(path string, pid int) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	if strings.TrimSpace(string(b)) != strconv.Itoa(pid) {
		return nil
	}
	return os.Remove(path)
}

// RemoveStaleSocket removes a Unix socket file at path that nobody listens on, so
// that a server killed without cleaning up can start again. It leaves anything
// else alone.
func RemoveStaleSocket(path string) {
	if strings.HasPrefix(path, "@") {
		return
	}
	fi, err := os.Lstat(path)
	if err != nil || fi.Mode()&fs.ModeSocket == 0 {
		return
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); errors.Is(err, unix.ECONNREFUSED) {
		os.Remove(path)
	}
}
