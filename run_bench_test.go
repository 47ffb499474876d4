package main_test

// BenchmarkRunNodeUnderLoad is BenchmarkUpgradeUnderLoad for `handoff run`:
// what a client sees of 20 upgrades of the Node.js example, done 1 s apart with
// `handoff upgrade --wait` under 2000 req/s, and the memory of the children and
// of handoff itself:
//
//	go test -run '^$' -bench BenchmarkRunNodeUnderLoad -benchtime 1x .
//
// It reports metrics and never asserts speed; it fails only when handoff run
// cannot start or an upgrade does not happen at all. Skipped without node.

import (
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

var hrunReadyInRE = regexp.MustCompile(`ready in ([0-9.]+) ms`)

func BenchmarkRunNodeUnderLoad(b *testing.B) {
	const (
		rate     = 2000
		upgrades = 20
		window   = time.Second // "after an upgrade" = [upgrade start, +window)
		slow     = 800 * time.Millisecond
	)
	h := startHrun(b, hrunOpts{readyTimeout: "10s", drainTimeout: "10s"})
	first := h.servingChild()

	// Peak RSS (VmHWM) of every child of handoff, and of handoff, every 100 ms.
	var rssMu sync.Mutex
	childKiB := map[int]int64{}
	var handoffKiB int64
	rssStop, rssDone := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(rssDone)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			kids := hrunKids(h.pid)
			rssMu.Lock()
			for _, k := range kids {
				if kib, ok := vmHWM(k.pid); ok && kib > childKiB[k.pid] {
					childKiB[k.pid] = kib
				}
			}
			if kib, ok := vmHWM(h.pid); ok && kib > handoffKiB {
				handoffKiB = kib
			}
			rssMu.Unlock()
			select {
			case <-rssStop:
				return
			case <-tick.C:
			}
		}
	}()
	stopRSS := sync.OnceFunc(func() { close(rssStop); <-rssDone })
	b.Cleanup(stopRSS)

	load := startLoad(b, h.bins, h.addr, rate,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", slow.String(), "--samples")
	load.waitFlowing(h.port)
	b.ResetTimer()

	type upgrade struct {
		startNs        int64
		oldPID, newPID int
		readyMs        float64 // as handoff upgrade reports it: new child started -> ready
		cliMs          float64 // handoff upgrade's whole run
	}
	var ups []upgrade
	cur := first
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; i < upgrades; i++ {
		<-tick.C // pacing: one upgrade per second at most
		if len(ups) > 0 {
			// Let the previous child finish draining, so that this upgrade
			// starts at once instead of being queued behind the drain.
			prev := ups[len(ups)-1].oldPID
			if !poll(15*time.Second, func() bool { return !alive(prev) }) {
				b.Errorf("upgrade %d: child %d still alive 15s after being replaced", i+1, prev)
				break
			}
		}
		start := time.Now()
		code, out, errOut := hrunCLI(b, h.bins, 60*time.Second, "upgrade", "--pidfile", h.pidfile, "--wait")
		cli := time.Since(start)
		m := hrunUpgradedRE.FindStringSubmatch(out)
		if code != 0 || m == nil {
			b.Errorf("upgrade %d: handoff upgrade exit %d\nstdout: %s\nstderr: %s", i+1, code, out, errOut)
			break
		}
		newPID, _ := strconv.Atoi(m[2])
		u := upgrade{startNs: start.UnixNano(), oldPID: cur, newPID: newPID, cliMs: float64(cli.Microseconds()) / 1000}
		if r := hrunReadyInRE.FindStringSubmatch(out); r != nil {
			u.readyMs, _ = strconv.ParseFloat(r[1], 64)
		}
		ups = append(ups, u)
		cur = newPID
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

	// Upgrades done: distinct child PIDs other than the first that answered.
	done := 0
	for _, p := range res.PIDs {
		if p.PID != first && p.PID != 0 {
			done++
		}
	}
	b.ReportMetric(float64(done), "upgrades")

	// Handoff time: upgrade start -> first response from the new child.
	var handoffMs, readyMs []float64
	hand := make([]string, len(ups))
	for i, u := range ups {
		hand[i] = "-"
		readyMs = append(readyMs, u.readyMs)
		if ps, ok := pidStat(res, u.newPID); ok && ps.First > 0 {
			ms := float64(ps.First-u.startNs) / 1e6
			handoffMs = append(handoffMs, ms)
			hand[i] = fmt.Sprintf("%.1f", ms)
		}
	}
	b.ReportMetric(percentile(handoffMs, 50), "handoff-median-ms")
	b.ReportMetric(maxOf(handoffMs), "handoff-max-ms")
	b.ReportMetric(percentile(readyMs, 50), "ready-median-ms")

	// Latency of OK requests overall and in the window after each upgrade
	// start; the "fast" figures leave out requests of 800 ms or more (2% are
	// /slow ones that take that long by design).
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
			if smp.Start >= u.startNs && smp.Start < u.startNs+int64(window) {
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

	// Peak RSS of the node children and of handoff.
	rssMu.Lock()
	var rssMiB []float64
	childRSS := map[int]float64{}
	for p, kib := range childKiB {
		childRSS[p] = float64(kib) / 1024
		rssMiB = append(rssMiB, childRSS[p])
	}
	handoffMiB := float64(handoffKiB) / 1024
	rssMu.Unlock()
	b.ReportMetric(maxOf(rssMiB), "rss-child-max-MiB")
	b.ReportMetric(percentile(rssMiB, 50), "rss-child-median-MiB")
	b.ReportMetric(handoffMiB, "rss-handoff-MiB")

	// A readable table, transposed (one column per upgrade) because the
	// testing package keeps only the first lines of a benchmark's output.
	var t strings.Builder
	fmt.Fprintf(&t, "%d requests in %v at %d/s, %d failed [%s]; %d upgrades done (%d asked); peak RSS of node children max %.1f median %.1f MiB (%d children), of handoff %.1f MiB\n",
		res.Requests, sent.Round(time.Millisecond), rate, res.Failed, strings.Join(byKind, " "), done, len(ups),
		maxOf(rssMiB), percentile(rssMiB, 50), len(rssMiB), handoffMiB)
	fmt.Fprintf(&t, "latency ms, all OK requests (2%% are %v slow by design): p50 %.2f p99 %.2f max %.2f; fast ones (< %v): p50 %.2f p99 %.2f\n",
		slow, percentile(all, 50), percentile(all, 99), maxOf(all), slow, percentile(fastAll, 50), percentile(fastAll, 99))
	fmt.Fprintf(&t, "in the %v after each upgrade start: p50 %.2f p99 %.2f max %.2f; fast ones p99 %.2f; handoff (upgrade start -> first response from the new child) median %.1f max %.1f ms; child ready median %.1f ms\n",
		window, percentile(after, 50), percentile(after, 99), maxOf(after), percentile(fastAfter, 99), percentile(handoffMs, 50), maxOf(handoffMs), percentile(readyMs, 50))
	row := func(name string, cell func(i int, u upgrade) string) {
		fmt.Fprintf(&t, "%-22s", name)
		for i, u := range ups {
			fmt.Fprintf(&t, " %6s", cell(i, u))
		}
		t.WriteByte('\n')
	}
	row("upgrade", func(i int, _ upgrade) string { return fmt.Sprint(i + 1) })
	row("handoff ms", func(i int, _ upgrade) string { return hand[i] })
	row("ready ms", func(_ int, u upgrade) string { return fmt.Sprintf("%.0f", u.readyMs) })
	row("fast p99 ms after", func(i int, _ upgrade) string { return fmt.Sprintf("%.2f", percentile(perUp[i], 99)) })
	row("responses from new", func(_ int, u upgrade) string { return fmt.Sprint(countOf(res, u.newPID)) })
	row("peak RSS MiB new", func(_ int, u upgrade) string { return fmt.Sprintf("%.1f", childRSS[u.newPID]) })
	b.Log(strings.TrimSuffix(t.String(), "\n"))
	if res.Failed > 0 {
		b.Logf("first failures:\n%s", strings.Join(res.Errors, "\n"))
	}
}
