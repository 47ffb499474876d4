package main_test

// BenchmarkUpgradeUnderLoad measures what a client sees of 20 upgrades done
// 1 s apart under 2000 req/s, and the memory of each generation:
//
//	go test -run '^$' -bench BenchmarkUpgradeUnderLoad -benchtime 1x .
//
// It reports metrics and never asserts speed; it fails only when the server
// cannot start or an upgrade does not happen at all.

import (
	"fmt"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
	"github.com/handoff-dev/handoff/internal/loadgen"
)

func BenchmarkUpgradeUnderLoad(b *testing.B) {
	const (
		rate     = 2000
		upgrades = 20
		window   = time.Second // "after an upgrade" = [HUP, HUP+window)
		slow     = 800 * time.Millisecond
	)
	s := itest.StartServer(b, itest.ServerOpts{UpgradeTimeout: "10s", DrainTimeout: "10s"})
	first := s.LivePID()

	// Peak RSS (VmHWM) of every handoff process.
	rss := sampleHWM(b, 100*time.Millisecond, func() []int { return itest.GroupProcs(s.Proc.PID) })

	load := itest.StartLoad(b, s.Addr, rate,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", slow.String(), "--samples")
	b.ResetTimer()

	type upgrade struct {
		benchUpgrade // startNs: when the HUP was sent
		version      string
	}
	var ups []upgrade
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; i < upgrades; i++ {
		<-tick.C // pacing: one HUP per second at most
		old := s.LivePID()
		if !replacedGone(b, ups, i+1, "generation") {
			break
		}
		v := itest.NextVersion(s.Version)
		s.Deploy(v)
		hup := time.Now().UnixNano()
		s.Signal(old, syscall.SIGHUP)
		var p int
		if !itest.Poll(15*time.Second, func() bool {
			var err error
			p, err = s.ReadPID()
			return err == nil && p != old
		}) {
			b.Errorf("upgrade %d: PID file still names %d 15s after SIGHUP", i+1, old)
			break
		}
		s.Version = v
		ups = append(ups, upgrade{benchUpgrade{startNs: hup, oldPID: old, newPID: p}, v})
	}
	res, sent := finishLoad(b, tick, ups, load, rss)
	// 2% of the requests are /slow ones that take 800 ms by design, so p99 is
	// theirs; the "fast" figures leave them out.
	f := reportLoad(b, res, first, ups, window, slow)

	// Peak RSS per generation.
	var rssMiB []float64
	genRSS := map[int]float64{}
	for p, kib := range rss.kib {
		genRSS[p] = float64(kib) / 1024
		rssMiB = append(rssMiB, genRSS[p])
	}
	b.ReportMetric(maxOf(rssMiB), "rss-max-MiB")
	b.ReportMetric(percentile(rssMiB, 50), "rss-median-MiB")

	// A readable table. The testing package keeps only the first 10 lines
	// of a benchmark's output, so the per-upgrade table is transposed: one
	// row per figure, one column per upgrade.
	// A readable table (see tableRows).
	var t strings.Builder
	fmt.Fprintf(&t, "%d requests in %v at %d/s, %d failed [%s]; %d upgrades done (%d HUPs), peak RSS per generation max %.1f median %.1f MiB\n",
		res.Requests, sent.Round(time.Millisecond), rate, res.Failed, strings.Join(f.byKind, " "), f.done, len(ups), maxOf(rssMiB), percentile(rssMiB, 50))
	f.writeLatency(&t, slow)
	fmt.Fprintf(&t, "in the %v after each HUP: p50 %.2f p99 %.2f max %.2f; fast ones p99 %.2f; handoff (HUP -> first response from the new pid) median %.1f max %.1f ms\n",
		window, percentile(f.after, 50), percentile(f.after, 99), maxOf(f.after), percentile(f.fastAfter, 99), percentile(f.handoffMs, 50), maxOf(f.handoffMs))
	row := tableRows(&t, ups)
	row("upgrade", func(i int, _ upgrade) string { return fmt.Sprint(i + 1) })
	row("version", func(_ int, u upgrade) string { return u.version })
	row("handoff ms", func(i int, _ upgrade) string { return f.hand[i] })
	row("fast p99 ms after HUP", func(i int, _ upgrade) string { return fmt.Sprintf("%.2f", percentile(f.perUp[i], 99)) })
	row("responses from new pid", func(_ int, u upgrade) string { return fmt.Sprint(countOf(res, u.newPID)) })
	row("peak RSS MiB new pid", func(_ int, u upgrade) string { return fmt.Sprintf("%.1f", genRSS[u.newPID]) })
	f.log(b, &t)
}

// ---------------------------------------------------------------------------
// Shared by BenchmarkUpgradeUnderLoad and BenchmarkRunNodeUnderLoad.

// benchUpgrade is what both load benchmarks record of every upgrade.
type benchUpgrade struct {
	startNs        int64 // when it was asked for (SIGHUP sent, handoff upgrade started)
	oldPID, newPID int
}

func (u benchUpgrade) base() benchUpgrade { return u }

// upgradeRecord is a benchmark's record of an upgrade: a benchUpgrade, or a
// struct that embeds one.
type upgradeRecord interface{ base() benchUpgrade }

// hwmSampler records the peak RSS (VmHWM, KiB) of every process it saw.
type hwmSampler struct {
	mu   sync.Mutex
	kib  map[int]int64 // by pid; read it once stop has returned
	stop func()        // ends the sampling and waits for it; idempotent
}

// sampleHWM reads VmHWM of the processes pids returns every period, until
// stop or the end of the benchmark. VmHWM only grows, so a process that exits
// between two samples loses at most what it gained since the last one.
func sampleHWM(tb testing.TB, every time.Duration, pids func() []int) *hwmSampler {
	h := &hwmSampler{kib: map[int]int64{}}
	h.stop = itest.Every(tb, every, func() {
		for _, p := range pids() {
			if kib, ok := itest.VmHWM(p); ok {
				h.mu.Lock()
				h.kib[p] = max(h.kib[p], kib)
				h.mu.Unlock()
			}
		}
	})
	return h
}

func (h *hwmSampler) peak(pid int) int64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.kib[pid]
}

// replacedGone waits (15s) for the process the last of ups replaced to exit,
// so that upgrade n starts at once instead of being queued behind its drain.
// It fails b and returns false when that process (a what) is still alive.
func replacedGone[U upgradeRecord](b *testing.B, ups []U, n int, what string) bool {
	b.Helper()
	if len(ups) == 0 {
		return true
	}
	prev := ups[len(ups)-1].base().oldPID
	if !itest.Poll(15*time.Second, func() bool { return !itest.Alive(prev) }) {
		b.Errorf("upgrade %d: %s %d still alive 15s after being replaced", n, what, prev)
		return false
	}
	return true
}

// finishLoad keeps the load on for one more tick (the window after the last
// upgrade), waits (15s, unchecked) for the last replaced process to exit,
// then stops the load, the benchmark timer and rss.
func finishLoad[U upgradeRecord](b *testing.B, tick *time.Ticker, ups []U, load *itest.Load, rss *hwmSampler) (*loadgen.Result, time.Duration) {
	b.Helper()
	<-tick.C
	if len(ups) > 0 {
		last := ups[len(ups)-1].base().oldPID
		itest.Poll(15*time.Second, func() bool { return !itest.Alive(last) })
	}
	res, sent := load.Stop()
	b.StopTimer()
	rss.stop()
	return res, sent
}

// loadFigures are what the client saw in a load benchmark.
type loadFigures struct {
	res    *loadgen.Result
	byKind []string // "kind=count", by kind
	done   int      // upgrades done: distinct PIDs that answered, other than the first
	// handoffMs: upgrade start -> first response from the new PID, for each
	// upgrade whose new PID answered; hand is the same per upgrade, as text
	// ("-" when it never answered).
	handoffMs []float64
	hand      []string
	// Latency in ms of the OK requests, overall and in the window after each
	// upgrade start; the fast ones are those under slow. perUp holds the fast
	// ones of each upgrade's window.
	all, after, fastAll, fastAfter []float64
	perUp                          [][]float64
}

// reportLoad computes the figures of res and reports them: requests,
// failures, failures-KIND, upgrades, handoff-median-ms, handoff-max-ms,
// p50-ms, p99-ms, max-ms, after-upgrade-{p50,p99,max}-ms, fast-p99-ms and
// fast-after-upgrade-p99-ms. first is the PID that answered first, window
// how long "after an upgrade" lasts, and slow the latency from which on a
// request does not count as fast (the /slow requests take that long by design).
func reportLoad[U upgradeRecord](b *testing.B, res *loadgen.Result, first int, ups []U, window, slow time.Duration) *loadFigures {
	f := &loadFigures{res: res}

	// Requests and failures.
	b.ReportMetric(float64(res.Requests), "requests")
	b.ReportMetric(float64(res.Failed), "failures")
	kinds := make([]string, 0, len(res.Failures))
	for k := range res.Failures {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	f.byKind = make([]string, 0, len(kinds))
	for _, k := range kinds {
		b.ReportMetric(float64(res.Failures[k]), "failures-"+k)
		f.byKind = append(f.byKind, fmt.Sprintf("%s=%d", k, res.Failures[k]))
	}

	// Upgrades done.
	for _, p := range res.PIDs {
		if p.PID != first && p.PID != 0 {
			f.done++
		}
	}
	b.ReportMetric(float64(f.done), "upgrades")

	// Handoff time.
	f.hand = make([]string, len(ups))
	for i, u := range ups {
		f.hand[i] = "-"
		if ps, ok := itest.PIDStat(res, u.base().newPID); ok && ps.First > 0 {
			ms := float64(ps.First-u.base().startNs) / 1e6
			f.handoffMs = append(f.handoffMs, ms)
			f.hand[i] = fmt.Sprintf("%.1f", ms)
		}
	}
	b.ReportMetric(percentile(f.handoffMs, 50), "handoff-median-ms")
	b.ReportMetric(maxOf(f.handoffMs), "handoff-max-ms")

	// Latency. A normal request delayed past slow still shows in the max.
	f.perUp = make([][]float64, len(ups))
	slowMs := float64(slow.Milliseconds())
	for _, smp := range res.Samples {
		if !smp.OK {
			continue
		}
		ms := float64(smp.LatencyUS) / 1000
		f.all = append(f.all, ms)
		fast := ms < slowMs
		if fast {
			f.fastAll = append(f.fastAll, ms)
		}
		in := false
		for i, u := range ups {
			if start := u.base().startNs; smp.Start >= start && smp.Start < start+int64(window) {
				if fast {
					f.perUp[i] = append(f.perUp[i], ms)
				}
				in = true
			}
		}
		if in {
			f.after = append(f.after, ms)
			if fast {
				f.fastAfter = append(f.fastAfter, ms)
			}
		}
	}
	b.ReportMetric(percentile(f.all, 50), "p50-ms")
	b.ReportMetric(percentile(f.all, 99), "p99-ms")
	b.ReportMetric(maxOf(f.all), "max-ms")
	b.ReportMetric(percentile(f.after, 50), "after-upgrade-p50-ms")
	b.ReportMetric(percentile(f.after, 99), "after-upgrade-p99-ms")
	b.ReportMetric(maxOf(f.after), "after-upgrade-max-ms")
	b.ReportMetric(percentile(f.fastAll, 99), "fast-p99-ms")
	b.ReportMetric(percentile(f.fastAfter, 99), "fast-after-upgrade-p99-ms")
	return f
}

// writeLatency writes the table line of the latency of all OK requests.
func (f *loadFigures) writeLatency(t *strings.Builder, slow time.Duration) {
	fmt.Fprintf(t, "latency ms, all OK requests (2%% are %v slow by design): p50 %.2f p99 %.2f max %.2f; fast ones (< %v): p50 %.2f p99 %.2f\n",
		slow, percentile(f.all, 50), percentile(f.all, 99), maxOf(f.all), slow, percentile(f.fastAll, 50), percentile(f.fastAll, 99))
}

// log logs the table t, then the first failures if any.
func (f *loadFigures) log(b *testing.B, t *strings.Builder) {
	b.Helper()
	b.Log(strings.TrimSuffix(t.String(), "\n"))
	if f.res.Failed > 0 {
		b.Logf("first failures:\n%s", strings.Join(f.res.Errors, "\n"))
	}
}

// tableRows returns a function that writes a row of the per-upgrade table
// to t: its name, then one column per upgrade of ups, cell(i, ups[i]) in it.
// The table is transposed because the testing package keeps only the first
// lines of a benchmark's output.
func tableRows[U any](t *strings.Builder, ups []U) func(name string, cell func(i int, u U) string) {
	return func(name string, cell func(i int, u U) string) {
		fmt.Fprintf(t, "%-22s", name)
		for i, u := range ups {
			fmt.Fprintf(t, " %6s", cell(i, u))
		}
		t.WriteByte('\n')
	}
}

// countOf returns how many responses the load tool got from pid.
func countOf(res *loadgen.Result, pid int) int64 {
	ps, _ := itest.PIDStat(res, pid)
	return ps.Count
}

// percentile returns the nearest-rank p-th percentile (0..100) of xs.
func percentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	i := int(p/100*float64(len(s))+0.5) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(s) {
		i = len(s) - 1
	}
	return s[i]
}

func maxOf(xs []float64) float64 {
	m := 0.0
	for _, x := range xs {
		if x > m {
			m = x
		}
	}
	return m
}
