package main_test

// Benchmarks of the move of idle keep-alive connections at a handoff:
//
//	go test -run '^$' -bench BenchmarkMigrate -benchtime 1x .
//
// They report metrics (b.ReportMetric) and a readable summary (b.Log) and
// never assert speed; they fail only when the server cannot start or an
// upgrade does not happen at all.

import (
	"fmt"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
)

// BenchmarkMigrateIdleClients: 200 non-polling keep-alive connections
// (testdata/clients/nonpolling.py, a request every 0.3-0.7 s each) across 20
// upgrades 1 s apart. "moves" upgrades to binaries that take moved
// connections; "nomoves-before" to the handoff_nomoves build, which plays an
// older binary (nothing moves: the drain as it was before).
func BenchmarkMigrateIdleClients(b *testing.B) {
	for _, c := range []struct{ name, version string }{{"moves", ""}, {"nomoves-before", "nomoves"}} {
		b.Run(c.name, func(b *testing.B) { benchIdleClients(b, c.version) })
	}
}

func benchIdleClients(b *testing.B, version string) {
	const conns, upgrades = 200, 20
	if version == "nomoves" {
		nomovesBinary(b)
	}
	s := itest.StartServer(b, itest.ServerOpts{UpgradeTimeout: "10s", DrainTimeout: "10s"})
	rss := sampleHWM(b, 20*time.Millisecond, func() []int { return itest.GroupProcs(s.Proc.PID) })
	c := startPyClient(b, s.Addr, conns)
	gens := []int{s.LivePID()}
	b.ResetTimer()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 1; i <= upgrades; i++ {
		<-tick.C // pacing, one upgrade a second
		v := version
		if v == "" {
			v = itest.NextVersion(s.Version)
		}
		s.Deploy(v)
		// Not s.UpgradeCLI: it logs, and a benchmark keeps only 10 lines of output.
		r := itest.CLI(b, "upgrade", "--pidfile", s.PIDFile, "--wait")
		if r.Code != 0 {
			b.Errorf("upgrade %d: %v", i, r)
			break
		}
		u := itest.ParseUpgraded(b, r)
		s.Version = v
		gens = append(gens, u.NewPID)
	}
	<-tick.C // the last generation serves for a second too
	b.StopTimer()
	sum := c.stop(b)
	stopServerToEOF(b, s)
	rss.stop()

	var drainMS []float64
	var moved []int64
	for _, p := range gens[:len(gens)-1] {
		l, _, ok := s.Logs.First(0, "drained", itest.PIDIs(p))
		if !ok {
			b.Errorf("generation %d logged no drained line", p)
			continue
		}
		d, _ := l.Num("duration")
		m, _ := l.Num("moved")
		drainMS = append(drainMS, float64(d)/1e6)
		moved = append(moved, m)
	}
	sameConn, anyConn := 0, 0
	for _, cn := range sum.Conns {
		pids := map[int]bool{}
		for _, g := range cn.Segments {
			for _, p := range g.PIDs {
				pids[p] = true
			}
		}
		if slices.ContainsFunc(cn.Segments, func(g pySegment) bool { return len(g.PIDs) >= 2 }) {
			sameConn++
		}
		if len(pids) >= 2 {
			anyConn++
		}
	}
	var mib []float64
	for _, p := range gens {
		mib = append(mib, float64(rss.peak(p))/1024)
	}
	b.ReportMetric(float64(sum.Requests), "requests")
	b.ReportMetric(float64(sum.Failed), "failed")
	b.ReportMetric(float64(sameConn), "conns-2gens-same-port")
	b.ReportMetric(percentile(drainMS, 50), "drain-p50-ms")
	b.ReportMetric(maxOf(drainMS), "drain-max-ms")
	b.ReportMetric(maxOf(mib), "rss-max-MiB")
	b.Logf("%d upgrades (%d generations); client: %d requests, %d failed %v, %d answers with Connection: close (then a new connection)\n"+
		"connections answered by >= 2 generations: %d of %d on the same client port, %d of %d on any of their ports\n"+
		"old generations' drain ms: median %.1f max %.1f; moved per handoff %v\n"+
		"peak RSS per generation MiB: median %.1f max %.1f",
		len(gens)-1, len(gens), sum.Requests, sum.Failed, sum.Failures, sum.Reconnects,
		sameConn, conns, anyConn, conns,
		percentile(drainMS, 50), maxOf(drainMS), moved,
		percentile(mib, 50), maxOf(mib))
}

// BenchmarkMigrateTenThousand: 10,000 idle keep-alive connections moved in
// one upgrade; then one request on every one of them.
func BenchmarkMigrateTenThousand(b *testing.B) {
	const conns = 10_000
	raiseNoFile(b, conns+1000) // each process holds every connection once
	s := itest.StartServer(b, itest.ServerOpts{UpgradeTimeout: "10s", DrainTimeout: "30s"})
	p1 := s.LivePID()
	rss := sampleHWM(b, 10*time.Millisecond, func() []int { return itest.GroupProcs(s.Proc.PID) })

	dialStart := time.Now()
	clients := make([]*rawClient, conns)
	errs := make([]error, conns)
	sem := make(chan struct{}, 200) // within the listen backlog
	var wg sync.WaitGroup
	for i := range clients {
		clients[i] = &rawClient{addr: s.Addr, id: i}
		b.Cleanup(clients[i].close)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			a, err := clients[i].roundTrip(30 * time.Second)
			if err == nil && (a.pid != p1 || a.close) {
				err = fmt.Errorf("%+v, want a keep-alive answer from %d", a, p1)
			}
			errs[i] = err
		})
	}
	wg.Wait()
	if err := firstErr(errs); err != nil {
		b.Fatalf("opening %d connections: %v", conns, err)
	}
	b.Logf("%d keep-alive connections open in %v", conns, time.Since(dialStart).Round(time.Millisecond))
	hwm1, _ := itest.VmHWM(p1)

	b.ResetTimer()
	hup := time.Now()
	s.Signal(p1, syscall.SIGHUP)
	p2 := s.WaitNewPID(p1, 30*time.Second)
	ready := time.Since(hup)
	// The old generation exits once it has moved every connection. One it
	// keeps (see settle) is answered there below, with Connection: close;
	// the moved ones must be asked before the new generation's
	// ReadHeaderTimeout (10 s) closes them (see
	// TestMigrateMovedConnectionKeepsIdleTimeout), so wait 5 s at most.
	goneIn := time.Duration(0)
	if itest.Poll(5*time.Second, func() bool { return !itest.Alive(p1) }) {
		goneIn = time.Since(hup)
	}
	b.StopTimer()

	askStart := time.Now()
	var failed, byNew, byOld int
	var mu sync.Mutex
	var firstFail error
	for _, c := range clients {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			a, err := c.roundTrip(30 * time.Second)
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failed++
				if firstFail == nil {
					firstFail = err
				}
			case a.pid == p2 && !a.redialed:
				byNew++
			case a.pid == p1:
				byOld++
			}
		})
	}
	wg.Wait()
	asked := time.Since(askStart)
	for _, c := range clients {
		c.close()
	}
	s.WaitGone(p1, 60*time.Second)
	stopServerToEOF(b, s)
	rss.stop()

	d := drainedLineOf(b, s, p1)
	moved, _ := d.Num("moved")
	dur, _ := d.Num("duration")
	cut, _ := d.Num("cut")
	var received int64
	var moveSpan time.Duration
	if l, _, ok := s.Logs.First(0, "connections moved from the previous generation", itest.PIDIs(p2)); ok {
		received, _ = l.Num("count")
		if dr, _, ok := s.Logs.First(0, "draining", itest.PIDIs(p1)); ok {
			moveSpan = logTime(l).Sub(logTime(dr))
		}
	}
	if failed > 0 {
		b.Errorf("%d of %d requests after the move failed; first: %v", failed, conns, firstFail)
	}
	b.ReportMetric(float64(moved), "moved")
	b.ReportMetric(float64(dur)/1e6, "drain-ms")
	b.ReportMetric(float64(moveSpan.Microseconds())/1e3, "draining-to-received-ms")
	b.ReportMetric(float64(rss.peak(p1))/1024, "rss-old-MiB")
	b.ReportMetric(float64(rss.peak(p2))/1024, "rss-new-MiB")
	b.ReportMetric(float64(failed), "failed")
	gone := "not within 5 s"
	if goneIn > 0 {
		gone = goneIn.Round(time.Millisecond).String()
	}
	b.Logf("SIGHUP -> new generation ready %v, old one gone %s; old generation's drain %.1f ms: moved %d, cut %d; the new one received %d (logged %v after the old one's draining line)\n"+
		"peak RSS MiB: old %.1f (%.1f before the upgrade), new %.1f\n"+
		"then one request on each of the %d connections in %v: %d answered by the new generation on the same connection, %d by the old one (not moved), %d failed",
		ready.Round(time.Millisecond), gone, float64(dur)/1e6, moved, cut, received, moveSpan.Round(time.Millisecond),
		float64(rss.peak(p1))/1024, float64(hwm1)/1024, float64(rss.peak(p2))/1024,
		conns, asked.Round(time.Millisecond), byNew, byOld, failed)
}

// raiseNoFile raises this process's soft RLIMIT_NOFILE to at least n (its
// children, the server, inherit it); it skips b when the hard limit is lower.
func raiseNoFile(b *testing.B, n uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
	if lim.Cur >= n {
		return
	}
	if lim.Max < n {
		b.Skipf("RLIMIT_NOFILE hard limit %d, below the %d descriptors needed", lim.Max, n)
	}
	lim.Cur = n
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
}

// logTime is a log line's time field (zero when it has none).
func logTime(l itest.Line) time.Time {
	t, _ := time.Parse(time.RFC3339Nano, l.Str("time"))
	return t
}

func firstErr(errs []error) error {
	n := 0
	var first error
	for _, err := range errs {
		if err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	if first == nil {
		return nil
	}
	return fmt.Errorf("%d failed; first: %w", n, first)
}
