// Package fdscan finds processes by the descriptors they hold, from /proc.
package fdscan

import (
	"bytes"
	"os"
	"strconv"
	"strings"
)

// Holders returns the PIDs of the processes other than this one that hold a
// descriptor whose /proc link ("socket:[123]", "pipe:[456]") is in links.
// Processes of other users (EACCES) are skipped.
func Holders(links map[string]bool) []int {
	if len(links) == 0 {
		return nil
	}
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		if HoldsAny(pid, links) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// HoldsAny reports whether pid has a descriptor whose /proc link is in links.
func HoldsAny(pid int, links map[string]bool) bool {
	dir := "/proc/" + strconv.Itoa(pid) + "/fd/"
	fds, _ := os.ReadDir(dir)
	for _, fd := range fds {
		if l, _ := os.Readlink(dir + fd.Name()); links[l] {
			return true
		}
	}
	return false
}

// Parent is pid's parent from /proc/PID/stat, or 0.
func Parent(pid int) int {
	stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	// pid (comm) state ppid ...: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(stat, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(stat[i+1:]))
	if len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}
