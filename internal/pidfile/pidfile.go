// Package pidfile writes and removes PID files atomically.
package pidfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrPIDFile: the PID file cannot be written. Package upgrader re-exports it.
var ErrPIDFile = errors.New("cannot write pid file")

// CheckDir fails early when a PID file at path could not be written.
func CheckDir(path string) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".check-*")
	if err != nil {
		return fmt.Errorf("%w %s: %w", ErrPIDFile, path, err)
	}
	f.Close()
	return os.Remove(f.Name())
}

// Write writes pid to path atomically: a temporary file in the same directory,
// renamed over path.
func Write(path string, pid int) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("%w %s: %w", ErrPIDFile, path, err)
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
		return fmt.Errorf("%w %s: %w", ErrPIDFile, path, err)
	}
	return nil
}

// Remove removes path if it still names pid: a generation that handed off must
// not remove the file its successor wrote.
func Remove(path string, pid int) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	if strings.TrimSpace(string(b)) != strconv.Itoa(pid) {
		return nil
	}
	return os.Remove(path)
}

// Read returns the PID that path names.
func Read(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0, fmt.Errorf("pid file %s: not a PID: %q", path, strings.TrimSpace(string(b)))
	}
	return pid, nil
}

// Running returns the PID that path names if that process runs this same
// program (by its executable's name), and is not this process: another server
// started with the same PID file. A stale file (a dead PID, or one reused by
// another program) gives 0.
func Running(path string) int {
	pid, err := Read(path)
	if err != nil || pid == os.Getpid() {
		return 0
	}
	theirs, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil {
		return 0 // gone, or not ours to look at
	}
	mine, err := os.Executable()
	if err != nil {
		return 0
	}
	name := func(p string) string { return filepath.Base(strings.TrimSuffix(p, " (deleted)")) }
	if name(theirs) != name(mine) {
		return 0
	}
	return pid
}
