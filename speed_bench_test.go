package main_test

// Benchmarks of how fast one upgrade is (issue 12), observed from the outside
// like bench_test.go's:
//
//	go test -run '^$' -bench 'BenchmarkUpgradeSpeed|BenchmarkUpgradeTenThousandConns' -benchtime 1x -v .
//
// Run them with -v: without it the testing package keeps only the first 10
// lines of a benchmark's output, and the tables are longer.
//
// BenchmarkUpgradeSpeed (about 4 minutes) has sub-benchmarks. handoff is
// built as it is shipped, CGO_ENABLED=0 (README, Set up); tableflip's example
// as its documentation builds it, go build, which links cgo where a C
// compiler is found. The -cgo and -static runs build each the other way, for
// the comparison build for build:
//
//   - exec: the exec of the binaries alone, 30 times each (/bin/true,
//     handoff version as shipped, and built with cgo), and the package
//     inits of handoff (GODEBUG=inittrace=1);
//   - handoff: 20 upgrades of handoff serve, one SIGHUP a second, under the
//     load of BenchmarkUpgradeUnderLoad, broken down stage by stage from the
//     SIGHUP to the first answer by the new PID and to the old process's exit;
//   - tfexample: the same harness on tableflip's documented example
//     (internal/tfexample), which skips a reload while its previous
//     generation still drains, and loses requests;
//   - interleaved: handoff and the example at once, the example's SIGHUPs
//     half a second after handoff's, each under half the load, so that the
//     machine's other work falls on both alike;
//   - interleaved-static: the same, the example built with CGO_ENABLED=0,
//     as handoff is;
//   - interleaved-cgo: the same, every new generation of handoff built with
//     cgo, as the example is;
//   - handoff-cgo: as handoff, every new generation built with cgo;
//   - tfexample-static: as tfexample, built with CGO_ENABLED=0;
//   - handoff-inittrace: 10 upgrades with GODEBUG=inittrace=1, to place the
//     end of the new generation's package inits.
//
// The parent then prints the medians side by side. A SIGHUP that handoff
// queues behind the previous generation's drain (its /slow requests take
// 800 ms) counts in "median" but not in "median-at-once", and the breakdown
// is over the upgrades that started at once.
//
// BenchmarkUpgradeTenThousandConns upgrades five times in a row (eight with
// HANDOFF_BENCH_UPGRADES=8) with 10,000 idle keep-alive connections open and
// 1000 req/s of fast requests (76 s; 121 s with eight).
//
// Sources of the times: the test's clock when it sends the signal; the JSON
// logs of handoff serve (slog, nanoseconds) and the example's (log, with
// microseconds); a poller that sends GET / on a new connection every 200 µs
// from just before the signal until a new PID answers (BenchmarkUpgradeSpeed
// only: BenchmarkUpgradeTenThousandConns keeps its own process quiet in the
// seconds it measures, see there); the load tool's first
// answer per PID; and the kernel's process connector (netlink), which stamps
// the fork, exec and exit of every process. The connector needs
// CAP_NET_ADMIN in the initial network namespace; without it those rows
// show "-".
//
// They report metrics and never assert speed; they fail only when a server
// cannot start or an upgrade does not happen at all.

import (
	"bufio"
	"cmp"
	"encoding/binary"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/handoff-dev/handoff/internal/itest"
	"github.com/handoff-dev/handoff/internal/loadgen"
)

// The upgrades of BenchmarkUpgradeSpeed, and their load (BenchmarkUpgradeUnderLoad's).
const (
	spUpgrades = 20
	spRate     = 2000
	spSlow     = 800 * time.Millisecond
)

func spLoadArgs() []string {
	return []string{"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", spSlow.String(), "--samples"}
}

func BenchmarkUpgradeSpeed(b *testing.B) {
	ev, evErr := spListenEvents(b)
	if evErr != nil {
		b.Logf("no process connector (%v): the fork, exec and exit rows are empty", evErr)
	}
	var (
		cgo     string
		cgoOnce sync.Once
		execs   *spExecs
		runs    = map[string]*spRun{}
	)
	cgoBin := func() string { // built in b's directory: it outlives the sub-benchmarks
		cgoOnce.Do(func() { cgo = spBuildCgo(b) })
		return cgo
	}
	b.Run("exec", func(b *testing.B) {
		execs = spExecBaseline(b, ev, cgoBin())
		var t strings.Builder
		execs.write(&t)
		b.Log(strings.TrimSuffix(t.String(), "\n"))
	})
	run := func(name string, f func(b *testing.B) *spRun) {
		b.Run(name, func(b *testing.B) {
			r := f(b)
			if r == nil {
				return
			}
			runs[name] = r
			r.report(b, "")
		})
	}
	run("handoff", func(b *testing.B) *spRun { return spRunHandoff(b, ev, spHandoffOpts{upgrades: spUpgrades}) })
	run("tfexample", func(b *testing.B) *spRun { return spRunTableflip(b, ev, false) })
	// Both at once, so that the machine's other work falls on both alike: the
	// example's SIGHUPs half a second after handoff's, each load at half
	// the rate. "interleaved" runs each as built to be used: handoff as it
	// is shipped (CGO_ENABLED=0), the example as its documentation builds it
	// (go build, with cgo); "interleaved-static" runs both with
	// CGO_ENABLED=0, "interleaved-cgo" both with cgo.
	interleaved := func(name string, o spHandoffOpts, tfStatic bool) {
		b.Run(name, func(b *testing.B) {
			o.upgrades, o.rate = spUpgrades, spRate/2
			ph := spStartHandoff(b, ev, o)
			pt := spStartTableflip(b, ev, spRate/2, tfStatic)
			tfUps := make(chan []spUpgrade, 1)
			go func() {
				time.Sleep(500 * time.Millisecond)
				tfUps <- spUpgradeLoop(b, pt.t, spUpgrades, pt.rss)
			}()
			hUps := spUpgradeLoop(b, ph.t, spUpgrades, ph.rss)
			hr, tr := ph.after(hUps), pt.after(<-tfUps)
			hr.name += ", " + name
			tr.name += ", " + name
			runs[name+"-handoff"], runs[name+"-tfexample"] = hr, tr
			hr.report(b, "handoff-")
			tr.report(b, "tfexample-")
		})
	}
	interleaved("interleaved", spHandoffOpts{}, false)
	interleaved("interleaved-static", spHandoffOpts{}, true)
	if cgoBin() != "" {
		interleaved("interleaved-cgo", spHandoffOpts{bin: cgo}, false)
	}
	run("handoff-cgo", func(b *testing.B) *spRun {
		if cgoBin() == "" {
			b.Skip("no cgo build")
		}
		return spRunHandoff(b, ev, spHandoffOpts{upgrades: spUpgrades, bin: cgo})
	})
	run("tfexample-static", func(b *testing.B) *spRun { return spRunTableflip(b, ev, true) })
	run("handoff-inittrace", func(b *testing.B) *spRun {
		if execs == nil || ev == nil {
			b.Skip("needs the exec sub-benchmark and the process connector")
		}
		return spRunHandoff(b, ev, spHandoffOpts{upgrades: 10, inittrace: execs})
	})

	// Side by side.
	var t strings.Builder
	fmt.Fprintf(&t, "SIGHUP -> first answer from the new PID (poller), ms: median of the upgrades done (of those that started at once) | max; load tool's first answer median\n")
	for _, name := range []string{"handoff", "tfexample", "interleaved-handoff", "interleaved-tfexample",
		"interleaved-static-handoff", "interleaved-static-tfexample", "interleaved-cgo-handoff", "interleaved-cgo-tfexample",
		"handoff-cgo", "tfexample-static", "handoff-inittrace"} {
		if r := runs[name]; r != nil {
			r.writeSummary(&t)
		}
	}
	b.Log(strings.TrimSuffix(t.String(), "\n"))
}

// ---------------------------------------------------------------------------
// One run of upgrades under load.

// spTarget is a server under test, as the upgrade loop needs it.
type spTarget struct {
	addr    string
	pidFile string
	logs    *itest.Logs
	deploy  func()                           // put a fresh copy of the binary in place
	skipped func(l itest.Line, old int) bool // a line of old saying that this upgrade will not happen
	queued  func(l itest.Line, old int) bool // a line of old saying that it is queued
}

// spUpgrade is what one upgrade recorded.
type spUpgrade struct {
	old, new int
	hup      int64 // unix ns, just before kill(2)
	mark     int   // log index at the signal
	poll     spPollResult
	skipped  bool
	queued   bool
}

// spRun is the outcome of a run of upgrades.
type spRun struct {
	name    string
	ups     []spUpgrade
	res     *loadgen.Result
	done    int // upgrades after which a new PID answered
	skipped int
	queued  int
	pollMs  []float64 // HUP -> first answer from the new PID, by the poller
	onceMs  []float64 // the same, of the upgrades that started at once (not queued)
	loadMs  []float64 // the same, by the load tool
	// Failed requests sent in the second after a SIGHUP, and the others;
	// notSent of them were never sent (overload: the load tool already had
	// 2048 requests without an answer, a stall of a second or more).
	failAfter, failElse, notSent int
	stalls                       string    // where the stalls and the slowest answers were
	loadAvg                      [2]string // before and after
	rssMiB                       []float64 // peak RSS of every generation
	stages                       []spStage
	at                           [][]int64 // at[i][j]: unix ns of stage j in upgrade i (0: unknown)
}

// spStage is a moment of an upgrade.
type spStage struct {
	name string
	at   func(u spUpgrade) int64 // unix ns; 0 when unknown
}

// spUpgradeLoop upgrades t n times, one SIGHUP to the PID file's process per
// second, and returns what it saw; it may run in a goroutine of its own. A
// SIGHUP that does not give a new PID within 6 s, or that t's process says it
// skips, counts as skipped; the loop then goes on.
func spUpgradeLoop(b *testing.B, t spTarget, n int, rss *spRSS) []spUpgrade {
	b.Helper()
	var ups []spUpgrade
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; i < n; i++ {
		<-tick.C
		old, err := itest.ReadPIDFile(t.pidFile)
		if err != nil {
			b.Errorf("upgrade %d: %v", i+1, err) // not Fatal: it may run in a goroutine of its own
			break
		}
		u := spUpgrade{old: old, mark: t.logs.Mark()}
		t.deploy()
		stop := make(chan struct{})
		pollC := make(chan spPollResult, 1)
		go func() { pollC <- spPollNew(t.addr, old, stop) }()
		u.hup = time.Now().UnixNano()
		if err := syscall.Kill(old, syscall.SIGHUP); err != nil {
			close(stop)
			<-pollC
			b.Errorf("upgrade %d: kill(%d, SIGHUP): %v", i+1, old, err)
			break
		}
		got := false
		deadline := time.NewTimer(6 * time.Second)
		check := time.NewTicker(5 * time.Millisecond)
	wait:
		for {
			select {
			case u.poll = <-pollC:
				got = true
				break wait
			case <-check.C:
				if _, _, ok := t.logs.First(u.mark, "", func(l itest.Line) bool { return t.skipped(l, old) }); ok {
					u.skipped = true
					break wait
				}
			case <-deadline.C:
				u.skipped = true
				break wait
			}
		}
		deadline.Stop()
		check.Stop()
		close(stop)
		if !got {
			u.poll = <-pollC
			if u.poll.pid != 0 { // it answered after all, at the very end
				u.skipped = false
			}
		}
		if _, _, ok := t.logs.First(u.mark, "", func(l itest.Line) bool { return t.queued(l, old) }); ok {
			u.queued = true
		}
		if u.poll.pid != 0 {
			u.new = u.poll.pid
			rss.add(u.new)
			// The next SIGHUP goes to the PID file's process: wait for the new one to be in it.
			itest.Poll(5*time.Second, func() bool { p, err := itest.ReadPIDFile(t.pidFile); return err == nil && p == u.new })
		}
		ups = append(ups, u)
	}
	<-tick.C // the last generation serves for a second too
	if len(ups) > 0 {
		last := ups[len(ups)-1]
		if last.new != 0 {
			itest.Poll(15*time.Second, func() bool { return !itest.Alive(last.old) })
		}
	}
	return ups
}

// finish fills r's figures from its upgrades, the load's result and rss.
func (r *spRun) finish(res *loadgen.Result, rss *spRSS) {
	r.res = res
	for _, u := range r.ups {
		switch {
		case u.new != 0:
			r.done++
			r.pollMs = append(r.pollMs, float64(u.poll.at-u.hup)/1e6)
			if !u.queued {
				r.onceMs = append(r.onceMs, float64(u.poll.at-u.hup)/1e6)
			}
			if ps, ok := itest.PIDStat(res, u.new); ok && ps.First > 0 {
				r.loadMs = append(r.loadMs, float64(ps.First-u.hup)/1e6)
			}
		case u.skipped:
			r.skipped++
		}
		if u.queued {
			r.queued++
		}
	}
	for _, kib := range rss.peaks() {
		r.rssMiB = append(r.rssMiB, float64(kib)/1024)
	}
	for _, smp := range res.Samples {
		if smp.OK {
			continue
		}
		after := false
		for _, u := range r.ups {
			if smp.Start >= u.hup && smp.Start < u.hup+int64(time.Second) {
				after = true
			}
		}
		if after {
			r.failAfter++
		} else {
			r.failElse++
		}
	}
	r.notSent = int(res.Failures["overload"])
	r.stalls = spStalls(res, r.ups)
	r.at = make([][]int64, len(r.ups))
	for i, u := range r.ups {
		r.at[i] = make([]int64, len(r.stages))
		if u.new == 0 {
			continue
		}
		for j, s := range r.stages {
			r.at[i][j] = s.at(u)
		}
	}
}

// writeBreakdown writes the table of r's stages: for each, the median time
// since the SIGHUP, the median step from the stage before it that the same
// upgrade has, and the range since the SIGHUP, over the upgrades done.
func (r *spRun) writeBreakdown(t *strings.Builder) {
	once := 0
	for _, u := range r.ups {
		if u.new != 0 && !u.queued {
			once++
		}
	}
	fmt.Fprintf(t, "%s: %d upgrades done of %d SIGHUPs (%d queued behind the previous drain, %d skipped); ms, median over the %d done at once:\n",
		r.name, r.done, len(r.ups), r.queued, r.skipped, once)
	fmt.Fprintf(t, "  %-62s %9s %9s %17s\n", "stage", "from HUP", "step", "min..max from HUP")
	for j, s := range r.stages {
		var since, step []float64
		for i := range r.ups {
			a := r.at[i][j]
			if a == 0 || r.ups[i].queued {
				continue
			}
			since = append(since, float64(a-r.ups[i].hup)/1e6)
			prev := r.ups[i].hup
			for k := j - 1; k >= 0; k-- {
				if r.at[i][k] != 0 {
					prev = r.at[i][k]
					break
				}
			}
			step = append(step, float64(a-prev)/1e6)
		}
		if len(since) == 0 {
			fmt.Fprintf(t, "  %-62s %9s %9s %17s\n", s.name, "-", "-", "-")
			continue
		}
		fmt.Fprintf(t, "  %-62s %9.2f %9.2f %8.2f..%-8.2f\n", s.name, percentile(since, 50), percentile(step, 50), slices.Min(since), slices.Max(since))
	}
}

// spStalls describes where, relative to the SIGHUPs, the load tool stalled
// (requests not sent: it had 2048 without an answer) and its five slowest
// answers came from: which upgrade's window, and whether the old or the new
// process of that upgrade answered.
func spStalls(res *loadgen.Result, ups []spUpgrade) string {
	where := func(t int64) string {
		i := -1
		for j, u := range ups {
			if u.hup <= t {
				i = j
			}
		}
		if i < 0 {
			return "before the first SIGHUP"
		}
		return fmt.Sprintf("HUP %d +%.0f ms", i+1, float64(t-ups[i].hup)/1e6)
	}
	who := func(pid int) string {
		for _, u := range ups {
			switch pid {
			case u.old:
				return "old"
			case u.new:
				return "new"
			}
		}
		return strconv.Itoa(pid)
	}
	var out []string
	var from, to int64
	n := 0
	flush := func() {
		if n > 0 {
			out = append(out, fmt.Sprintf("%d not sent %s..%.0f ms", n, where(from), float64(to-from)/1e6))
		}
		n = 0
	}
	var okS []loadgen.Sample
	for _, smp := range res.Samples {
		if smp.OK {
			if smp.LatencyUS < 800_000 || smp.LatencyUS > 900_000 { // not a /slow request answered on time
				okS = append(okS, smp)
			}
			continue
		}
		if smp.PID != 0 || smp.LatencyUS != 0 {
			continue // a failure that was sent
		}
		if n > 0 && smp.Start-to > int64(100*time.Millisecond) {
			flush()
		}
		if n == 0 {
			from = smp.Start
		}
		to = smp.Start
		n++
	}
	flush()
	slices.SortFunc(okS, func(a, b loadgen.Sample) int { return int(b.LatencyUS - a.LatencyUS) })
	var slow []string
	for _, smp := range okS[:min(5, len(okS))] {
		slow = append(slow, fmt.Sprintf("%.0f ms sent %s, by %s", float64(smp.LatencyUS)/1e3, where(smp.Start), who(smp.PID)))
	}
	stalls := "no stall"
	if len(out) > 0 {
		stalls = "stalls: " + strings.Join(out, "; ")
	}
	return stalls + "; slowest answers (not /slow): " + strings.Join(slow, "; ")
}

// writeSummary writes r's line of the side-by-side summary.
func (r *spRun) writeSummary(t *strings.Builder) {
	fmt.Fprintf(t, "  %-36s %6.2f (%6.2f) | %7.2f; load tool %6.2f; done %2d of %d, queued %d, skipped %d; requests %d, failed %d %v (%d sent in the second after a SIGHUP; %d never sent: a stall); peak RSS per generation median %.1f max %.1f MiB\n",
		r.name, percentile(r.pollMs, 50), percentile(r.onceMs, 50), maxOf(r.pollMs), percentile(r.loadMs, 50),
		r.done, len(r.ups), r.queued, r.skipped, r.res.Requests, r.res.Failed, r.res.Failures, r.failAfter, r.notSent,
		percentile(r.rssMiB, 50), maxOf(r.rssMiB))
}

// report logs r's tables and reports its metrics, their units prefixed with prefix.
func (r *spRun) report(b *testing.B, prefix string) {
	var t strings.Builder
	fmt.Fprintf(&t, "load average before %s, after %s\n", r.loadAvg[0], r.loadAvg[1])
	r.writeBreakdown(&t)
	r.writeSummary(&t)
	fmt.Fprintf(&t, "  %s\n", r.stalls)
	b.Log(strings.TrimSuffix(t.String(), "\n"))
	if r.res.Failed > 0 {
		b.Logf("first failures:\n%s", strings.Join(r.res.Errors, "\n"))
	}
	b.ReportMetric(percentile(r.pollMs, 50), prefix+"median-ms")
	b.ReportMetric(percentile(r.onceMs, 50), prefix+"median-at-once-ms")
	b.ReportMetric(maxOf(r.pollMs), prefix+"max-ms")
	b.ReportMetric(float64(r.done), prefix+"upgrades")
	b.ReportMetric(float64(r.skipped), prefix+"skipped")
	b.ReportMetric(float64(r.queued), prefix+"queued")
	b.ReportMetric(float64(r.res.Failed), prefix+"failed")
	b.ReportMetric(percentile(r.rssMiB, 50), prefix+"rss-median-MiB")
	b.ReportMetric(maxOf(r.rssMiB), prefix+"rss-max-MiB")
}

func cmpOr(a, b int) int {
	if a != 0 {
		return a
	}
	return b
}

// spLoadAvg is the first three fields of /proc/loadavg.
func spLoadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// spRunHandoff runs handoff serve through spUpgrades upgrades. With bin set,
// every new generation is that binary (a build with cgo).
func spRunHandoff(b *testing.B, ev *spEvents, o spHandoffOpts) *spRun {
	b.Helper()
	p := spStartHandoff(b, ev, o)
	return p.after(spUpgradeLoop(b, p.t, o.upgrades, p.rss))
}

// spPrepared is a server under its load, ready for its upgrade loop; after
// stops the load and the server and makes the run of the upgrades.
type spPrepared struct {
	t     spTarget
	rss   *spRSS
	after func(ups []spUpgrade) *spRun
}

// spStartHandoff starts handoff serve and its load for spRunHandoff.
func spStartHandoff(b *testing.B, ev *spEvents, o spHandoffOpts) *spPrepared {
	b.Helper()
	rate := cmpOr(o.rate, spRate)
	name, bin := "handoff serve", o.bin
	opts := itest.ServerOpts{UpgradeTimeout: "10s", DrainTimeout: "10s"}
	switch {
	case bin != "":
		name = "handoff serve, built with cgo"
	case o.inittrace != nil:
		name = "handoff serve, GODEBUG=inittrace=1"
		opts.CleanEnv, opts.Env = true, []string{"GODEBUG=inittrace=1"}
	}
	load0 := spLoadAvg()
	s := itest.StartServer(b, opts)
	rss := spSampleRSS(b, s.LivePID())
	load := itest.StartLoad(b, s.Addr, rate, spLoadArgs()...)
	t := spTarget{
		addr: s.Addr, pidFile: s.PIDFile, logs: s.Logs,
		deploy: func() {
			if bin != "" {
				s.DeployFile(bin, 0o755)
				return
			}
			s.Version = itest.NextVersion(s.Version)
			s.Deploy(s.Version)
		},
		skipped: func(l itest.Line, old int) bool {
			return l.PID() == old && (l.Msg() == "upgrade failed" || l.Msg() == "upgrade ignored")
		},
		queued: func(l itest.Line, old int) bool { return l.PID() == old && l.Msg() == "upgrade queued" },
	}
	return &spPrepared{t: t, rss: rss, after: func(ups []spUpgrade) *spRun {
		res, _ := load.Stop()
		rss.stop()
		s.Proc.Kill()
		return spHandoffRun(ev, o, name, s, ups, res, rss, load0)
	}}
}

// spHandoffRun makes the run of handoff serve's upgrades: its stages.
func spHandoffRun(ev *spEvents, o spHandoffOpts, name string, s *itest.Server, ups []spUpgrade, res *loadgen.Result, rss *spRSS, load0 string) *spRun {

	logAt := func(msg string, pid func(spUpgrade) int) func(spUpgrade) int64 {
		return func(u spUpgrade) int64 {
			l, _, ok := s.Logs.First(u.mark, msg, itest.PIDIs(pid(u)))
			if !ok {
				return 0
			}
			return spLogTime(l)
		}
	}
	old := func(u spUpgrade) int { return u.old }
	nw := func(u spUpgrade) int { return u.new }
	// With inittrace, the new generation's runtime writes a line per package
	// init to its stderr (the old one's, through the attempt's pipe), ahead
	// of its "started" line: their end, from the start of its runtime, and
	// the exec -> runtime start of the version runs, place the end of the
	// package inits.
	initsEnd := func(u spUpgrade) int64 {
		ex := ev.first(spExec, u.new, u.hup)
		_, until, ok := s.Logs.First(u.mark, "started by previous generation", itest.PIDIs(u.new))
		if o.inittrace == nil || ex == 0 || !ok {
			return 0
		}
		lines, idx := s.Logs.Find(u.mark, "", func(l itest.Line) bool { return strings.HasPrefix(l.Raw, "init ") })
		end := 0.0
		for i, l := range lines {
			if at, ms, ok := spInitLine(l.Raw); ok && idx[i] < until {
				end = max(end, at+ms)
			}
		}
		if end == 0 {
			return 0
		}
		return ex + int64((o.inittrace.toRuntime+end)*1e6)
	}
	stages := []spStage{
		{"old: \"upgrade requested\" (signal delivered, run loop)", logAt("upgrade requested", old)},
		{"old: \"starting new generation\" (binary checked, channels)", logAt("starting new generation", old)},
		{"kernel: fork of the new PID", ev.forkOf()},
		{"kernel: exec of the new PID done", ev.execOf()},
	}
	if o.inittrace != nil {
		stages = append(stages, spStage{"new: package inits end (~: inittrace + exec->runtime of version)", initsEnd})
	}
	r := &spRun{name: name, ups: ups, stages: append(stages, []spStage{
		{"new: \"started by previous generation\" (runtime, main, New)", logAt("started by previous generation", nw)},
		{"new: \"listening\" (inherited listener)", logAt("listening", nw)},
		{"first answer from the new PID (poller)", func(u spUpgrade) int64 { return u.poll.at }},
		{"new: \"ready\" (PID file, report, tableflip Ready, notify)", logAt("ready", nw)},
		{"old: \"upgrade succeeded\" (ready pipe, report read)", logAt("upgrade succeeded", old)},
		{"old: \"draining\" (closes its listener next)", logAt("draining", old)},
		{"old: \"drained\"", logAt("drained", old)},
		{"kernel: exit of the old PID", ev.exitOf()},
	}...)}
	r.finish(res, rss)
	r.loadAvg = [2]string{load0, spLoadAvg()}
	return r
}

// spHandoffOpts vary spRunHandoff.
type spHandoffOpts struct {
	upgrades  int
	rate      int      // of the load; 0: spRate
	bin       string   // every new generation is this binary (a build with cgo)
	inittrace *spExecs // run with GODEBUG=inittrace=1; the version runs' figures
}

// spInitLine parses a GODEBUG=inittrace=1 line, "init PKG @AT ms, MS ms
// clock, B bytes, A allocs": when the init began since the runtime started,
// and how long it took.
func spInitLine(line string) (at, ms float64, ok bool) {
	f := strings.Fields(line)
	if len(f) < 7 || f[0] != "init" || f[6] != "clock," || !strings.HasPrefix(f[2], "@") {
		return 0, 0, false
	}
	at, err1 := strconv.ParseFloat(f[2][1:], 64)
	ms, err2 := strconv.ParseFloat(f[4], 64)
	return at, ms, err1 == nil && err2 == nil
}

// spRunTableflip runs tableflip's documented example (internal/tfexample)
// through spUpgrades reloads.
func spRunTableflip(b *testing.B, ev *spEvents, static bool) *spRun {
	b.Helper()
	p := spStartTableflip(b, ev, spRate, static)
	return p.after(spUpgradeLoop(b, p.t, spUpgrades, p.rss))
}

// spStartTableflip builds and starts tableflip's example and its load (rate
// req/s) for spRunTableflip: built as its documentation builds it (go build,
// with cgo), or with CGO_ENABLED=0 when static is set.
func spStartTableflip(b *testing.B, ev *spEvents, rate int, static bool) *spPrepared {
	b.Helper()
	root, err := itest.ModuleRoot()
	if err != nil {
		b.Fatal(err)
	}
	load0 := spLoadAvg()
	dir := b.TempDir()
	built := filepath.Join(dir, "tfexample.built")
	var env []string
	if static {
		env = []string{"CGO_ENABLED=0"}
	}
	if out, err := spGo(root, env, "build", "-o", built, "./internal/tfexample"); err != nil {
		b.Fatalf("building internal/tfexample: %v\n%s", err, out)
	}
	live := filepath.Join(dir, "tfexample")
	itest.CopyFile(b, built, live, 0o755)
	addr := spFreeAddr(b)
	pidFile := filepath.Join(dir, "tfexample.pid")
	cmd := exec.Command(live, "-listen", addr, "-pid-file", pidFile)
	cmd.Dir = dir
	cmd.Env = itest.CleanEnv(nil)
	p := itest.StartCmd(b, cmd)
	itest.Eventually(b, 10*time.Second, func() bool {
		pid, err := itest.ReadPIDFile(pidFile)
		if err != nil || pid != p.PID {
			return false
		}
		r, err := itest.Get(addr, "/")
		return err == nil && r.PID == p.PID
	}, "tableflip example %d to serve on %s", p.PID, addr)
	rss := spSampleRSS(b, p.PID)
	load := itest.StartLoad(b, addr, rate, spLoadArgs()...)
	t := spTarget{
		addr: addr, pidFile: pidFile, logs: p.Logs,
		deploy: func() {
			tmp := live + ".new"
			itest.CopyFile(b, built, tmp, 0o755)
			if err := os.Rename(tmp, live); err != nil {
				b.Fatal(err)
			}
		},
		skipped: func(l itest.Line, old int) bool {
			return strings.HasPrefix(l.Raw, strconv.Itoa(old)+" ") && strings.Contains(l.Raw, "Upgrade failed")
		},
		queued: func(itest.Line, int) bool { return false },
	}
	return &spPrepared{t: t, rss: rss, after: func(ups []spUpgrade) *spRun {
		res, _ := load.Stop()
		rss.stop()
		p.Kill()
		r := spTableflipRun(ev, p, ups, res, rss, load0)
		if static {
			r.name += ", CGO_ENABLED=0 build"
		}
		return r
	}}
}

// spTableflipRun makes the run of the example's reloads: its stages.
func spTableflipRun(ev *spEvents, p *itest.Proc, ups []spUpgrade, res *loadgen.Result, rss *spRSS, load0 string) *spRun {

	// Its log lines: "PID 2006/01/02 15:04:05.000000 msg".
	logAt := func(msg string, pid func(spUpgrade) int) func(spUpgrade) int64 {
		return func(u spUpgrade) int64 {
			prefix := strconv.Itoa(pid(u)) + " "
			l, _, ok := p.Logs.First(u.mark, "", func(l itest.Line) bool {
				return strings.HasPrefix(l.Raw, prefix) && strings.HasSuffix(l.Raw, " "+msg)
			})
			if !ok {
				return 0
			}
			f := strings.Fields(l.Raw)
			if len(f) < 3 {
				return 0
			}
			tm, err := time.ParseInLocation("2006/01/02 15:04:05.000000", f[1]+" "+f[2], time.Local)
			if err != nil {
				return 0
			}
			return tm.UnixNano()
		}
	}
	r := &spRun{name: "tableflip's documented example", ups: ups, stages: []spStage{
		{"kernel: fork of the new PID", ev.forkOf()},
		{"kernel: exec of the new PID done", ev.execOf()},
		{"first answer from the new PID (poller)", func(u spUpgrade) int64 { return u.poll.at }},
		{"new: \"ready\" (logged before Ready: PID file, ready pipe)", logAt("ready", func(u spUpgrade) int { return u.new })},
		{"kernel: exit of the old PID (after http.Server.Shutdown)", ev.exitOf()},
	}}
	r.finish(res, rss)
	r.loadAvg = [2]string{load0, spLoadAvg()}
	return r
}

// spLogTime is a JSON log line's time field, unix ns (0 when it has none).
func spLogTime(l itest.Line) int64 {
	t, err := time.Parse(time.RFC3339Nano, l.Str("time"))
	if err != nil {
		return 0
	}
	return t.UnixNano()
}

// spFreeAddr returns 127.0.0.1:PORT with a port that was free a moment ago.
func spFreeAddr(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// spGo runs the go command in dir with env added to the test's environment.
func spGo(dir string, env []string, args ...string) ([]byte, error) {
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	return cmd.CombinedOutput()
}

// spBuildCgo builds handoff with cgo (go build's default where a C compiler
// is found: ld.so and libc at every start) and returns its path, or "" when
// the build fails (no C compiler).
func spBuildCgo(b *testing.B) string {
	root, err := itest.ModuleRoot()
	if err != nil {
		b.Fatal(err)
	}
	out := filepath.Join(b.TempDir(), "handoff-cgo")
	if msg, err := spGo(root, []string{"CGO_ENABLED=1"}, "build", "-ldflags", "-X main.version=cgo", "-o", out, "."); err != nil {
		b.Logf("the build with cgo failed, its rows are left out: %v\n%s", err, msg)
		return ""
	}
	return out
}

// ---------------------------------------------------------------------------
// The poller.

// spPollResult is the first answer the poller got from a PID other than the old one.
type spPollResult struct {
	pid   int   // 0: none came
	at    int64 // unix ns when that answer was complete
	polls int   // requests sent
	errs  int   // requests that failed
}

// spPollGap is the pause between two polls: enough for the poller not to
// take a whole CPU from the processes it watches (two here), short against
// the stages it times.
const spPollGap = 200 * time.Microsecond

// spPollNew sends GET / on a new connection (Connection: close), again and
// again, spPollGap apart, until a process other than old answers or stop is
// closed.
func spPollNew(addr string, old int, stop <-chan struct{}) spPollResult {
	var r spPollResult
	for i := 0; ; i++ {
		select {
		case <-stop:
			return r
		default:
		}
		if i > 0 {
			time.Sleep(spPollGap)
		}
		pid, err := spGetPID(addr)
		r.polls++
		if err != nil {
			r.errs++
			continue
		}
		if pid != old && pid != 0 {
			r.pid, r.at = pid, time.Now().UnixNano()
			return r
		}
	}
}

// spGetPID sends GET / on a new connection and returns the Handoff-Pid of the answer.
func spGetPID(addr string) (int, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, err
	}
	if resp.StatusCode != 200 {
		return 0, fmt.Errorf("status %d", resp.StatusCode)
	}
	return strconv.Atoi(resp.Header.Get("Handoff-Pid"))
}

// ---------------------------------------------------------------------------
// Peak RSS.

// spRSS samples the peak RSS (VmHWM) of a set of processes every 10 ms until
// each has exited; a process's peak is then its last sample.
type spRSS struct {
	mu   sync.Mutex
	pids map[int]bool // sampled still
	kib  map[int]int64
	stop func()
}

func spSampleRSS(tb testing.TB, pids ...int) *spRSS {
	r := &spRSS{pids: map[int]bool{}, kib: map[int]int64{}}
	for _, p := range pids {
		r.add(p)
	}
	r.stop = itest.Every(tb, 10*time.Millisecond, func() {
		r.mu.Lock()
		ps := make([]int, 0, len(r.pids))
		for p := range r.pids {
			ps = append(ps, p)
		}
		r.mu.Unlock()
		for _, p := range ps {
			kib, ok := itest.VmHWM(p)
			r.mu.Lock()
			if ok {
				r.kib[p] = max(r.kib[p], kib)
			} else {
				delete(r.pids, p) // gone (or a zombie: no VmHWM)
			}
			r.mu.Unlock()
		}
	})
	return r
}

func (r *spRSS) add(pid int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, seen := r.kib[pid]; !seen {
		r.pids[pid] = true
		r.kib[pid] = 0
	}
}

// peaks returns the peak of every process sampled at least once (KiB).
func (r *spRSS) peaks() map[int]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[int]int64{}
	for p, k := range r.kib {
		if k > 0 {
			out[p] = k
		}
	}
	return out
}

// ---------------------------------------------------------------------------
// The kernel's process connector.

// spEvents records the fork, exec and exit of every process, stamped by the
// kernel (CLOCK_MONOTONIC, converted to unix ns), from the process connector.
// A nil *spEvents knows nothing.
type spEvents struct {
	fd     int
	offset int64 // CLOCK_REALTIME - CLOCK_MONOTONIC
	stopC  chan struct{}
	done   chan struct{}

	mu     sync.Mutex
	forks  map[int][]int64 // by the new process's PID
	execs  map[int][]int64
	exits  map[int][]int64 // thread group leaders only
	nobufs int             // receive overflows: events lost
}

// Process connector constants (linux/connector.h, linux/cn_proc.h).
const (
	cnIdxProc         = 1
	cnValProc         = 1
	procCnMcastListen = 1
	procEventFork     = 0x00000001
	procEventExec     = 0x00000002
	procEventExit     = 0x80000000
)

func spListenEvents(tb testing.TB) (*spEvents, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_CONNECTOR)
	if err != nil {
		return nil, fmt.Errorf("netlink connector socket: %w", err)
	}
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20)
	tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: cnIdxProc}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind netlink connector: %w", err)
	}
	// nlmsghdr (16) + cn_msg (20) + enum proc_cn_mcast_op (4)
	msg := make([]byte, 40)
	ne := binary.NativeEndian
	ne.PutUint32(msg[0:], uint32(len(msg)))
	ne.PutUint16(msg[4:], unix.NLMSG_DONE)
	ne.PutUint32(msg[16:], cnIdxProc)
	ne.PutUint32(msg[20:], cnValProc)
	ne.PutUint16(msg[32:], 4)
	ne.PutUint32(msg[36:], procCnMcastListen)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("subscribe to process events: %w", err)
	}
	e := &spEvents{fd: fd, offset: spClockOffset(), stopC: make(chan struct{}), done: make(chan struct{}),
		forks: map[int][]int64{}, execs: map[int][]int64{}, exits: map[int][]int64{}}
	go e.read()
	tb.Cleanup(func() {
		close(e.stopC)
		<-e.done
		unix.Close(e.fd)
	})
	return e, nil
}

// spClockOffset is CLOCK_REALTIME - CLOCK_MONOTONIC, from the closest of a
// few readings.
func spClockOffset() int64 {
	best, off := int64(1<<62), int64(0)
	for range 20 {
		var r1, m, r2 unix.Timespec
		unix.ClockGettime(unix.CLOCK_REALTIME, &r1)
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &m)
		unix.ClockGettime(unix.CLOCK_REALTIME, &r2)
		if d := r2.Nano() - r1.Nano(); d < best {
			best, off = d, (r1.Nano()+r2.Nano())/2-m.Nano()
		}
	}
	return off
}

func (e *spEvents) read() {
	defer close(e.done)
	buf := make([]byte, 64<<10)
	for {
		select {
		case <-e.stopC:
			return
		default:
		}
		n, _, err := unix.Recvfrom(e.fd, buf, 0)
		if err != nil {
			if err == unix.ENOBUFS {
				e.mu.Lock()
				e.nobufs++
				e.mu.Unlock()
			}
			continue // EAGAIN: the receive timeout, to look at stopC
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			continue
		}
		for _, m := range msgs {
			e.parse(m.Data)
		}
	}
}

// parse records one cn_msg holding a struct proc_event.
func (e *spEvents) parse(d []byte) {
	const cnMsg = 20
	if len(d) < cnMsg+16+8 {
		return
	}
	ne := binary.NativeEndian
	ev := d[cnMsg:]
	what := ne.Uint32(ev[0:])
	ts := int64(ne.Uint64(ev[8:])) + e.offset
	data := ev[16:]
	e.mu.Lock()
	defer e.mu.Unlock()
	switch what {
	case procEventFork:
		if len(data) < 16 {
			return
		}
		child, childTgid := int(ne.Uint32(data[8:])), int(ne.Uint32(data[12:]))
		if child == childTgid { // a process, not a thread
			e.forks[child] = append(e.forks[child], ts)
		}
	case procEventExec:
		tgid := int(ne.Uint32(data[4:]))
		e.execs[tgid] = append(e.execs[tgid], ts)
	case procEventExit:
		pid, tgid := int(ne.Uint32(data[0:])), int(ne.Uint32(data[4:]))
		if pid == tgid {
			e.exits[tgid] = append(e.exits[tgid], ts)
		}
	}
}

// The kinds of events.
const (
	spFork = iota
	spExec
	spExit
)

// first returns the first time of an event of kind for pid at or after since
// (0: none).
func (e *spEvents) first(kind, pid int, since int64) int64 {
	if e == nil {
		return 0
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	m := map[int]map[int][]int64{spFork: e.forks, spExec: e.execs, spExit: e.exits}[kind]
	for _, t := range m[pid] {
		if t >= since {
			return t
		}
	}
	return 0
}

func (e *spEvents) forkOf() func(spUpgrade) int64 {
	return func(u spUpgrade) int64 { return e.first(spFork, u.new, u.hup) }
}

func (e *spEvents) execOf() func(spUpgrade) int64 {
	return func(u spUpgrade) int64 { return e.first(spExec, u.new, u.hup) }
}

func (e *spEvents) exitOf() func(spUpgrade) int64 {
	return func(u spUpgrade) int64 { return e.first(spExit, u.old, u.hup) }
}

// ---------------------------------------------------------------------------
// The exec of the binaries alone.

// spExecs is what spExecBaseline measured.
type spExecs struct {
	rows    []spExecRow
	initMs  []float64 // GODEBUG=inittrace=1: sum of the package inits of handoff version
	initEnd []float64 // the same: when the last package init ended, since the runtime started
	rest    []float64 // exec -> exit of those runs, less initEnd: before the runtime starts, main, exit
	// toRuntime is the median of rest: about how long an exec'd handoff
	// takes to start its runtime (plus a version's main and exit).
	toRuntime float64
	initTop   string
	pkgs      int // how many packages have an init
}

type spExecRow struct {
	name                     string
	wall, forkExec, execExit []float64 // ms
}

// spExecBaseline execs /bin/true, handoff version (as shipped and as the
// upgrades run it: CGO_ENABLED=0) and, when cgo is set, its build with cgo,
// 30 times each: wall time of cmd.Run, and with the process connector fork ->
// exec done and exec done -> exit.
func spExecBaseline(b *testing.B, ev *spEvents, cgo string) *spExecs {
	const n = 30
	x := &spExecs{}
	cands := []struct{ name, path string }{{"/bin/true", "/bin/true"}, {"handoff version (CGO_ENABLED=0, as shipped)", itest.Binary(b, "handoff-v1")}}
	if cgo != "" {
		cands = append(cands, struct{ name, path string }{"handoff version (with cgo)", cgo})
	}
	for _, c := range cands {
		row := spExecRow{name: c.name}
		for range n {
			cmd := exec.Command(c.path, "version")
			start := time.Now().UnixNano()
			if err := cmd.Run(); err != nil {
				b.Fatalf("%s: %v", c.path, err)
			}
			end := time.Now().UnixNano()
			row.wall = append(row.wall, float64(end-start)/1e6)
			pid := cmd.Process.Pid
			time.Sleep(2 * time.Millisecond) // the connector's events, delivered asynchronously
			fk, ex, xt := ev.first(spFork, pid, start), ev.first(spExec, pid, start), ev.first(spExit, pid, start)
			if fk != 0 && ex != 0 && xt != 0 {
				row.forkExec = append(row.forkExec, float64(ex-fk)/1e6)
				row.execExit = append(row.execExit, float64(xt-ex)/1e6)
			}
		}
		x.rows = append(x.rows, row)
	}
	// Package init of handoff, from the runtime's own trace; with the
	// connector, exec -> exit of the same runs less the end of the inits is
	// what the runtime needs before it starts (ld.so with cgo) and after
	// (main, exit).
	type pkg struct {
		name string
		ms   float64
	}
	var tops []pkg
	for range 10 {
		cmd := exec.Command(itest.Binary(b, "handoff-v1"), "version")
		cmd.Env = append(os.Environ(), "GODEBUG=inittrace=1")
		start := time.Now().UnixNano()
		out, err := cmd.CombinedOutput()
		if err != nil {
			b.Fatalf("inittrace: %v", err)
		}
		sum, end := 0.0, 0.0
		var ps []pkg
		for line := range strings.SplitSeq(string(out), "\n") {
			if at, ms, ok := spInitLine(line); ok {
				sum += ms
				end = max(end, at+ms)
				ps = append(ps, pkg{strings.Fields(line)[1], ms})
			}
		}
		x.pkgs = len(ps)
		x.initMs = append(x.initMs, sum)
		x.initEnd = append(x.initEnd, end)
		time.Sleep(2 * time.Millisecond)
		pid := cmd.Process.Pid
		if ex, xt := ev.first(spExec, pid, start), ev.first(spExit, pid, start); ex != 0 && xt != 0 {
			x.rest = append(x.rest, float64(xt-ex)/1e6-end)
		}
		if len(x.initMs) == 1 || sum <= slices.Min(x.initMs) {
			tops = ps
		}
	}
	x.toRuntime = percentile(x.rest, 50)
	slices.SortFunc(tops, func(a, b pkg) int {
		switch {
		case a.ms > b.ms:
			return -1
		case a.ms < b.ms:
			return 1
		}
		return 0
	})
	var top []string
	for _, p := range tops[:min(4, len(tops))] {
		top = append(top, fmt.Sprintf("%s %.3f", p.name, p.ms))
	}
	x.initTop = strings.Join(top, ", ")
	return x
}

func (x *spExecs) write(t *strings.Builder) {
	fmt.Fprintf(t, "exec of the binary alone, 30 runs, ms median (min): wall of cmd.Run | kernel fork -> exec done | exec done -> exit (runtime + package init, main, exit)\n")
	for _, r := range x.rows {
		fmt.Fprintf(t, "  %-46s %6.2f (%5.2f) | %6s | %6s\n", r.name, percentile(r.wall, 50), slices.Min(r.wall), spMedMin(r.forkExec), spMedMin(r.execExit))
	}
	fmt.Fprintf(t, "  package inits of handoff (GODEBUG=inittrace=1, %d packages): median %.2f ms in all, the last ending %.2f ms after the runtime started; exec -> exit less that: %.2f ms; largest inits in the quickest run: %s\n",
		x.pkgs, percentile(x.initMs, 50), percentile(x.initEnd, 50), x.toRuntime, x.initTop)
}

func spMedMin(xs []float64) string {
	if len(xs) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f (%.2f)", percentile(xs, 50), slices.Min(xs))
}

// ---------------------------------------------------------------------------
// 10,000 connections.

// BenchmarkUpgradeTenThousandConns: 10,000 idle keep-alive connections to
// handoff serve (each sent one request first) and a load of 1000 req/s of
// fast requests; five upgrades in a row (HANDOFF_BENCH_UPGRADES: 1 to 8),
// each moving the 10,000 connections on. For each it reports the p99 of the
// fast requests in the second after the SIGHUP against the two seconds
// before, the old process's CPU time from the SIGHUP to its exiting line,
// the connections moved and how long the drain took, and the peak RSS of
// both generations; then the p99s over all the upgrades, the failed
// requests, and one request on every idle connection, which the last
// generation must answer.
func BenchmarkUpgradeTenThousandConns(b *testing.B) {
	const conns, rate = 10_000, 1000
	const steady = 5 // seconds of steady state before each upgrade
	// HANDOFF_BENCH_UPGRADES sets how many upgrades (8 for a steadier pooled
	// p99); HANDOFF_BENCH_SERVE_ARGS adds flags to handoff serve (for A/B runs).
	// At most 8: on loopback, the TCP keepalive probes of 10,000
	// connections opened together (15 s apart on both ends, Go's default)
	// arrive in bursts that overflow the kernel's backlog (netdev_max_backlog,
	// 1000), and connections idle for 150 s die of 9 lost probes in a row
	// (ETIMEDOUT) with or without handoff: a bare net/http server lost 1,319
	// of 9,000 in 170 s here.
	upgrades := 5
	if n, err := strconv.Atoi(os.Getenv("HANDOFF_BENCH_UPGRADES")); err == nil && n > 0 {
		upgrades = min(n, 8)
		if n > upgrades {
			b.Logf("HANDOFF_BENCH_UPGRADES=%d: %d upgrades (the idle connections must not outlive 150 s)", n, upgrades)
		}
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
	if lim.Max < conns+1000 {
		b.Skipf("RLIMIT_NOFILE hard limit %d: below the %d descriptors needed", lim.Max, conns+1000)
	}
	lim.Cur = lim.Max // the server and the load tool inherit it
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		b.Fatal(err)
	}
	ev, _ := spListenEvents(b)
	s := itest.StartServer(b, itest.ServerOpts{UpgradeTimeout: "10s", DrainTimeout: "30s", Args: strings.Fields(os.Getenv("HANDOFF_BENCH_SERVE_ARGS"))})
	p1 := s.LivePID()
	// Each generation's CPU time and peak RSS come from its exiting line
	// (getrusage): a sampler reading /proc meanwhile would load the window
	// measured.
	peaks := map[int]int64{} // KiB

	// The idle connections.
	openStart := time.Now()
	cs := make([]*spConn, conns)
	errs := make([]error, conns)
	sem := make(chan struct{}, 200) // within the listen backlog
	var wg sync.WaitGroup
	for i := range cs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			c, err := spDial(s.Addr)
			if err == nil {
				var pid int
				pid, _, err = c.get()
				if err == nil && pid != p1 {
					err = fmt.Errorf("answered by %d, want %d", pid, p1)
				}
			}
			cs[i], errs[i] = c, err
		})
	}
	wg.Wait()
	b.Cleanup(func() {
		for _, c := range cs {
			if c != nil {
				c.c.Close()
			}
		}
	})
	for i, err := range errs {
		if err != nil {
			b.Fatalf("opening idle connection %d of %d: %v", i, conns, err)
		}
	}
	opened := time.Since(openStart)

	load := itest.StartLoad(b, s.Addr, rate, "--conns", "16", "--new-conn-fraction", "0.3", "--samples",
		// Past StartLoad's own --duration (the last one counts): an upgrade takes 15 s.
		"--duration", fmt.Sprintf("%ds", 60+upgrades*(steady+20)))
	b.ResetTimer()

	// upgrades upgrades, each once the previous one's connections have all
	// moved and after steady seconds of steady state (the first two of them
	// still feel the previous generation's exit). The fast requests' p99 of
	// one second is the 10th slowest of 1000 and moves by ±50% from one quiet
	// second to the next (the "null" ratio below: the last second before a
	// SIGHUP against the two before it), so the figure that counts is the
	// p99 over all the seconds after an upgrade against all the two-second
	// windows before one.
	type upgrade struct {
		old, new         int
		hup, answer      int64 // unix ns
		drainingAt, gone int64
		oldCPU           time.Duration // from the SIGHUP to its exiting line
		ownGCs           chan uint64   // this process's collections in the second after
		drained          itest.Line
		received         itest.Line
	}
	ups := make([]upgrade, 0, upgrades)
	live := p1
	for range upgrades {
		time.Sleep(steady * time.Second) // steady state: the before window and the null one
		mark := s.Logs.Mark()
		u := upgrade{old: live}
		cpuBefore := spCPUns(live)
		u.hup = time.Now().UnixNano()
		u.ownGCs = make(chan uint64, 1)
		gcAtHUP := spGCCycles()
		time.AfterFunc(time.Second, func() { u.ownGCs <- spGCCycles() - gcAtHUP })
		s.Signal(live, syscall.SIGHUP)
		// No poller here, unlike BenchmarkUpgradeSpeed's: a request of its
		// own every 200 µs would load both generations just when the fork
		// and the new generation's start do, and its requests are not the
		// ones measured. The PID file names the new generation before the
		// old one logs "draining"; the load's first answer from it times
		// the handoff (to the millisecond, at 1000 req/s).
		s.Logs.Wait(b, mark, "draining", itest.PIDIs(u.old), 30*time.Second)
		if u.new = s.LivePID(); u.new == u.old {
			b.Fatalf("the old generation %d drains but the PID file still names it", u.old)
		}
		s.WaitGone(u.old, 60*time.Second) // on a pidfd: /proc polled every 5 ms cost 19 ms of CPU a second in the seconds measured
		u.gone = time.Now().UnixNano()
		if at := ev.first(spExit, u.old, u.hup); at != 0 {
			u.gone = at
		}
		// The moved descriptors may still be in flight (queued on the moves
		// channel) when the old generation exits: the new one logs their count
		// once it has read them all.
		u.received = s.Logs.Wait(b, mark, "connections moved from the previous generation", itest.PIDIs(u.new), 30*time.Second)
		var ok bool
		if u.drained, _, ok = s.Logs.First(mark, "drained", itest.PIDIs(u.old)); !ok {
			b.Fatalf("the old generation %d logged no drained line", u.old)
		}
		dr, _, _ := s.Logs.First(mark, "draining", itest.PIDIs(u.old))
		u.drainingAt = spLogTime(dr)
		// Its CPU time at the SIGHUP (schedstat) against its own at its
		// exiting line (getrusage): the kernel counts both from the same
		// runtime, though schedstat misses threads that already exited (Go's
		// rarely do). No reading: no figure.
		exiting := s.Logs.Wait(b, mark, "exiting", itest.PIDIs(u.old), 10*time.Second)
		cpu, _ := exiting.Num("cpu")
		if cpuBefore > 0 && cpu > 0 {
			u.oldCPU = time.Duration(cpu - cpuBefore)
		}
		peaks[u.old], _ = exiting.Num("peak_rss_kib")
		ups = append(ups, u)
		live = u.new
	}
	time.Sleep(time.Second) // the second after the last upgrade, whole
	b.StopTimer()
	res, _ := load.Stop()

	// One request on every idle connection: the last generation answers them all.
	var byNew, byOther, failed int
	var firstFail error
	var mu sync.Mutex
	askStart := time.Now()
	for _, c := range cs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			pid, _, err := c.get()
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err != nil:
				failed++
				if firstFail == nil {
					firstFail = err
				}
			case pid == live:
				byNew++
			default:
				byOther++
			}
		})
	}
	wg.Wait()
	asked := time.Since(askStart)
	peaks[live], _ = itest.VmHWM(live)

	var ownGCs []string // the benchmark's own collections load the machine too
	for _, u := range ups {
		select {
		case n := <-u.ownGCs:
			ownGCs = append(ownGCs, strconv.FormatUint(n, 10))
		case <-time.After(2 * time.Second):
			ownGCs = append(ownGCs, "?")
		}
	}

	// Latency of the fast requests, in ms, sent in [from, to).
	window := func(from, to int64) (ms []float64, smps []loadgen.Sample) {
		for _, smp := range res.Samples {
			if smp.OK && smp.Start >= from && smp.Start < to {
				ms = append(ms, float64(smp.LatencyUS)/1000)
				smps = append(smps, smp)
			}
		}
		return ms, smps
	}
	kinds := spKinds(res.Samples)
	for i := range ups { // the load's first answer from each new generation
		for _, smp := range res.Samples {
			if end := smp.Start + smp.LatencyUS*1000; smp.PID == ups[i].new && (ups[i].answer == 0 || end < ups[i].answer) {
				ups[i].answer = end
			}
		}
	}
	sec := int64(time.Second)
	var allBefore, allAfter, allDuring, ratios, nulls, drainCPU []float64
	var allNullBefore, allNullAfter []float64 // the control: two quiet windows, pooled the same way
	var afterAt []spTimed                     // every fast request of the seconds after, from its SIGHUP
	var beforeAt []spTimed                    // and of the two seconds before
	var t strings.Builder
	fmt.Fprintf(&t, "%d idle keep-alive connections opened in %v; load %d req/s (30%% on new connections): %d requests, %d failed %v\n",
		conns, opened.Round(time.Millisecond), rate, res.Requests, res.Failed, res.Failures)
	for i, u := range ups {
		before, beforeSmp := window(u.hup-2*sec, u.hup)
		for _, smp := range beforeSmp {
			beforeAt = append(beforeAt, spTimed{at: smp.Start - u.hup, ms: float64(smp.LatencyUS) / 1000, kind: kinds[spKey(smp)], new: true})
		}
		after, afterSmp := window(u.hup, u.hup+sec)
		// The null ratio: the last quiet second against the two before it.
		nullAfter, _ := window(u.hup-sec, u.hup)
		nullBefore, _ := window(u.hup-3*sec, u.hup-sec)
		p99b, p99a := percentile(before, 99), percentile(after, 99)
		ratio, null := spRatio(p99a, p99b), spRatio(percentile(nullAfter, 99), percentile(nullBefore, 99))
		during, _ := window(u.hup, u.gone) // the whole drain: every connection moves
		allBefore, allAfter, allDuring = append(allBefore, before...), append(allAfter, after...), append(allDuring, during...)
		for _, smp := range afterSmp {
			afterAt = append(afterAt, spTimed{at: smp.Start - u.hup, ms: float64(smp.LatencyUS) / 1000, kind: kinds[spKey(smp)], new: smp.PID == u.new})
		}
		ratios, nulls = append(ratios, ratio), append(nulls, null)
		allNullBefore, allNullAfter = append(allNullBefore, nullBefore...), append(allNullAfter, nullAfter...)
		if u.oldCPU > 0 {
			drainCPU = append(drainCPU, float64(u.oldCPU)/1e6)
		}
		moved, _ := u.drained.Num("moved")
		dur, _ := u.drained.Num("duration")
		cut, _ := u.drained.Num("cut")
		closedIdle, _ := u.drained.Num("closed_idle")
		recvCount, _ := u.received.Num("count")
		fmt.Fprintf(&t, "upgrade %d: %d -> %d; fast requests p99 %.2f ms in the 2 s before the SIGHUP (%d), %.2f ms in the second after (%d): ratio %.2f (null ratio of the quiet second before: %.2f); max after %.2f ms\n",
			i+1, u.old, u.new, p99b, len(before), p99a, len(after), ratio, null, maxOf(after))
		slices.SortFunc(afterSmp, func(a, b loadgen.Sample) int { return cmp.Compare(b.LatencyUS, a.LatencyUS) })
		var slow []string
		for _, smp := range afterSmp[:min(8, len(afterSmp))] {
			who := "new"
			if smp.PID == u.old {
				who = "old"
			}
			slow = append(slow, fmt.Sprintf("%.2f ms at +%.1f ms by %s", float64(smp.LatencyUS)/1000, float64(smp.Start-u.hup)/1e6, who))
		}
		fmt.Fprintf(&t, "  slowest in the second after: %s\n", strings.Join(slow, "; "))
		answerMs := -1.0 // the load had no answer from it: -1
		if u.answer != 0 {
			answerMs = float64(u.answer-u.hup) / 1e6
		}
		fmt.Fprintf(&t, "  SIGHUP -> the load's first answer from the new pid %.2f ms; -> old \"draining\" %.2f ms; -> \"drained\" %.2f ms; -> old exit %.2f ms\n",
			answerMs, float64(u.drainingAt-u.hup)/1e6, float64(spLogTime(u.drained)-u.hup)/1e6, float64(u.gone-u.hup)/1e6)
		fmt.Fprintf(&t, "  drain %.1f ms: moved %d, closed idle %d, cut %d; old's CPU from the SIGHUP to its exiting line %.1f ms\n",
			float64(dur)/1e6, moved, closedIdle, cut, float64(u.oldCPU)/1e6)
		fmt.Fprintf(&t, "  new generation: %d connections received %.1f ms after the old one's \"draining\"; peak RSS old %.1f MiB, new %.1f MiB\n",
			recvCount, float64(spLogTime(u.received)-u.drainingAt)/1e6, float64(peaks[u.old])/1024, float64(peaks[u.new])/1024)
	}
	p99b, p99a := percentile(allBefore, 99), percentile(allAfter, 99)
	fmt.Fprintf(&t, "all %d upgrades: fast requests p99 %.2f ms in the seconds before (%d), %.2f ms in the seconds after (%d): ratio %.2f; per upgrade: median %.2f, %s; null ratios: median %.2f, %s\n",
		len(ups), p99b, len(allBefore), p99a, len(allAfter), spRatio(p99a, p99b), percentile(ratios, 50), spList(ratios), percentile(nulls, 50), spList(nulls))
	// The control: the same pooled ratio of two quiet windows (the last
	// second before each SIGHUP against the two before it), no upgrade in
	// either. How far it strays from 1 is how far the ratio above can
	// without the upgrades changing anything.
	nullRatio := spRatio(percentile(allNullAfter, 99), percentile(allNullBefore, 99))
	fmt.Fprintf(&t, "  the control, pooled the same way: the quiet second before each SIGHUP (%d) against the two before it (%d): ratio %.2f\n",
		len(allNullAfter), len(allNullBefore), nullRatio)
	fmt.Fprintf(&t, "  over every drain, from the SIGHUP to the old generation's exit: fast requests p99 %.2f ms (%d): ratio %.2f\n",
		percentile(allDuring, 99), len(allDuring), spRatio(percentile(allDuring, 99), p99b))
	// A steadier view than a ratio of two tails: how many of the requests
	// after are slower than the p99 before (1% when nothing changed).
	fmt.Fprintf(&t, "  slower than the p99 before: %.2f%% of the seconds after, %.2f%% of every drain (1%% when an upgrade changes nothing); p90 ratio %.2f\n",
		spAbove(allAfter, p99b), spAbove(allDuring, p99b), spRatio(percentile(allAfter, 90), percentile(allBefore, 90)))
	// Where they are: the start of the new generation, or the moves after it.
	const startup = 50 * time.Millisecond
	// Against the p99 before and against 1.2 times it: the target. The
	// pooled p99 after is at most 1.2 times the one before when at most 1%
	// of the requests after are slower than that.
	var early, late, earlySlow, lateSlow, earlyOver, lateOver int
	for _, a := range afterAt {
		n, slow, over := &late, &lateSlow, &lateOver
		if a.at < int64(startup) {
			n, slow, over = &early, &earlySlow, &earlyOver
		}
		*n++
		if a.ms > p99b {
			*slow++
		}
		if a.ms > 1.2*p99b {
			*over++
		}
	}
	fmt.Fprintf(&t, "  of them in the first %v after a SIGHUP: %d of %d (%.1f%%); later in that second: %d of %d (%.2f%%)\n",
		startup, earlySlow, early, 100*float64(earlySlow)/float64(max(early, 1)), lateSlow, late, 100*float64(lateSlow)/float64(max(late, 1)))
	fmt.Fprintf(&t, "  slower than 1.2 times the p99 before: %d in the first %v, %d later; at most %d (1%% of the seconds after) for a ratio within 1.2\n",
		earlyOver, startup, lateOver, len(afterAt)/100)
	// Which requests: on what connection, answered by which generation.
	byKind := func(reqs []spTimed) string {
		type kindCount struct{ all, over, overEarly int }
		counts := map[string]*kindCount{}
		for _, a := range reqs {
			k := a.kind + "/old"
			if a.new {
				k = a.kind + "/new"
			}
			kc := counts[k]
			if kc == nil {
				kc = &kindCount{}
				counts[k] = kc
			}
			kc.all++
			if a.ms > 1.2*p99b {
				kc.over++
				if a.at >= 0 && a.at < int64(startup) {
					kc.overEarly++
				}
			}
		}
		var rows []string
		for _, k := range slices.Sorted(maps.Keys(counts)) {
			kc := counts[k]
			rows = append(rows, fmt.Sprintf("%s %d of %d (%.2f%%; %d early)", k, kc.over, kc.all, 100*float64(kc.over)/float64(kc.all), kc.overEarly))
		}
		return strings.Join(rows, "; ")
	}
	fmt.Fprintf(&t, "  of those, by connection (fresh, first on a pooled one, first after its move, reused) and generation: %s\n", byKind(afterAt))
	fmt.Fprintf(&t, "  collections of the benchmark process (which holds the clients' ends) in each second after: %s\n", strings.Join(ownGCs, " "))
	fmt.Fprintf(&t, "  the same in the two seconds before (\"new\": the only generation): %s\n", byKind(beforeAt))
	fmt.Fprintf(&t, "then one request on each idle connection in %v: %d answered by the last generation, %d by another, %d failed", asked.Round(time.Millisecond), byNew, byOther, failed)
	if firstFail != nil {
		fmt.Fprintf(&t, " (first: %v)", firstFail)
	}
	b.Log(t.String())
	if res.Failed > 0 {
		b.Logf("first failures:\n%s", strings.Join(res.Errors, "\n"))
	}

	// Peak RSS: the first generation opened the connections; those between
	// only took them over; the last also answered a request on each.
	var rssTakenOver []float64
	for _, u := range ups[:len(ups)-1] {
		rssTakenOver = append(rssTakenOver, float64(peaks[u.new])/1024)
	}
	b.ReportMetric(float64(res.Failed), "failed")
	b.ReportMetric(float64(failed), "failed-after")
	b.ReportMetric(p99b, "p99-before-ms")
	b.ReportMetric(p99a, "p99-after-ms")
	b.ReportMetric(spRatio(p99a, p99b), "p99-ratio")
	b.ReportMetric(percentile(ratios, 50), "p99-ratio-median")
	b.ReportMetric(spRatio(percentile(allDuring, 99), p99b), "p99-drain-ratio")
	b.ReportMetric(percentile(nulls, 50), "null-ratio-median")
	b.ReportMetric(nullRatio, "null-ratio")
	if len(drainCPU) > 0 {
		b.ReportMetric(percentile(drainCPU, 50), "old-cpu-from-hup-ms")
	}
	b.ReportMetric(float64(peaks[p1])/1024, "rss-first-MiB")
	if len(rssTakenOver) > 0 {
		b.ReportMetric(percentile(rssTakenOver, 50), "rss-taken-over-MiB")
	}
	b.ReportMetric(float64(peaks[live])/1024, "rss-last-MiB")
}

// spGCCycles is how many collections this process has run.
func spGCCycles() uint64 {
	s := []metrics.Sample{{Name: "/gc/cycles/total:gc-cycles"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// spTimed is a request's latency and when it was sent.
type spTimed struct {
	at   int64 // ns from its upgrade's SIGHUP
	ms   float64
	kind string // spKinds
	new  bool   // answered by the new generation
}

// spKey identifies a sample: its connection and start.
func spKey(s loadgen.Sample) [2]int64 { return [2]int64{int64(s.Conn), s.Start} }

// spKinds sorts each request by the connection it went on: "fresh" (a
// connection of its own), "first" (the first on a pooled connection just
// dialed), "moved" (the first a new PID answered on a connection an older
// one answered before: the first after its move) or "reused".
func spKinds(samples []loadgen.Sample) map[[2]int64]string {
	sorted := slices.Clone(samples)
	slices.SortFunc(sorted, func(a, b loadgen.Sample) int { return cmp.Compare(a.Start, b.Start) })
	last := map[uint32]int{} // connection -> the PID that answered its last request
	kinds := make(map[[2]int64]string, len(sorted))
	for _, smp := range sorted {
		prev, seen := last[smp.Conn]
		k := "reused"
		switch {
		case smp.Fresh:
			k = "fresh"
		case !seen:
			k = "first"
		case smp.PID != 0 && prev != 0 && smp.PID != prev:
			k = "moved"
		}
		if smp.PID != 0 {
			last[smp.Conn] = smp.PID
		}
		kinds[spKey(smp)] = k
	}
	return kinds
}

// spAbove is the percentage of xs above v.
func spAbove(xs []float64, v float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	n := 0
	for _, x := range xs {
		if x > v {
			n++
		}
	}
	return 100 * float64(n) / float64(len(xs))
}

// spRatio is a/b, or 0 when b is 0 (an empty window): never NaN or Inf.
func spRatio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// spList prints xs with two decimals.
func spList(xs []float64) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprintf("%.2f", x)
	}
	return strings.Join(s, " ")
}

// spConn is a keep-alive connection that sends requests by hand: no retries.
type spConn struct {
	c  net.Conn
	br *bufio.Reader
}

func spDial(addr string) (*spConn, error) {
	c, err := net.DialTimeout("tcp", addr, 30*time.Second)
	if err != nil {
		return nil, err
	}
	return &spConn{c: c, br: bufio.NewReaderSize(c, 1024)}, nil
}

// get sends GET / and reads the answer: its Handoff-Pid and whether it said
// Connection: close.
func (k *spConn) get() (pid int, closing bool, err error) {
	k.c.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.WriteString(k.c, "GET / HTTP/1.1\r\nHost: bench\r\n\r\n"); err != nil {
		return 0, false, err
	}
	resp, err := http.ReadResponse(k.br, nil)
	if err != nil {
		return 0, false, err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, false, err
	}
	pid, _ = strconv.Atoi(resp.Header.Get("Handoff-Pid"))
	return pid, resp.Close, nil
}

// spCPUns is the CPU time of pid so far, ns: the sum of its threads'
// sum_exec_runtime (/proc/PID/task/*/schedstat); 0 when it is gone.
func spCPUns(pid int) int64 {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0
	}
	var sum int64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			n, _ := strconv.ParseInt(f[0], 10, 64)
			sum += n
		}
	}
	return sum
}
