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

	"github.com/handoff-dev/handoff/loadgen"
)

func BenchmarkUpgradeUnderLoad(b *testing.B) {
	const (
		rate     = 2000
		upgrades = 20
		window   = time.Second // "after an upgrade" = [HUP, HUP+window)
		slow     = 800 * time.Millisecond
	)
	s := startServer(b, serverOpts{upgradeTimeout: "10s", drainTimeout: "10s"})
	first := s.pid()

	// Peak RSS (VmHWM) of every handoff process, sampled every 100 ms.
	var rssMu sync.Mutex
	peakKiB := map[int]int64{}
	rssStop, rssDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(rssDone)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			for _, p := range groupProcs(s.pgid) {
				if kib, ok := vmHWM(p); ok {
					rssMu.Lock()
					if kib > peakKiB[p] {
						peakKiB[p] = kib
					}
					rssMu.Unlock()
				}
			}
			select {
			case <-rssStop:
				return
			case <-tick.C:
			}
		}
	}()
	stopRSS := sync.OnceFunc(func() { close(rssStop); <-rssDone })
	b.Cleanup(stopRSS)

	load := startLoad(b, s.bins, s.addr, rate,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", slow.String(), "--samples")
	load.waitFlowing(s.port)
	b.ResetTimer()

	type upgrade struct {
		hupNs          int64
		oldPID, newPID int
		version        string
	}
	var ups []upgrade
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; i < upgrades; i++ {
		<-tick.C // pacing: one HUP per second at most
		old := s.pid()
		if len(ups) > 0 {
			// Let the previous generation finish draining, so that this HUP
			// upgrades at once instead of being queued.
			prev := ups[len(ups)-1].oldPID
			if !poll(15*time.Second, func() bool { return !alive(prev) }) {
				b.Errorf("upgrade %d: generation %d still alive 15s after being replaced", i, prev)
				break
			}
		}
		v := nextVersion(s.version)
		s.deploy(v)
		hup := time.Now().UnixNano()
		s.signal(old, syscall.SIGHUP)
		var p int
		if !poll(15*time.Second, func() bool {
			var err error
			p, err = s.readPID()
			return err == nil && p != old
		}) {
			b.Errorf("upgrade %d: PID file still names %d 15s after SIGHUP", i+1, old)
			break
		}
		s.version = v
		ups = append(ups, upgrade{hupNs: hup, oldPID: old, newPID: p, version: v})
	}
	<-tick.C // keep the load on for the window after the last upgrade
	if len(ups) > 0 {
		last := ups[len(ups)-1].oldPID
		poll(15*time.Second, func() bool { return !alive(last) })
	}
	res, sent := load.stop()
	b.StopTimer()
	stopRSS()

	// Requests and failures.
	b.ReportMetric(float64(res.Requests), "requests")
	b.ReportMetric(float64(res.Failed), "failures")
	kinds := make([]string, 0, len(res.Failures))
	for k := range res.Failures {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	byKind := make([]string, 0, len(kinds))
	for _, k := range kinds {
		b.ReportMetric(float64(res.Failures[k]), "failures-"+k)
		byKind = append(byKind, fmt.Sprintf("%s=%d", k, res.Failures[k]))
	}

	// Upgrades done: distinct PIDs other than the first one that answered.
	done := 0
	for _, p := range res.PIDs {
		if p.PID != first && p.PID != 0 {
			done++
		}
	}
	b.ReportMetric(float64(done), "upgrades")

	// Handoff time: HUP -> first response from the new PID.
	var handoffMs []float64
	hand := make([]string, len(ups))
	for i, u := range ups {
		hand[i] = "-"
		if ps, ok := pidStat(res, u.newPID); ok && ps.First > 0 {
			ms := float64(ps.First-u.hupNs) / 1e6
			handoffMs = append(handoffMs, ms)
			hand[i] = fmt.Sprintf("%.1f", ms)
		}
	}
	b.ReportMetric(percentile(handoffMs, 50), "handoff-median-ms")
	b.ReportMetric(maxOf(handoffMs), "handoff-max-ms")

	// Latency of OK requests overall and in the window after each HUP. 2% of
	// the requests are /slow ones that take 800 ms by design, so p99 is
	// theirs; the "fast" figures leave out every request of 800 ms or more
	// (a normal request delayed that much still shows in the max).
	var all, after, fastAll, fastAfter []float64
	perUp := make([][]float64, len(ups))
	slowMs := float64(slow.Milliseconds())
	for _, smp := range res.Samples {
		if !smp.OK {
			continue
		}
		ms := float64(smp.LatencyUS) / 1000
		all = append(all, ms)
		fast := ms < slowMs
		if fast {
			fastAll = append(fastAll, ms)
		}
		in := false
		for i, u := range ups {
			if smp.Start >= u.hupNs && smp.Start < u.hupNs+int64(window) {
				if fast {
					perUp[i] = append(perUp[i], ms)
				}
				in = true
			}
		}
		if in {
			after = append(after, ms)
			if fast {
				fastAfter = append(fastAfter, ms)
			}
		}
	}
	b.ReportMetric(percentile(all, 50), "p50-ms")
	b.ReportMetric(percentile(all, 99), "p99-ms")
	b.ReportMetric(maxOf(all), "max-ms")
	b.ReportMetric(percentile(after, 50), "after-upgrade-p50-ms")
	b.ReportMetric(percentile(after, 99), "after-upgrade-p99-ms")
	b.ReportMetric(maxOf(after), "after-upgrade-max-ms")
	b.ReportMetric(percentile(fastAll, 99), "fast-p99-ms")
	b.ReportMetric(percentile(fastAfter, 99), "fast-after-upgrade-p99-ms")

	// Peak RSS per generation.
	rssMu.Lock()
	var rssMiB []float64
	genRSS := map[int]float64{}
	for p, kib := range peakKiB {
		genRSS[p] = float64(kib) / 1024
		rssMiB = append(rssMiB, genRSS[p])
	}
	rssMu.Unlock()
	b.ReportMetric(maxOf(rssMiB), "rss-max-MiB")
	b.ReportMetric(percentile(rssMiB, 50), "rss-median-MiB")

	// A readable table. The testing package keeps only the first 10 lines
	// of a benchmark's output, so the per-upgrade table is transposed: one
	// row per figure, one column per upgrade.
	var t strings.Builder
	fmt.Fprintf(&t, "%d requests in %v at %d/s, %d failed [%s]; %d upgrades done (%d HUPs), peak RSS per generation max %.1f median %.1f MiB\n",
		res.Requests, sent.Round(time.Millisecond), rate, res.Failed, strings.Join(byKind, " "), done, len(ups), maxOf(rssMiB), percentile(rssMiB, 50))
	fmt.Fprintf(&t, "latency ms, all OK requests (2%% are %v slow by design): p50 %.2f p99 %.2f max %.2f; fast ones (< %v): p50 %.2f p99 %.2f\n",
		slow, percentile(all, 50), percentile(all, 99), maxOf(all), slow, percentile(fastAll, 50), percentile(fastAll, 99))
	fmt.Fprintf(&t, "in the %v after each HUP: p50 %.2f p99 %.2f max %.2f; fast ones p99 %.2f; handoff (HUP -> first response from the new pid) median %.1f max %.1f ms\n",
		window, percentile(after, 50), percentile(after, 99), maxOf(after), percentile(fastAfter, 99), percentile(handoffMs, 50), maxOf(handoffMs))
	row := func(name string, cell func(i int, u upgrade) string) {
		fmt.Fprintf(&t, "%-22s", name)
		for i, u := range ups {
			fmt.Fprintf(&t, " %6s", cell(i, u))
		}
		t.WriteByte('\n')
	}
	row("upgrade", func(i int, _ upgrade) string { return fmt.Sprint(i + 1) })
	row("version", func(_ int, u upgrade) string { return u.version })
	row("handoff ms", func(i int, _ upgrade) string { return hand[i] })
	row("fast p99 ms after HUP", func(i int, _ upgrade) string { return fmt.Sprintf("%.2f", percentile(perUp[i], 99)) })
	row("responses from new pid", func(_ int, u upgrade) string { return fmt.Sprint(countOf(res, u.newPID)) })
	row("peak RSS MiB new pid", func(_ int, u upgrade) string { return fmt.Sprintf("%.1f", genRSS[u.newPID]) })
	b.Log(strings.TrimSuffix(t.String(), "\n"))
	if res.Failed > 0 {
		b.Logf("first failures:\n%s", strings.Join(res.Errors, "\n"))
	}
}

// countOf returns how many responses the load tool got from pid.
func countOf(res *loadgen.Result, pid int) int64 {
	ps, _ := pidStat(res, pid)
	return ps.Count
}
