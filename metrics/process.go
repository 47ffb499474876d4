package metrics

import (
	"bytes"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"syscall"
	"time"
)

// writeRuntime writes the Go runtime's metrics under the names client_golang's
// Go collector gives them (its classic memstats set), so that existing
// dashboards work.
func writeRuntime(e *encoder) {
	var gc debug.GCStats
	gc.PauseQuantiles = make([]time.Duration, 5) // min, 25%, 50%, 75%, max
	debug.ReadGCStats(&gc)
	e.family("go_gc_duration_seconds", "summary", "A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.")
	for i, q := range []string{"0", "0.25", "0.5", "0.75", "1"} {
		e.sample("go_gc_duration_seconds", "quantile", q, gc.PauseQuantiles[i].Seconds())
	}
	e.sample("go_gc_duration_seconds_sum", "", "", gc.PauseTotal.Seconds())
	e.sample("go_gc_duration_seconds_count", "", "", float64(gc.NumGC))
	e.family("go_goroutines", "gauge", "Number of goroutines that currently exist.")
	e.sample("go_goroutines", "", "", float64(runtime.NumGoroutine()))
	e.family("go_info", "gauge", "Information about the Go environment.")
	e.sample("go_info", "version", runtime.Version(), 1)
	threads, _ := runtime.ThreadCreateProfile(nil)
	e.family("go_threads", "gauge", "Number of OS threads created.")
	e.sample("go_threads", "", "", float64(threads))
	e.family("go_sched_gomaxprocs_threads", "gauge", "The current runtime.GOMAXPROCS setting, or the number of operating system threads that can execute user-level Go code simultaneously.")
	e.sample("go_sched_gomaxprocs_threads", "", "", float64(runtime.GOMAXPROCS(0)))
	e.family("go_gc_gomemlimit_bytes", "gauge", "Go runtime memory limit configured by the user, otherwise math.MaxInt64.")
	e.sample("go_gc_gomemlimit_bytes", "", "", float64(debug.SetMemoryLimit(-1))) // -1 reads it
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	for _, m := range []struct {
		name, typ, help string
		v               uint64
	}{
		{"alloc_bytes", "gauge", "Number of bytes allocated in heap and currently in use.", ms.Alloc},
		{"alloc_bytes_total", "counter", "Total number of bytes allocated in heap until now, even if released already.", ms.TotalAlloc},
		{"sys_bytes", "gauge", "Number of bytes obtained from system.", ms.Sys},
		{"lookups_total", "counter", "Total number of pointer lookups.", ms.Lookups},
		{"mallocs_total", "counter", "Total number of heap objects allocated, both live and gc-ed.", ms.Mallocs},
		{"frees_total", "counter", "Total number of heap objects frees.", ms.Frees},
		{"heap_alloc_bytes", "gauge", "Number of heap bytes allocated and currently in use.", ms.HeapAlloc},
		{"heap_sys_bytes", "gauge", "Number of heap bytes obtained from system.", ms.HeapSys},
		{"heap_idle_bytes", "gauge", "Number of heap bytes waiting to be used.", ms.HeapIdle},
		{"heap_inuse_bytes", "gauge", "Number of heap bytes that are in use.", ms.HeapInuse},
		{"heap_released_bytes", "gauge", "Number of heap bytes released to OS.", ms.HeapReleased},
		{"heap_objects", "gauge", "Number of currently allocated objects.", ms.HeapObjects},
		{"stack_inuse_bytes", "gauge", "Number of bytes obtained from system for stack allocator in non-CGO environments.", ms.StackInuse},
		{"stack_sys_bytes", "gauge", "Number of bytes obtained from system for stack allocator.", ms.StackSys},
		{"mspan_inuse_bytes", "gauge", "Number of bytes in use by mspan structures.", ms.MSpanInuse},
		{"mspan_sys_bytes", "gauge", "Number of bytes used for mspan structures obtained from system.", ms.MSpanSys},
		{"mcache_inuse_bytes", "gauge", "Number of bytes in use by mcache structures.", ms.MCacheInuse},
		{"mcache_sys_bytes", "gauge", "Number of bytes used for mcache structures obtained from system.", ms.MCacheSys},
		{"buck_hash_sys_bytes", "gauge", "Number of bytes used by the profiling bucket hash table.", ms.BuckHashSys},
		{"gc_sys_bytes", "gauge", "Number of bytes used for garbage collection system metadata.", ms.GCSys},
		{"other_sys_bytes", "gauge", "Number of bytes used for other system allocations.", ms.OtherSys},
		{"next_gc_bytes", "gauge", "Number of heap bytes when next garbage collection will take place.", ms.NextGC},
	} {
		name := "go_memstats_" + m.name
		e.family(name, m.typ, m.help)
		e.sample(name, "", "", float64(m.v))
	}
	e.family("go_memstats_last_gc_time_seconds", "gauge", "Number of seconds since 1970 of last garbage collection.")
	e.sample("go_memstats_last_gc_time_seconds", "", "", float64(ms.LastGC)/1e9)
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
	if syscall.Getrlimit(syscall.RLIMIT_AS, &lim) == nil {
		e.family("process_virtual_memory_max_bytes", "gauge", "Maximum amount of virtual memory available in bytes.")
		e.sample("process_virtual_memory_max_bytes", "", "", float64(lim.Cur))
	}
	if rx, tx, err := netDev(); err == nil {
		e.family("process_network_receive_bytes_total", "counter", "Number of bytes received by the process over the network.")
		e.sample("process_network_receive_bytes_total", "", "", float64(rx))
		e.family("process_network_transmit_bytes_total", "counter", "Number of bytes sent by the process over the network.")
		e.sample("process_network_transmit_bytes_total", "", "", float64(tx))
	}
}

// netDev sums the bytes received and sent over every interface of the
// process's network namespace (/proc/self/net/dev), as procfs does.
func netDev() (rx, tx uint64, err error) {
	b, err := os.ReadFile("/proc/self/net/dev")
	if err != nil {
		return 0, 0, err
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		_, counters, ok := bytes.Cut(line, []byte(":"))
		if !ok {
			continue // the two header lines
		}
		f := bytes.Fields(counters) // receive: bytes packets ... (8), transmit: bytes ...
		if len(f) < 9 {
			continue
		}
		r, _ := strconv.ParseUint(string(f[0]), 10, 64)
		t, _ := strconv.ParseUint(string(f[8]), 10, 64)
		rx, tx = rx+r, tx+t
	}
	return rx, tx, nil
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
