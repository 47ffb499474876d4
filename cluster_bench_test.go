package main_test

// BenchmarkClusterVsPM2 puts `handoff run --instances 2` and PM2's cluster
// mode (`pm2 start -i max` + `pm2 reload`) side by side, in the same run, on
// the same Node.js app (the Express example when examples/express/node_modules
// is installed, else the dependency-free Node example) and the same load:
//
//	go test -run '^$' -bench BenchmarkClusterVsPM2 -benchtime 1x .
//
// Load: 2000 req/s through the harness's load tool (80% on pooled keep-alive
// connections, 20% on a fresh connection each, 2% /slow?ms=800), during 20
// reloads done 1 s apart at most (handoff upgrade --wait; pm2 reload app), then
// the crash of one child (SIGKILL). Reported for each: requests and failures
// (and among them the broken ones: refused, reset or closed connections and
// bad statuses, apart from the load tool's own in-flight limit and timeouts,
// which measure the host's capacity rather than the reloads), reload time, the
// p99 of the fast requests (under 800 ms: the /slow ones take
// that long by design) in the second after each reload started, the RSS of all
// processes (VmRSS of the supervisor or daemon plus its children), and for the
// crash: the time until the restarted child answers the load and the failures
// meanwhile, next to how many connections the killed child held (a request in
// flight on it fails with it).
//
// PM2 is installed by the benchmark itself with npm into a temp dir (the PM2
// half is skipped, with a log line, when that fails), runs with PM2_HOME in a
// temp dir, and its daemon is killed at the end (pm2 kill, then its PID). The
// benchmark reports figures and never asserts speed; it fails only when a side
// cannot start. Skipped without node.

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/itest"
	"github.com/handoff-dev/handoff/internal/loadgen"
)

const (
	cvpRate     = 2000
	cvpReloads  = 20
	cvpSlow     = 800 * time.Millisecond
	cvpWindow   = time.Second
	cvpHandoffN = 2
)

func BenchmarkClusterVsPM2(b *testing.B) {
	itest.SkipWithout(b, "node")
	root, err := itest.ModuleRoot()
	if err != nil {
		b.Fatal(err)
	}
	modules := filepath.Join(root, "examples", "express", "node_modules")
	express := true
	if _, err := os.Stat(filepath.Join(modules, "express", "package.json")); err != nil {
		express = false
		b.Logf("examples/express/node_modules not installed (cd examples/express && npm ci): both sides run the Node example instead of Express")
	}

	// PM2 first, from npm into a temp dir: its install is not timed.
	pm2 := installPM2(b)

	var sides []*cvpSide
	for range b.N {
		sides = append(sides, benchHandoffCluster(b, root, modules, express))
		if pm2 != "" {
			sides = append(sides, benchPM2Cluster(b, root, pm2, modules, express))
		}
	}
	b.StopTimer()
	// The testing package keeps 10 lines of a benchmark's output: one row
	// per side.
	var t strings.Builder
	load1, _ := os.ReadFile("/proc/loadavg")
	fmt.Fprintf(&t, "%d req/s (20%% fresh connections, 2%% /slow?ms=800), %d reloads 1 s apart at most, then kill -9 of one child; app %s; %d CPUs, load average %s\n",
		cvpRate, cvpReloads, map[bool]string{true: "Express", false: "examples/node"}[express], runtime.NumCPU(), strings.Join(strings.Fields(string(load1))[:min(3, len(strings.Fields(string(load1))))], " "))
	const rowFmt = "%-17s %8s %17s %6s %-44s %9s %11s %15s %8s %14s %7s %8s %12s\n"
	fmt.Fprintf(&t, rowFmt, "", "requests", "failed (%)", "broken", "failed by kind", "reloads", "reload ms", "fast p99 ms 1s", "fast p99", "RSS MiB, all", "sup RSS", "crash:", "crash: failed")
	fmt.Fprintf(&t, rowFmt, "", "", "", "conns", "", "ok/asked", "median/max", "after (worst)", "overall", "idle/max", "MiB", "serve ms", "/conns killed")
	for _, s := range sides {
		serve := "-"
		if s.crashServeMs >= 0 {
			serve = fmt.Sprintf("%.0f", s.crashServeMs)
		}
		fmt.Fprintf(&t, rowFmt, s.name, fmt.Sprint(s.res.Requests),
			fmt.Sprintf("%d (%.2f%%)", s.res.Failed, s.failedPct()), fmt.Sprint(s.broken()), s.kinds(),
			fmt.Sprintf("%d/%d", s.reloadsOK, len(s.reloadMs)),
			fmt.Sprintf("%.0f/%.0f", cvpPercentile(s.reloadMs, 50), cvpMax(s.reloadMs)),
			fmt.Sprintf("%.1f (%.1f)", s.afterP99, cvpMax(s.perReloadP99)), fmt.Sprintf("%.1f", s.fastP99),
			fmt.Sprintf("%.1f/%.1f", s.rssIdle, s.rssMax), fmt.Sprintf("%.1f", s.rssSupervisor), serve,
			fmt.Sprintf("%d/%d", s.crashFailed, s.crashHeld))
	}
	for _, s := range sides {
		if len(s.res.Errors) > 0 {
			e := strings.Join(s.res.Errors[:min(3, len(s.res.Errors))], " | ")
			fmt.Fprintf(&t, "%s, first failures: %.400s\n", s.name, e)
		}
	}
	b.Log(strings.TrimSuffix(t.String(), "\n"))
}

// cvpSide is what one side of the benchmark measured.
type cvpSide struct {
	name          string
	metric        string // metric name prefix
	res           *loadgen.Result
	reloadMs      []float64 // wall time of each reload command
	reloadStarts  []time.Time
	reloadsOK     int
	perReloadP99  []float64
	afterP99      float64 // fast requests started in the window after any reload start
	fastP99       float64
	rssIdle       float64 // MiB, sum over the processes, before the load
	rssMax        float64
	rssSupervisor float64 // max of the supervisor (handoff run, or PM2's daemon)
	crashServeMs  float64 // kill -> first response from the restarted child; -1 when none
	crashFailed   int64   // failed requests started from 1 s before the kill to 1 s after serving again
	crashHeld     int     // connections the killed child held
}

func (s *cvpSide) failedPct() float64 {
	if s.res.Requests == 0 {
		return 0
	}
	return 100 * float64(s.res.Failed) / float64(s.res.Requests)
}

// broken counts the failures of a connection (dial, write, read: refused,
// reset, closed) and bad statuses, leaving out the load tool's own limit
// (overload: 2048 requests in flight) and timeouts, which measure capacity.
func (s *cvpSide) broken() int64 {
	return s.res.Failures["dial"] + s.res.Failures["write"] + s.res.Failures["read"] + s.res.Failures["status"]
}

func (s *cvpSide) kinds() string {
	var ks []string
	for k, n := range s.res.Failures {
		ks = append(ks, fmt.Sprintf("%s=%d", k, n))
	}
	slices.Sort(ks)
	if len(ks) == 0 {
		return "-"
	}
	return strings.Join(ks, " ")
}

// cvpTarget is a running side: its address, its processes and how to reload.
type cvpTarget struct {
	name, metric string
	addr         string
	port         int
	supervisor   int              // handoff run, or PM2's daemon
	children     func() []int     // the app's processes, live
	reload       func() error     // one reload, to its end
	serving      func(victim int) // waits until the supervisor replaced victim (bounded)
}

// cvpRun drives the load, the reloads and the crash against t.
func cvpRun(b *testing.B, t *cvpTarget) *cvpSide {
	b.Helper()
	s := &cvpSide{name: t.name, metric: t.metric, crashServeMs: -1}
	procs := func() []int { return append([]int{t.supervisor}, t.children()...) }
	s.rssIdle = float64(sumRSS(procs())) / 1024
	rss := sampleRSSSum(b, procs, t.supervisor)

	load := itest.StartLoad(b, t.addr, cvpRate, "--duration", "900s", "--conns", "16",
		"--new-conn-fraction", "0.2", "--slow-fraction", "0.02", "--slow", cvpSlow.String(), "--samples")
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for i := 0; i < cvpReloads; i++ {
		<-tick.C
		start := time.Now()
		err := t.reload()
		took := time.Since(start)
		s.reloadMs = append(s.reloadMs, float64(took.Microseconds())/1000)
		s.reloadStarts = append(s.reloadStarts, start)
		if err != nil {
			b.Logf("%s: reload %d: %v", t.name, i+1, err)
			continue
		}
		s.reloadsOK++
	}
	<-tick.C // the window after the last reload

	// The crash: the killed child is stopped first, so that the connections
	// it holds (each with one request in flight at most) can be counted.
	kids := t.children()
	if len(kids) == 0 {
		b.Fatalf("%s: no child to kill", t.name)
	}
	victim := kids[len(kids)-1]
	_ = syscall.Kill(victim, syscall.SIGSTOP)
	s.crashHeld = heldConns(t.port, victim)[victim]
	_ = syscall.Kill(victim, syscall.SIGKILL)
	killed := time.Now()
	t.serving(victim)
	// Until the restarted child was seen holding a connection of the load
	// (it then answers a request on it), 20 s at most.
	var fresh int
	itest.Poll(20*time.Second, func() bool {
		for _, k := range t.children() {
			if k != victim && !slices.Contains(kids, k) && heldConns(t.port, k)[k] > 0 {
				fresh = k
				return true
			}
		}
		return false
	})
	<-tick.C
	<-tick.C
	res, _ := load.Stop()
	rss.stop()
	s.res = res
	s.rssMax, s.rssSupervisor = float64(rss.maxSum)/1024, float64(rss.maxOne)/1024

	// Latency of the fast requests, overall and after each reload start.
	slowMs := float64(cvpSlow.Milliseconds())
	s.perReloadP99 = make([]float64, len(s.reloadStarts))
	per := make([][]float64, len(s.reloadStarts))
	var fast, after []float64
	var serveAt time.Time
	for _, smp := range res.Samples {
		if fresh != 0 && smp.OK && smp.PID == fresh {
			at := time.Unix(0, smp.Start).Add(time.Duration(smp.LatencyUS) * time.Microsecond)
			if serveAt.IsZero() || at.Before(serveAt) {
				serveAt = at
			}
		}
		ms := float64(smp.LatencyUS) / 1000
		if !smp.OK || ms >= slowMs {
			continue
		}
		fast = append(fast, ms)
		in := false
		for i, st := range s.reloadStarts {
			if smp.Start >= st.UnixNano() && smp.Start < st.Add(cvpWindow).UnixNano() {
				per[i] = append(per[i], ms)
				in = true
			}
		}
		if in {
			after = append(after, ms)
		}
	}
	for i := range per {
		s.perReloadP99[i] = cvpPercentile(per[i], 99)
	}
	s.afterP99, s.fastP99 = cvpPercentile(after, 99), cvpPercentile(fast, 99)
	end := time.Now()
	if !serveAt.IsZero() {
		s.crashServeMs = float64(serveAt.Sub(killed).Microseconds()) / 1000
		end = serveAt.Add(time.Second)
	}
	for _, smp := range res.Samples {
		if !smp.OK && smp.Start >= killed.Add(-time.Second).UnixNano() && smp.Start < end.UnixNano() {
			s.crashFailed++
		}
	}

	m := func(v float64, unit string) { b.ReportMetric(v, t.metric+"-"+unit) }
	m(float64(res.Requests), "requests")
	m(float64(res.Failed), "failed")
	m(float64(s.broken()), "broken-conns")
	m(cvpPercentile(s.reloadMs, 50), "reload-median-ms")
	m(s.afterP99, "after-reload-fast-p99-ms")
	m(s.rssMax, "rss-max-MiB")
	m(s.crashServeMs, "crash-serve-ms")
	m(float64(s.crashFailed), "crash-failed")
	return s
}

// benchHandoffCluster is the handoff half: handoff run --instances 2.
func benchHandoffCluster(b *testing.B, root, modules string, express bool) *cvpSide {
	b.Helper()
	o := clusterOpts{Instances: strconv.Itoa(cvpHandoffN)}
	if express {
		src, err := os.ReadFile(filepath.Join(root, "examples", "express", "server.js"))
		if err != nil {
			b.Fatal(err)
		}
		o.App, o.Env = string(src), []string{"NODE_PATH=" + modules}
	}
	c := startCluster(b, o)
	c.servingSet(cvpHandoffN, 30*time.Second)
	upgradedRE := regexp.MustCompile(`^upgraded: `)
	t := &cvpTarget{
		name: "handoff run -i 2", metric: "handoff",
		addr: c.Addr, port: c.Port, supervisor: c.PID,
		children: func() []int { return itest.PIDs(itest.LiveChildren(c.PID)) },
		reload: func() error {
			r := c.upgrade(b)
			if r.Code != 0 || !upgradedRE.MatchString(r.Stdout) {
				return fmt.Errorf("handoff upgrade: exit %d: %s%s", r.Code, r.Stdout, r.Stderr)
			}
			return nil
		},
		serving: func(victim int) {
			itest.Poll(30*time.Second, func() bool {
				pids := setOf(c.status(), cvpHandoffN)
				return pids != nil && !slices.Contains(pids, victim)
			})
		},
	}
	s := cvpRun(b, t)
	c.stop(b)
	return s
}

// installPM2 installs pm2@latest with npm into a temp dir and returns the
// path of its CLI, or "" (logged) when npm or the install fails.
func installPM2(b *testing.B) string {
	b.Helper()
	npm, err := exec.LookPath("npm")
	if err != nil {
		b.Logf("no npm: skipping the PM2 half")
		return ""
	}
	dir := b.TempDir()
	cmd := exec.Command(npm, "install", "--prefix", dir, "--no-audit", "--no-fund", "--loglevel", "error", "pm2@latest")
	cmd.Env = itest.CleanEnv(nil)
	r := itest.Go(b, 5*time.Minute, cmd)
	res := r.Wait(b, 6*time.Minute)
	cli := filepath.Join(dir, "node_modules", ".bin", "pm2")
	if res.Code != 0 {
		b.Logf("npm install pm2@latest failed (exit %d): skipping the PM2 half\n%s", res.Code, res.Stderr)
		return ""
	}
	if _, err := os.Stat(cli); err != nil {
		b.Logf("npm install pm2@latest left no %s: skipping the PM2 half", cli)
		return ""
	}
	var pkg struct{ Version string }
	if pj, err := os.ReadFile(filepath.Join(dir, "node_modules", "pm2", "package.json")); err == nil {
		_ = json.Unmarshal(pj, &pkg)
	}
	b.Logf("pm2 %s installed with npm in %v", pkg.Version, res.Took.Round(time.Second))
	return cli
}

// pm2Cmd is `pm2 args...` with PM2_HOME=home and env.
func pm2Cmd(cli, home string, env []string, args ...string) *exec.Cmd {
	cmd := exec.Command(cli, args...)
	cmd.Env = itest.CleanEnv(append([]string{"PM2_HOME=" + home}, env...))
	cmd.Dir = filepath.Dir(home)
	return cmd
}

// killPM2Daemon runs pm2 kill, then kills the daemon of home (its PID file
// names it; its command line must name home) and its children if any is
// left.
func killPM2Daemon(tb testing.TB, cli, home string) {
	r := itest.RunCmd(tb, time.Minute, pm2Cmd(cli, home, nil, "kill"))
	if r.Code != 0 {
		tb.Logf("pm2 kill: %v", r)
	}
	b, err := os.ReadFile(filepath.Join(home, "pm2.pid"))
	if err != nil {
		return // pm2 kill removed it, or no daemon ever ran
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 || !itest.Alive(pid) {
		return
	}
	cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if !strings.Contains(string(cmdline), home) {
		return // not ours (a recycled PID)
	}
	for _, k := range itest.Children(pid) {
		_ = syscall.Kill(k.PID, syscall.SIGKILL)
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	if !itest.Poll(10*time.Second, func() bool { return !itest.Alive(pid) }) {
		tb.Errorf("PM2 daemon %d still alive 10s after SIGKILL", pid)
	}
}

// benchPM2Cluster is the PM2 half: pm2 start -i max --kill-timeout 1600 on
// the classic Express app (testdata/cluster/pm2-app.js), pm2 reload app.
func benchPM2Cluster(b *testing.B, root, cli, modules string, express bool) *cvpSide {
	b.Helper()
	dir := b.TempDir()
	home := filepath.Join(dir, "pm2home")
	app := filepath.Join(dir, "app.js")
	itest.CopyFile(b, filepath.Join(root, "testdata", "cluster", "pm2-app.js"), app, 0o644)
	port := freePort(b)
	env := []string{"PORT=" + strconv.Itoa(port), "HOST=127.0.0.1"}
	if express {
		env = append(env, "NODE_PATH="+modules)
	}
	b.Cleanup(func() { killPM2Daemon(b, cli, home) })
	r := itest.RunCmd(b, 2*time.Minute, pm2Cmd(cli, home, env, "start", app, "-i", "max", "--kill-timeout", "1600", "--name", "app"))
	if r.Code != 0 {
		b.Fatalf("pm2 start: %v", r)
	}
	pidB, err := os.ReadFile(filepath.Join(home, "pm2.pid"))
	daemon, _ := strconv.Atoi(strings.TrimSpace(string(pidB)))
	if err != nil || daemon <= 1 {
		b.Fatalf("PM2 daemon PID file: %q, %v", pidB, err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	workers := func() []int { return itest.PIDs(itest.LiveChildren(daemon)) }
	n := runtime.NumCPU()
	itest.Eventually(b, 60*time.Second, func() bool {
		r, err := itest.Get(addr, "/healthz")
		return err == nil && r.Status == 200 && len(workers()) == n
	}, "PM2's %d workers to answer on %s", n, addr)
	t := &cvpTarget{
		name: "pm2 -i max (" + strconv.Itoa(n) + ")", metric: "pm2",
		addr: addr, port: port, supervisor: daemon,
		children: workers,
		reload: func() error {
			r := itest.RunCmd(b, 2*time.Minute, pm2Cmd(cli, home, env, "reload", "app"))
			if r.Code != 0 {
				return fmt.Errorf("pm2 reload: exit %d: %s%s", r.Code, r.Stdout, r.Stderr)
			}
			return nil
		},
		serving: func(victim int) {
			itest.Poll(30*time.Second, func() bool {
				ws := workers()
				return len(ws) == n && !slices.Contains(ws, victim)
			})
		},
	}
	s := cvpRun(b, t)
	killPM2Daemon(b, cli, home)
	return s
}

func freePort(tb testing.TB) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func sumRSS(pids []int) int64 {
	var sum int64
	for _, p := range pids {
		if kib, ok := itest.VmRSS(p); ok {
			sum += kib
		}
	}
	return sum
}

// rssSum samples the sum of VmRSS over the processes pids returns.
type rssSum struct {
	maxSum, maxOne int64 // KiB; maxOne is the max of the supervisor alone
	stop           func()
}

func sampleRSSSum(b *testing.B, pids func() []int, supervisor int) *rssSum {
	r := &rssSum{}
	r.stop = itest.Every(b, 100*time.Millisecond, func() {
		r.maxSum = max(r.maxSum, sumRSS(pids()))
		if kib, ok := itest.VmRSS(supervisor); ok {
			r.maxOne = max(r.maxOne, kib)
		}
	})
	return r
}

// cvpPercentile returns the nearest-rank p-th percentile (0..100) of xs, 0
// when empty.
func cvpPercentile(xs []float64, p float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := min(max(int(p/100*float64(len(s))+0.5)-1, 0), len(s)-1)
	return s[i]
}

func cvpMax(xs []float64) float64 {
	m := 0.0
	for _, x := range xs {
		m = max(m, x)
	}
	return m
}
