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
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
)

var readyInRE = regexp.MustCompile(`ready in ([0-9.]+) ms`)

func BenchmarkRunNodeUnderLoad(b *testing.B) {
	const (
		rate     = 2000
		upgrades = 20
		window   = time.Second // "after an upgrade" = [upgrade start, +window)
		slow     = 800 * time.Millisecond
	)
	h := itest.StartRunner(b, itest.RunnerOpts{ReadyTimeout: "10s", DrainTimeout: "10s"})
	first := h.ServingChild()

	// Peak RSS (VmHWM) of every child of handoff, and of handoff.
	rss := sampleHWM(b, 100*time.Millisecond, func() []int {
		pids := []int{h.PID}
		for _, k := range itest.Children(h.PID) {
			pids = append(pids, k.PID)
		}
		return pids
	})

	load := itest.StartLoad(b, h.Addr, rate,
		"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", slow.String(), "--samples")
	b.ResetTimer()

	type upgrade struct {
		benchUpgrade         // startNs: when handoff upgrade was started
		readyMs      float64 // as handoff upgrade reports it: new child started -> ready
		cliMs        float64 // handoff upgrade's whole run
	}
	var ups []upgrade
	cur := first
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; i < upgrades; i++ {
		<-tick.C // pacing: one upgrade per second at most
		if !replacedGone(b, ups, i+1, "child") {
			break
		}
		start := time.Now()
		r := h.UpgradeCLI(b)
		cli := time.Since(start)
		_, newPID, ok := itest.ParseRunUpgraded(r.Stdout)
		if r.Code != 0 || !ok {
			b.Errorf("upgrade %d: %v", i+1, r)
			break
		}
		out := r.Stdout
		u := upgrade{benchUpgrade: benchUpgrade{startNs: start.UnixNano(), oldPID: cur, newPID: newPID}, cliMs: float64(cli.Microseconds()) / 1000}
		if r := readyInRE.FindStringSubmatch(out); r != nil {
			u.readyMs, _ = strconv.ParseFloat(r[1], 64)
		}
		ups = append(ups, u)
		cur = newPID
	}
	res, sent := finishLoad(b, tick, ups, load, rss)
	// The "fast" figures leave out requests of 800 ms or more (2% are /slow
	// ones that take that long by design).
	f := reportLoad(b, res, first, ups, window, slow)
	var readyMs []float64
	for _, u := range ups {
		readyMs = append(readyMs, u.readyMs)
	}
	b.ReportMetric(percentile(readyMs, 50), "ready-median-ms")

	// Peak RSS of the node children and of handoff.
	var rssMiB []float64
	childRSS := map[int]float64{}
	for p, kib := range rss.kib {
		if p != h.PID {
			childRSS[p] = float64(kib) / 1024
			rssMiB = append(rssMiB, childRSS[p])
		}
	}
	handoffMiB := float64(rss.kib[h.PID]) / 1024
	b.ReportMetric(maxOf(rssMiB), "rss-child-max-MiB")
	b.ReportMetric(percentile(rssMiB, 50), "rss-child-median-MiB")
	b.ReportMetric(handoffMiB, "rss-handoff-MiB")

	// A readable table, transposed (one column per upgrade) because the
	// testing package keeps only the first lines of a benchmark's output.
	var t strings.Builder
	fmt.Fprintf(&t, "%d requests in %v at %d/s, %d failed [%s]; %d upgrades done (%d asked); peak RSS of node children max %.1f median %.1f MiB (%d children), of handoff %.1f MiB\n",
		res.Requests, sent.Round(time.Millisecond), rate, res.Failed, strings.Join(f.byKind, " "), f.done, len(ups),
		maxOf(rssMiB), percentile(rssMiB, 50), len(rssMiB), handoffMiB)
	f.writeLatency(&t, slow)
	fmt.Fprintf(&t, "in the %v after each upgrade start: p50 %.2f p99 %.2f max %.2f; fast ones p99 %.2f; handoff (upgrade start -> first response from the new child) median %.1f max %.1f ms; child ready median %.1f ms\n",
		window, percentile(f.after, 50), percentile(f.after, 99), maxOf(f.after), percentile(f.fastAfter, 99), percentile(f.handoffMs, 50), maxOf(f.handoffMs), percentile(readyMs, 50))
	row := tableRows(&t, ups)
	row("upgrade", func(i int, _ upgrade) string { return fmt.Sprint(i + 1) })
	row("handoff ms", func(i int, _ upgrade) string { return f.hand[i] })
	row("ready ms", func(_ int, u upgrade) string { return fmt.Sprintf("%.0f", u.readyMs) })
	row("fast p99 ms after", func(i int, _ upgrade) string { return fmt.Sprintf("%.2f", percentile(f.perUp[i], 99)) })
	row("responses from new", func(_ int, u upgrade) string { return fmt.Sprint(countOf(res, u.newPID)) })
	row("peak RSS MiB new", func(_ int, u upgrade) string { return fmt.Sprintf("%.1f", childRSS[u.newPID]) })
	f.log(b, &t)
}
