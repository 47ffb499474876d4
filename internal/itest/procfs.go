package itest

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// Stat is what the tests use of /proc/PID/stat.
type Stat struct {
	PID, PPID, PGRP int
	State           byte // R, S, D, Z, T...
	Comm            string
}

func (s Stat) String() string {
	return fmt.Sprintf("%d(%s,%c,pgrp %d)", s.PID, s.Comm, s.State, s.PGRP)
}

// ReadStat reads /proc/PID/stat; ok is false when pid does not exist.
func ReadStat(pid int) (st Stat, ok bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Stat{}, false
	}
	// comm may contain spaces and parentheses: the fields start after the last ')'.
	i := bytes.LastIndexByte(b, ')')
	j := bytes.IndexByte(b, '(')
	if i < 0 || j < 0 || j > i {
		return Stat{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return Stat{}, false
	}
	ppid, _ := strconv.Atoi(f[1])
	pgrp, _ := strconv.Atoi(f[2])
	return Stat{PID: pid, PPID: ppid, PGRP: pgrp, State: f[0][0], Comm: string(b[j+1 : i])}, true
}

// Alive reports whether pid exists and is not a zombie (a process that has
// exited but was not reaped yet counts as gone).
func Alive(pid int) bool {
	st, ok := ReadStat(pid)
	return ok && st.State != 'Z' && st.State != 'X'
}

// isProcess reports whether pid is a process (a thread group's leader), not
// one of its threads: a scan of /proc can, for a moment, meet a thread that is
// being created, with its process's group.
func isProcess(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			return strings.TrimSpace(v) == strconv.Itoa(pid)
		}
	}
	return false
}

// Describe names a process for a failure message: its stat line and command.
func Describe(pid int) string {
	stat, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return fmt.Sprintf("%d [%s] %q", pid, strings.TrimSpace(string(stat)), strings.ReplaceAll(string(cmd), "\x00", " "))
}

// Procs returns the processes (not threads) in /proc for which keep returns
// true, in PID order.
func Procs(keep func(Stat) bool) []Stat {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []Stat
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ok := ReadStat(pid); ok && keep(st) && isProcess(pid) {
			out = append(out, st)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PID < out[j].PID })
	return out
}

// GroupProcs returns the live (non-zombie) processes of process group pgid.
func GroupProcs(pgid int) []int {
	var out []int
	for _, st := range Procs(func(st Stat) bool { return st.PGRP == pgid && st.State != 'Z' && st.State != 'X' }) {
		out = append(out, st.PID)
	}
	return out
}

// Children returns every process whose parent is ppid, zombies included.
func Children(ppid int) []Stat {
	return Procs(func(st Stat) bool { return st.PPID == ppid })
}

// LiveChildren returns the children of ppid that are not zombies.
func LiveChildren(ppid int) []Stat {
	return Procs(func(st Stat) bool { return st.PPID == ppid && st.State != 'Z' && st.State != 'X' })
}

// PIDs returns the PIDs of ps.
func PIDs(ps []Stat) []int {
	out := make([]int, len(ps))
	for i, p := range ps {
		out[i] = p.PID
	}
	return out
}

// KillGroup SIGKILLs the process group that pid leads, and pid itself. It
// refuses our own group and PIDs that would reach other processes.
func KillGroup(pid int) {
	if pid <= 1 {
		return
	}
	if st, ok := ReadStat(pid); ok && st.PGRP == pid && st.PGRP != syscall.Getpgrp() {
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
}

// KillInGroup SIGKILLs pid after checking that it belongs to process group
// pgid and is none of notOneOf; it fails tb otherwise.
func KillInGroup(tb testing.TB, pgid, pid int, notOneOf ...int) {
	tb.Helper()
	st, ok := ReadStat(pid)
	if !ok || st.PGRP != pgid || pid <= 1 {
		tb.Fatalf("refusing to kill pid %d: not in process group %d (stat %+v, found %v)", pid, pgid, st, ok)
	}
	for _, p := range notOneOf {
		if p == pid {
			tb.Fatalf("refusing to kill pid %d: it is one of %v", pid, notOneOf)
		}
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		tb.Fatalf("kill(%d, SIGKILL): %v", pid, err)
	}
}

// FDTargets returns pid's open descriptors as "N -> TARGET" (e.g. "3 -> socket:[123]").
func FDTargets(pid int) ([]string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		target, err := os.Readlink(filepath.Join(dir, e.Name()))
		if err != nil {
			continue // closed while reading
		}
		out = append(out, e.Name()+" -> "+target)
	}
	return out, nil
}

// HasSocketInode reports whether pid holds a descriptor for socket inode.
func HasSocketInode(pid int, inode uint64) bool {
	ts, _ := FDTargets(pid)
	want := fmt.Sprintf("socket:[%d]", inode)
	for _, t := range ts {
		if strings.HasSuffix(t, " -> "+want) {
			return true
		}
	}
	return false
}

// VmHWM returns the peak resident set size of pid in KiB.
func VmHWM(pid int) (int64, bool) { return statusKiB(pid, "VmHWM:") }

// Catches reports whether pid has a handler for sig (SigCgt in
// /proc/PID/status) and does not ignore it (SigIgn). The Go runtime has a
// handler for every signal, so for a Go program it tells only that sig is not
// ignored.
func Catches(pid int, sig syscall.Signal) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return false
	}
	mask := func(key string) uint64 {
		for line := range strings.SplitSeq(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, key); ok {
				m, _ := strconv.ParseUint(strings.TrimSpace(rest), 16, 64)
				return m
			}
		}
		return 0
	}
	bit := uint64(1) << (sig - 1)
	return mask("SigCgt:")&bit != 0 && mask("SigIgn:")&bit == 0
}

// VmRSS returns the resident set size of pid in KiB.
func VmRSS(pid int) (int64, bool) { return statusKiB(pid, "VmRSS:") }

// statusKiB reads the field of /proc/PID/status named by key, in KiB.
func statusKiB(pid int, key string) (int64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, false
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, err := strconv.ParseInt(f[0], 10, 64)
				return n, err == nil
			}
		}
	}
	return 0, false
}

// TCP states in /proc/net/tcp.
const (
	TCPEstablished = 0x01
	TCPSynRecv     = 0x03
	TCPCloseWait   = 0x08
	TCPListen      = 0x0A
)

// localhostHex is 127.0.0.1 as /proc/net/tcp writes it.
const localhostHex = "0100007F"

// TCPEntry is a line of /proc/net/tcp.
type TCPEntry struct {
	LocalPort, RemPort int
	LocalIP            string // hex, as in /proc/net/tcp
	State              int
	TxQueue, RxQueue   int64
	Inode              uint64
}

// ReadTCP reads /proc/net/tcp (IPv4 sockets of our network namespace).
func ReadTCP() []TCPEntry {
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		return nil
	}
	var out []TCPEntry
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) < 10 {
			continue
		}
		lip, lport, ok1 := strings.Cut(f[1], ":")
		_, rport, ok2 := strings.Cut(f[2], ":")
		tx, rx, ok3 := strings.Cut(f[4], ":")
		if !ok1 || !ok2 || !ok3 {
			continue
		}
		var e TCPEntry
		lp, _ := strconv.ParseInt(lport, 16, 32)
		rp, _ := strconv.ParseInt(rport, 16, 32)
		st, _ := strconv.ParseInt(f[3], 16, 32)
		e.LocalIP, e.LocalPort, e.RemPort, e.State = lip, int(lp), int(rp), int(st)
		e.TxQueue, _ = strconv.ParseInt(tx, 16, 64)
		e.RxQueue, _ = strconv.ParseInt(rx, 16, 64)
		e.Inode, _ = strconv.ParseUint(f[9], 10, 64)
		out = append(out, e)
	}
	return out
}

// ListenInodes returns the inodes of the LISTEN sockets bound to 127.0.0.1:port.
func ListenInodes(port int) []uint64 {
	var out []uint64
	for _, e := range ReadTCP() {
		if e.State == TCPListen && e.LocalPort == port && e.LocalIP == localhostHex {
			out = append(out, e.Inode)
		}
	}
	return out
}

// ListenPort returns the port of the LISTEN socket on 127.0.0.1 that pid
// holds a descriptor for, or 0.
func ListenPort(pid int) int {
	ts, _ := FDTargets(pid)
	held := map[string]bool{}
	for _, t := range ts {
		if _, target, ok := strings.Cut(t, " -> "); ok {
			held[target] = true
		}
	}
	for _, e := range ReadTCP() {
		if e.State == TCPListen && e.LocalIP == localhostHex && held[fmt.Sprintf("socket:[%d]", e.Inode)] {
			return e.LocalPort
		}
	}
	return 0
}

// ServerConns counts the server-side sockets of port that may hold a
// descriptor in the server (being accepted, established, or half closed by
// the client).
func ServerConns(port int) int {
	n := 0
	for _, e := range ReadTCP() {
		if e.LocalPort == port && (e.State == TCPEstablished || e.State == TCPSynRecv || e.State == TCPCloseWait) {
			n++
		}
	}
	return n
}

// ReadPIDFile returns the PID that the PID file at path names. A PID of 1 or
// less is an error: a bad PID file must never make a test signal pid 0 (its
// own group) or init.
func ReadPIDFile(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	p, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err == nil && p <= 1 {
		return 0, fmt.Errorf("PID file %s names pid %d", path, p)
	}
	return p, err
}

// ReadPID returns the PID that the PID file at path names, failing tb when
// there is none (see [ReadPIDFile]).
func ReadPID(tb testing.TB, path string) int {
	tb.Helper()
	p, err := ReadPIDFile(path)
	if err != nil {
		tb.Fatalf("reading PID file: %v", err)
	}
	return p
}
