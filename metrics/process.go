package metrics

import (
	"bytes"
	"os"
	"runtime"
	"strconv"
	"syscall"
)

// writeRuntime writes the Go runtime's metrics under the names client_golang's
// Go collector gives them, so that existing dashboards work.
func writeRuntime(e *encoder) {
	e.family("go_info", "gauge", "Information about the Go environment.")
	e.sample("go_info", "version", runtime.Version(), 1)
	e.family("go_goroutines", "gauge", "Number of goroutines that currently exist.")
	e.sample("go_goroutines", "", "", float64(runtime.NumGoroutine()))
	threads, _ := runtime.ThreadCreateProfile(nil)
	e.family("go_threads", "gauge", "Number of OS threads created.")
	e.sample("go_threads", "", "", float64(threads))
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	for _, g := range []struct {
		name, help string
		v          float64
	}{
		{"go_memstats_alloc_bytes", "Number of heap bytes allocated and currently in use.", float64(ms.Alloc)},
		{"go_memstats_heap_inuse_bytes", "Number of heap bytes that are in use.", float64(ms.HeapInuse)},
		{"go_memstats_heap_objects", "Number of currently allocated objects.", float64(ms.HeapObjects)},
		{"go_memstats_sys_bytes", "Number of bytes obtained from system.", float64(ms.Sys)},
		{"go_memstats_last_gc_time_seconds", "Number of seconds since 1970 of last garbage collection.", float64(ms.LastGC) / 1e9},
	} {
		e.family(g.name, "gauge", g.help)
		e.sample(g.name, "", "", g.v)
	}
	e.family("go_gc_cycles_total", "counter", "Completed garbage collection cycles.")
	e.sample("go_gc_cycles_total", "", "", float64(ms.NumGC))
}

// clockTicks is USER_HZ, the unit of /proc's times: 100 on every Linux
// architecture Go supports (Prometheus's procfs assumes the same).
const clockTicks = 100

// writeProcess writes the process's metrics from /proc under the names
// client_golang's process collector gives them. What cannot be read is left
// out, as that collector does.
func writeProcess(e *encoder) {
	if st, err := readStat(); err == nil {
		e.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
		e.sample("process_cpu_seconds_total", "", "", float64(st.utime+st.stime)/clockTicks)
		e.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
		e.sample("process_virtual_memory_bytes", "", "", float64(st.vsize))
		e.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
		e.sample("process_resident_memory_bytes", "", "", float64(st.rss*int64(os.Getpagesize())))
		if boot, err := bootTime(); err == nil {
			e.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.")
			e.sample("process_start_time_seconds", "", "", float64(boot)+float64(st.starttime)/clockTicks)
		}
	}
	if f, err := os.Open("/proc/self/fd"); err == nil {
		names, err := f.Readdirnames(-1)
		f.Close()
		if err == nil {
			e.family("process_open_fds", "gauge", "Number of open file descriptors.")
			e.sample("process_open_fds", "", "", float64(len(names)-1)) // less the one reading the directory
		}
	}
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil {
		e.family("process_max_fds", "gauge", "Maximum number of open file descriptors.")
		e.sample("process_max_fds", "", "", float64(lim.Cur))
	}
}

type procStat struct {
	utime, stime, starttime, vsize, rss int64
}

// readStat reads /proc/self/stat (proc(5)): the fields after the command,
// which is in parentheses and may hold anything, even ") ".
func readStat() (procStat, error) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return procStat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, os.ErrInvalid
	}
	f := bytes.Fields(b[i+1:]) // f[0] is field 3, state
	if len(f) < 22 {
		return procStat{}, os.ErrInvalid
	}
	field := func(n int) int64 { // n as numbered in proc(5)
		v, _ := strconv.ParseInt(string(f[n-3]), 10, 64)
		return v
	}
	return procStat{utime: field(14), stime: field(15), starttime: field(22), vsize: field(23), rss: field(24)}, nil
}

// bootTime is the btime line of /proc/stat: the boot, in seconds since the epoch.
func bootTime() (int64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("btime ")); ok {
			return strconv.ParseInt(string(bytes.TrimSpace(v)), 10, 64)
		}
	}
	return 0, os.ErrNotExist
}
