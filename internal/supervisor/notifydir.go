package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// The children's notify sockets live in a directory of their own under
// os.TempDir, which the supervisor removes when it returns. One killed with
// SIGKILL cannot, so each directory holds a lock file that its supervisor
// keeps locked (flock) for its whole life; the kernel drops the lock when the
// process dies, however it dies. A supervisor starting removes the
// directories whose lock it can take: their owners are gone.
const (
	notifyDirPattern = "handoff-run-*"
	lockName         = "lock"
	maxSocketPath    = 107 // sun_path's 108 bytes, less the terminating NUL
)

// makeNotifyDir sweeps the directories dead supervisors left in tmp, then
// makes this one's. The returned file holds the lock: keep it open until the
// directory is removed.
func makeNotifyDir(tmp string) (dir string, lock *os.File, err error) {
	sweepNotifyDirs(tmp)
	dir, err = os.MkdirTemp(tmp, notifyDirPattern)
	if err != nil {
		return "", nil, err
	}
	made := dir // a failed return sets dir to ""
	defer func() {
		if err != nil {
			os.RemoveAll(made)
		}
	}()
	// A Unix socket's path holds at most 107 bytes: say so now, with the
	// remedy, rather than "bind: invalid argument" at the first child.
	if longest := filepath.Join(dir, notifySocketName(999_999_999)); len(longest) > maxSocketPath {
		return "", nil, fmt.Errorf("%s is too long for the children's notify sockets (%d bytes with a socket's name, at most %d): set TMPDIR to a shorter directory", dir, len(longest), maxSocketPath)
	}
	// Locked before it has its name: a sweeper never sees a lock file that is
	// not yet locked.
	tmpLock := filepath.Join(dir, lockName+".new")
	lock, err = os.OpenFile(tmpLock, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", nil, err
	}
	if err = unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return "", nil, fmt.Errorf("lock %s: %w", tmpLock, err)
	}
	if err = os.Rename(tmpLock, filepath.Join(dir, lockName)); err != nil {
		lock.Close()
		return "", nil, err
	}
	return dir, lock, nil
}

// notifySocketName names the notify socket of the nth child started.
func notifySocketName(n int) string { return "notify-" + strconv.Itoa(n) + ".sock" }

// sweepNotifyDirs removes the notify directories in tmp whose lock file no
// process holds. A directory without one (being made, or left by an older
// handoff) or that this user cannot open stays. It removes nothing else.
func sweepNotifyDirs(tmp string) (removed int) {
	dirs, _ := filepath.Glob(filepath.Join(tmp, notifyDirPattern))
	for _, dir := range dirs {
		f, err := os.Open(filepath.Join(dir, lockName))
		if err != nil {
			continue
		}
		// Taken: its supervisor is gone (another one sweeping at the same
		// time finds it locked, or removed). Held (EWOULDBLOCK) or any other
		// error: it stays.
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil && os.RemoveAll(dir) == nil {
			removed++
		}
		f.Close()
	}
	return removed
}
