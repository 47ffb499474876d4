// Package pidfile writes and removes PID files atomically.
package pidfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
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
	return Prepare(path, pid).Commit()
}

// Pending is a PID file written beside its path and not yet renamed into place:
// the slow part of Write (create, write, chmod, close) done ahead, so that only
// the rename remains on an upgrade's critical path.
type Pending struct {
	path, tmp string
	pid       int
	err       error
	swapped   bool // Swap left the previous file under tmp, for Cleanup
	placed    bool // Swap put the file at path
}

// tmpPrefix is the start of the name of pid's temporary files for path: the
// PID, so that Sweep can find one a process left when it died before Commit,
// then a random part (os.CreateTemp's), so that nobody can block it by
// creating that name first.
func tmpPrefix(path string, pid int) string {
	return "." + filepath.Base(path) + ".tmp-" + strconv.Itoa(pid) + "-"
}

// Prepare writes pid to a temporary file beside path; Commit (or Swap, then
// Cleanup or Revert) puts it in place, and Discard removes it. An error is kept
// for Commit and Swap to return.
func Prepare(path string, pid int) *Pending {
	p := &Pending{path: path, pid: pid}
	f, err := os.CreateTemp(filepath.Dir(path), tmpPrefix(path, pid)+"*")
	if err != nil {
		p.err = fmt.Errorf("%w %s: %w", ErrPIDFile, path, err)
		return p
	}
	p.tmp = f.Name()
	_, err = f.WriteString(strconv.Itoa(pid) + "\n")
	if err == nil {
		err = f.Chmod(0o644) // whatever the umask
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(p.tmp)
		p.err = fmt.Errorf("%w %s: %w", ErrPIDFile, path, err)
	}
	return p
}

// Commit puts the prepared file in place of path, atomically: Swap, then
// Cleanup. A nil Pending (no PID file) commits nothing.
func (p *Pending) Commit() error {
	if err := p.Swap(); err != nil {
		return err
	}
	p.Cleanup()
	return nil
}

// Cleanup removes the previous PID file, which Swap left under the temporary
// name. It is not needed for the new file to be in place: an upgrade does it
// after the handover.
func (p *Pending) Cleanup() {
	if p == nil {
		return
	}
	if p.swapped {
		os.Remove(p.tmp)
		p.swapped = false
	}
	p.placed = false // for good: Revert does nothing now
}

// Revert undoes a Swap not yet cleaned up: the previous file is put back (or,
// when there was none, the file removed), as if Prepare had never been called.
// A Swap that was cleaned up stays.
func (p *Pending) Revert() {
	if p == nil || !p.placed {
		return
	}
	if p.swapped {
		if unix.Renameat2(unix.AT_FDCWD, p.tmp, unix.AT_FDCWD, p.path, unix.RENAME_EXCHANGE) == nil {
			p.swapped = false
		}
		os.Remove(p.tmp)
		p.placed = false
		return
	}
	if pid, err := Read(p.path); err == nil && pid == p.pid {
		os.Remove(p.path)
	}
	p.placed = false
}

// Swap puts the prepared file in place of path, atomically. A nil Pending
// swaps nothing.
//
// It exchanges the two files (renameat2 RENAME_EXCHANGE), rather than
// renaming over path: ext4 (auto_da_alloc) writes a file's data out before it
// lets a rename replace another file with it, which made the rename take 0.1
// to 0.4 ms, on the critical path of an upgrade; the exchange takes 16 µs. The
// previous file is then under the temporary name until Cleanup. Where there
// is no file yet, or the filesystem cannot exchange, it renames.
func (p *Pending) Swap() error {
	if p == nil || p.placed {
		return nil
	}
	if p.err != nil {
		return p.err
	}
	// Only a file (or a symlink) is exchanged: anything else at path must
	// make the rename fail, as it always did.
	if fi, err := os.Lstat(p.path); err == nil && (fi.Mode().IsRegular() || fi.Mode()&fs.ModeSymlink != 0) &&
		unix.Renameat2(unix.AT_FDCWD, p.tmp, unix.AT_FDCWD, p.path, unix.RENAME_EXCHANGE) == nil {
		p.swapped, p.placed = true, true
		return nil
	}
	if err := os.Rename(p.tmp, p.path); err != nil {
		os.Remove(p.tmp)
		return fmt.Errorf("%w %s: %w", ErrPIDFile, p.path, err)
	}
	p.placed = true
	return nil
}

// Discard removes the prepared file, unless Commit or Swap has put it in place
// (then Cleanup or Revert applies). A nil Pending discards nothing.
func (p *Pending) Discard() {
	if p != nil && p.err == nil && !p.placed && !p.swapped {
		os.Remove(p.tmp)
	}
}

// Sweep removes the temporary files beside path that processes which no
// longer run left there (killed between Prepare and Commit).
func Sweep(path string) {
	prefix := "." + filepath.Base(path) + ".tmp-"
	entries, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		return
	}
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), prefix)
		if !ok || !e.Type().IsRegular() {
			continue
		}
		digits, _, ok := strings.Cut(rest, "-")
		if !ok {
			continue
		}
		pid, err := strconv.Atoi(digits)
		if err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if syscall.Kill(pid, 0) == syscall.ESRCH {
			os.Remove(filepath.Join(filepath.Dir(path), e.Name()))
		}
	}
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
