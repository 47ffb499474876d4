// Package sockaddr reads listen addresses as the command line gives them and
// cleans up after Unix sockets.
package sockaddr

import (
	"errors"
	"io/fs"
	"os"
	"strings"

	"golang.org/x/sys/unix"
)

// Split splits a listen address as the command line gives it: "unix:/path" is
// a Unix socket, anything else a TCP host:port.
func Split(spec string) (network, addr string) {
	if rest, ok := strings.CutPrefix(spec, "unix:"); ok {
		return "unix", rest
	}
	return "tcp", spec
}

// RemoveStale removes a Unix socket file at path that nobody listens on, so
// that a server killed without cleaning up can start again. It leaves anything
// else alone: a live socket, a regular file, an abstract address.
func RemoveStale(path string) {
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
