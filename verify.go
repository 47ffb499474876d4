// verify.go holds handoff verify: the proof on the user's own running server, a
// non-retrying load with upgrades through the control socket meanwhile.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os/signal"
	"slices"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/loadgen"
	"github.com/handoff-dev/handoff/internal/sockaddr"
)

// verifyTail is how long the load goes on after the last upgrade's verdict
// when the upgrades ran past --duration, so that the new process is seen
// serving.
const verifyTail = 500 * time.Millisecond

// verifySettle extends an upgrade's window for the latency during upgrades.
const verifySettle = 500 * time.Millisecond

// verifyUpgrade is one upgrade that verify asked for.
type verifyUpgrade struct {
	N       int             `json:"n"`
	AtMS    float64         `json:"at_ms"`   // when it was asked, from the start of the load
	TookMS  float64         `json:"took_ms"` // until its verdict
	OK      bool            `json:"ok"`
	Error   string          `json:"error,omitempty"`
	Answer  *control.Answer `json:"answer,omitempty"`
	FirstMS float64         `json:"first_response_ms,omitempty"` // from the request to the first response from the new process

	asked, answered time.Time
	noAnswer        bool
}

// verifyReport is handoff verify's verdict; --json prints it.
type verifyReport struct {
	OK             bool              `json:"ok"`
	Target         string            `json:"target"`
	Rate           int               `json:"rate"`
	Interrupted    bool              `json:"interrupted,omitempty"`
	Requests       int64             `json:"requests"`
	Failed         int64             `json:"failed"`
	Failures       map[string]int64  `json:"failures"`
	Errors         []string          `json:"errors"`
	Upgrades       []verifyUpgrade   `json:"upgrades"`
	UpgradesAsked  int               `json:"upgrades_asked"`
	UpgradesOK     int               `json:"upgrades_ok"`
	UpgradesFailed int               `json:"upgrades_failed"`
	Handoff        *verifyHandoff    `json:"handoff,omitempty"`
	Latency        verifyLatency     `json:"latency_ms"`
	PIDs           []loadgen.PIDStat `json:"pids"`
	ElapsedMS      float64           `json:"elapsed_ms"`
	Summary        string            `json:"summary"`
}

// verifyHandoff is the time the successful upgrades took.
type verifyHandoff struct {
	MedianMS float64 `json:"median_ms"`
	MaxMS    float64 `json:"max_ms"`
	// Source is "first-response" (from the upgrade request to the load's first
	// response from the new process) or "ready" (the server's duration_ms, when
	// the load saw no response from some new process).
	Source        string  `json:"source"`
	ReadyMedianMS float64 `json:"ready_median_ms"`
	ReadyMaxMS    float64 `json:"ready_max_ms"`
}

// verifyLatency is the latency of OK requests during upgrades and in steady
// state. An upgrade's window runs from its request to its verdict, or to the
// last response of a process that served before it (its drain), if later, and
// verifySettle beyond: the new process warms up meanwhile.
type verifyLatency struct {
	P99DuringMS    float64             `json:"p99_during_upgrades"`
	P99SteadyMS    float64             `json:"p99_steady"`
	DuringRequests int                 `json:"during_upgrades_requests"`
	SteadyRequests int                 `json:"steady_requests"`
	Overall        loadgen.Percentiles `json:"overall"`
}

// verifyCmd is handoff verify: a non-retrying load on a running server, with
// --upgrades upgrades through its control socket spread over --duration, and
// a verdict. It exits 0 only when no request failed and every upgrade
// succeeded.
func verifyCmd(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("handoff verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path, timeout := controlFlags(fs, 2*time.Minute, "each upgrade's verdict")
	target := fs.String("target", defaultListen, "the server's address to load, host:port or unix:/path (loopback only)")
	upgrades := fs.Int("upgrades", 3, "how many upgrades to ask for, spread over --duration")
	rate := fs.Int("rate", 200, "requests per second")
	duration := fs.Duration("duration", 10*time.Second, "how long to send (longer if the upgrades take longer)")
	conns := fs.Int("conns", 16, "pooled keep-alive connections at most")
	asJSON := fs.Bool("json", false, "print the verdict as JSON")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	sock, err := path()
	if err != nil || fs.NArg() > 0 {
		return fail(stderr, exitUsage, "handoff verify: %v", orUnexpected(err, fs))
	}
	switch {
	case *upgrades < 1:
		return fail(stderr, exitUsage, "handoff verify: --upgrades must be at least 1")
	case *rate < 1:
		return fail(stderr, exitUsage, "handoff verify: --rate must be at least 1")
	case *duration <= 0 || *timeout <= 0:
		return fail(stderr, exitUsage, "handoff verify: --duration and --timeout must be positive")
	case *conns < 1:
		return fail(stderr, exitUsage, "handoff verify: --conns must be at least 1")
	}
	cfg := loadgen.Config{Rate: *rate, Conns: *conns, Samples: true,
		// An upper bound only: the load is stopped once the upgrades are over
		// and --duration has passed.
		Duration: *duration + time.Duration(*upgrades)*(*timeout) + time.Minute}
	cfg.Network, cfg.Addr = sockaddr.Split(*target)
	if cfg.Network == "tcp" && !isLoopback(cfg.Addr) {
		return fail(stderr, exitUsage, "handoff verify: --target %s is not a loopback address; handoff verify only loads this host", cfg.Addr)
	}

	sigCtx, stopSignals := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stopSignals()
	// First, is anything there? Nothing is sent until the control socket answers.
	stCtx, cancel := context.WithTimeout(sigCtx, 10*time.Second)
	ans, err := control.Ask(stCtx, sock, control.Request{Cmd: control.CmdStatus})
	cancel()
	if code, done := askFailed("verify", err, stCtx, stderr); done {
		return code
	}
	if st := ans.Status; st != nil && !*asJSON {
		fmt.Fprintf(stdout, "verifying pid %d (version %s, generation %d): %d upgrades over %v, %d requests/s to %s\n",
			st.PID, st.Version, st.Generation, *upgrades, *duration, *rate, *target)
	}

	loadCtx, stopLoad := context.WithCancel(sigCtx)
	defer stopLoad()
	type loadDone struct {
		res *loadgen.Result
		err error
	}
	loadC := make(chan loadDone, 1)
	start := time.Now()
	go func() {
		res, err := loadgen.Run(loadCtx, cfg)
		loadC <- loadDone{res, err}
	}()

	// The upgrades, one after the other, the i-th due at (i+1)/(N+1) of the
	// duration; one that runs late delays the next.
	var ups []verifyUpgrade
	var loadErr error
	loadEnded := false
	var res *loadgen.Result
	for i := range *upgrades {
		due := start.Add(time.Duration(i+1) * *duration / time.Duration(*upgrades+1))
		t := time.NewTimer(time.Until(due))
		select {
		case <-sigCtx.Done():
		case <-t.C:
		case d := <-loadC: // only an invalid config ends the load this early
			res, loadErr, loadEnded = d.res, d.err, true
		}
		t.Stop()
		if sigCtx.Err() != nil || loadEnded {
			break
		}
		u := askUpgrade(sigCtx, sock, *timeout)
		u.N, u.AtMS = i+1, ms(u.asked.Sub(start))
		ups = append(ups, u)
		if !*asJSON {
			printUpgrade(stdout, u)
		}
	}
	if !loadEnded {
		// The load goes on until --duration has passed, and a little after the
		// last verdict if the upgrades ran late.
		end := start.Add(*duration)
		if n := len(ups); n > 0 && ups[n-1].answered.Add(verifyTail).After(end) {
			end = ups[n-1].answered.Add(verifyTail)
		}
		t := time.NewTimer(time.Until(end))
		select {
		case <-sigCtx.Done():
		case <-t.C:
		case d := <-loadC:
			res, loadErr, loadEnded = d.res, d.err, true
		}
		t.Stop()
		stopLoad()
		if !loadEnded {
			d := <-loadC
			res, loadErr = d.res, d.err
		}
	}
	if loadErr != nil {
		return fail(stderr, exitUsage, "handoff verify: %v", loadErr)
	}

	rep := newVerifyReport(res, ups, *upgrades, *target, *rate, sigCtx.Err() != nil)
	if *asJSON {
		json.NewEncoder(stdout).Encode(rep)
	} else {
		printVerify(stdout, rep)
	}
	switch {
	case rep.OK:
		return exitOK
	case slices.ContainsFunc(ups, func(u verifyUpgrade) bool { return u.noAnswer }):
		return exitNoReply
	}
	return exitFailure
}

// askUpgrade asks for one upgrade (waiting for a draining previous
// generation) and waits for its verdict. An answer from a generation that has
// handed off already, or while another upgrade runs (a SIGHUP, another
// operator), did nothing: it is asked again until the timeout.
func askUpgrade(ctx context.Context, sock string, timeout time.Duration) verifyUpgrade {
	u := verifyUpgrade{asked: time.Now()}
	ctx, cancel := context.WithTimeoutCause(ctx, timeout,
		fmt.Errorf("no verdict within %v; the upgrade may still finish: run handoff status", timeout))
	defer cancel()
	for {
		ans, err := control.Ask(ctx, sock, control.Request{Cmd: control.CmdUpgrade, Wait: true})
		if err == nil && !ans.OK && (ans.Kind == control.KindHandedOff || ans.Kind == control.KindInProgress) {
			t := time.NewTimer(20 * time.Millisecond)
			select {
			case <-ctx.Done():
				err = context.Cause(ctx)
			case <-t.C:
				t.Stop()
				continue
			}
		}
		u.answered = time.Now()
		u.TookMS = ms(u.answered.Sub(u.asked))
		switch {
		case err != nil:
			u.Error, u.noAnswer = err.Error(), errors.Is(err, control.ErrNoAnswer)
		case !ans.OK:
			u.Error, u.Answer = ans.Error, &ans
		case ans.Upgrade == nil:
			u.Error, u.Answer = "the answer has no upgrade outcome", &ans
		default:
			u.OK, u.Answer = true, &ans
		}
		return u
	}
}

// printUpgrade prints one upgrade's verdict as it arrives.
func printUpgrade(w io.Writer, u verifyUpgrade) {
	at := time.Duration(u.AtMS * float64(time.Millisecond)).Round(time.Millisecond)
	if u.OK {
		o := u.Answer.Upgrade
		fmt.Fprintf(w, "upgrade %d at %v: pid %d -> %d, version %s, generation %d, ready in %.1f ms\n",
			u.N, at, u.Answer.PID, o.PID, o.Version, o.Generation, o.DurationMS)
		return
	}
	fmt.Fprintf(w, "upgrade %d at %v failed: %s\n", u.N, at, u.Error)
	if u.Answer == nil {
		return
	}
	if o := u.Answer.Upgrade; o != nil {
		if o.ExitStatus != "" {
			fmt.Fprintf(w, "  new process %d: %s\n", o.PID, o.ExitStatus)
		}
		if len(o.Stderr) > 0 {
			fmt.Fprintf(w, "  its last lines of output:\n")
			for _, l := range o.Stderr {
				fmt.Fprintf(w, "    %s\n", l)
			}
		}
	}
	if u.Answer.PID != 0 && u.Answer.Kind != control.KindStopping {
		fmt.Fprintf(w, "  pid %d keeps serving\n", u.Answer.PID)
	}
}

// newVerifyReport puts the load's result and the upgrades' verdicts together.
func newVerifyReport(res *loadgen.Result, ups []verifyUpgrade, asked int, target string, rate int, interrupted bool) *verifyReport {
	rep := &verifyReport{Target: target, Rate: rate, Interrupted: interrupted, Requests: res.Requests,
		Failed: res.Failed, Failures: res.Failures, Errors: res.Errors, Upgrades: ups, UpgradesAsked: asked,
		PIDs: res.PIDs, ElapsedMS: ms(res.Elapsed)}
	rep.Latency.Overall = res.Latency

	// Handoff times: to the first response from the new process, else the
	// server's ready time.
	var first, ready []float64
	pidStat := map[int]loadgen.PIDStat{}
	for _, p := range res.PIDs {
		pidStat[p.PID] = p
	}
	for i := range ups {
		u := &ups[i]
		if !u.OK {
			rep.UpgradesFailed++
			continue
		}
		rep.UpgradesOK++
		o := u.Answer.Upgrade
		ready = append(ready, o.DurationMS)
		if p, ok := pidStat[o.PID]; ok && o.PID != 0 && p.First >= u.asked.UnixNano() {
			u.FirstMS = ms(time.Duration(p.First - u.asked.UnixNano()))
			first = append(first, u.FirstMS)
		}
	}
	if len(ready) > 0 {
		h := &verifyHandoff{Source: "ready", ReadyMedianMS: median(ready), ReadyMaxMS: slices.Max(ready)}
		h.MedianMS, h.MaxMS = h.ReadyMedianMS, h.ReadyMaxMS
		if len(first) == len(ready) {
			h.Source, h.MedianMS, h.MaxMS = "first-response", median(first), slices.Max(first)
		}
		rep.Handoff = h
	}

	// Latency during the upgrades' windows and outside them.
	type window struct{ from, to int64 }
	var wins []window
	for _, u := range ups {
		w := window{u.asked.UnixNano(), u.answered.UnixNano()}
		for _, p := range res.PIDs {
			// A process that served before the upgrade and after its request
			// drains in it: its last response ends the window.
			if u.OK && p.PID != u.Answer.Upgrade.PID && p.First < w.from && p.Last > w.from {
				w.to = max(w.to, p.Last)
			}
		}
		w.to += int64(verifySettle)
		wins = append(wins, w)
	}
	var during, steady []int64
	for _, s := range res.Samples {
		if !s.OK {
			continue
		}
		in := slices.ContainsFunc(wins, func(w window) bool { return s.Start >= w.from && s.Start <= w.to })
		if in {
			during = append(during, s.LatencyUS)
		} else {
			steady = append(steady, s.LatencyUS)
		}
	}
	rep.Latency.P99DuringMS, rep.Latency.DuringRequests = p99(during), len(during)
	rep.Latency.P99SteadyMS, rep.Latency.SteadyRequests = p99(steady), len(steady)

	rep.OK = !interrupted && res.Failed == 0 && rep.UpgradesOK == asked
	rep.Summary = rep.summary()
	return rep
}

// summary is the verdict's last line.
func (r *verifyReport) summary() string {
	var b strings.Builder
	if r.OK {
		b.WriteString("ok: ")
	} else {
		b.WriteString("failed: ")
	}
	fmt.Fprintf(&b, "%d requests, %d failed", r.Requests, r.Failed)
	if r.Failed > 0 {
		fmt.Fprintf(&b, " (%s)", kinds(r.Failures))
	}
	fmt.Fprintf(&b, ", %d of %d upgrades", r.UpgradesOK, r.UpgradesAsked)
	if r.Handoff != nil {
		fmt.Fprintf(&b, ", handoff median %.1f ms", r.Handoff.MedianMS)
	}
	if r.Interrupted {
		b.WriteString("; interrupted")
	}
	for _, u := range r.Upgrades {
		if !u.OK {
			fmt.Fprintf(&b, "; upgrade %d failed: %s", u.N, u.Error)
			break
		}
	}
	return b.String()
}

// printVerify prints the verdict after the upgrades' lines.
func printVerify(w io.Writer, r *verifyReport) {
	fmt.Fprintf(w, "load: %d requests in %v at %d/s, %d failed", r.Requests,
		time.Duration(r.ElapsedMS*float64(time.Millisecond)).Round(time.Millisecond), r.Rate, r.Failed)
	if r.Failed > 0 {
		fmt.Fprintf(w, " by kind: %s", kinds(r.Failures))
	}
	fmt.Fprintln(w)
	for _, e := range r.Errors {
		fmt.Fprintf(w, "  error: %s\n", e)
	}
	if h := r.Handoff; h != nil {
		if h.Source == "first-response" {
			fmt.Fprintf(w, "handoff: median %.1f ms, max %.1f ms, from the upgrade request to the first response from the new process"+
				" (ready in median %.1f ms, max %.1f ms)\n", h.MedianMS, h.MaxMS, h.ReadyMedianMS, h.ReadyMaxMS)
		} else {
			fmt.Fprintf(w, "handoff: median %.1f ms, max %.1f ms, from the upgrade request to the new process's ready"+
				" (the load did not see every new process: Handoff-Pid headers missing?)\n", h.MedianMS, h.MaxMS)
		}
	}
	l := r.Latency
	fmt.Fprintf(w, "latency ms: p99 during upgrades %s (%d requests), steady %s (%d requests); overall p50 %.3f, p99 %.3f, max %.3f\n",
		orNA(l.P99DuringMS, l.DuringRequests), l.DuringRequests, orNA(l.P99SteadyMS, l.SteadyRequests), l.SteadyRequests,
		l.Overall.P50, l.Overall.P99, l.Overall.Max)
	for _, p := range r.PIDs {
		fmt.Fprintf(w, "pid %d (version %q): %d responses\n", p.PID, p.Version, p.Count)
	}
	fmt.Fprintln(w, r.Summary)
}

// kinds is "read=2 timeout=1".
func kinds(m map[string]int64) string {
	var out []string
	for k, n := range m {
		out = append(out, fmt.Sprintf("%s=%d", k, n))
	}
	sort.Strings(out)
	return strings.Join(out, " ")
}

func orNA(v float64, n int) string {
	if n == 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.3f", v)
}

// p99 is the nearest-rank 99th percentile of latencies in µs, in ms.
func p99(us []int64) float64 {
	if len(us) == 0 {
		return 0
	}
	slices.Sort(us)
	i := max(int(math.Ceil(0.99*float64(len(us))))-1, 0)
	return float64(us[i]) / 1000
}

func median(v []float64) float64 {
	s := slices.Sorted(slices.Values(v))
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
