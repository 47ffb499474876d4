// Package metrics exposes a handoff generation's metrics in Prometheus's text
// exposition format. It is a package of its own so that an embedder of
// package upgrader who does not want metrics does not get them: wire it in
// with the hooks of upgrader.Options.
//
//	m := metrics.New(srv.InFlight)
//	opts := upgrader.Options{OnUpgrade: m.OnUpgrade, Handover: m.Handover,
//		OnPreviousDrained: m.OnPreviousDrained}
//	upg, _ := upgrader.New(opts)
//	m.Start(upg.Generation(), upg.Inherited())
//	// serve m.Handler() on a listener from upg.Listen: it is handed over like
//	// the others, so the endpoint never goes away during an upgrade.
//
// The counters that describe the service (upgrades by result, drained
// connections by outcome) continue across generations: each generation hands
// its values to the next (Options.Handover), which starts from them.
//
// The format is written here rather than with
// github.com/prometheus/client_golang: that module's package initialisation
// (its default registry's Go and process collectors, protobuf, procfs, YAML)
// costs about 0.8 ms at every start of the binary, which is on the critical
// path of every upgrade, and it doubles the size of the binary. The families
// are few and fixed; the tests check the output with Prometheus's own parser.
// An embedder who uses client_golang for its own metrics serves them beside
// these (another path, or WriteTo followed by its own text output: families
// with distinct names may be concatenated).
package metrics

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/handoff-dev/handoff/upgrader"
)

// The values of the result label of handoff_upgrades_total.
const (
	ResultOK       = "ok"        // a new generation took over
	ResultFailed   = "failed"    // the new process failed: the old one serves on
	ResultBusy     = "busy"      // refused: an upgrade runs, or the previous generation drains
	ResultNotReady = "not-ready" // refused: nothing serves yet
	ResultStopping = "stopping"  // refused: a stop began
)

// The buckets of the two histograms, in seconds.
var (
	upgradeBuckets = []float64{.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60}
	drainBuckets   = []float64{.001, .005, .01, .05, .1, .5, 1, 2, 5, 10, 30, 60}
)

// Metrics are one generation's metrics. Create them with New; they are safe
// for concurrent use.
type Metrics struct {
	inFlight func() int64

	mu              sync.Mutex
	counts          map[string]map[string]float64 // "upgrades" by result, "drain" by outcome
	generation      int
	upgradeDuration histogram
	drainDuration   histogram
	children        func() []Child
}

// New returns the metrics of a generation; inFlight, if not nil, reports the
// requests being served (package server's Server.InFlight). The Go runtime's
// and the process's usual metrics (go_goroutines, process_resident_memory_bytes
// and others, named as client_golang names them) are included.
func New(inFlight func() int64) *Metrics {
	return &Metrics{
		inFlight:        inFlight,
		counts:          map[string]map[string]float64{"upgrades": {}, "drain": {}},
		upgradeDuration: newHistogram(upgradeBuckets),
		drainDuration:   newHistogram(drainBuckets),
	}
}

// Handler serves the metrics in Prometheus's text format.
func (m *Metrics) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		m.WriteTo(w)
	})
}

// handover is what a generation passes to the next.
type handover struct {
	Counts       map[string]map[string]float64 `json:"counts"`
	AttemptStart int64                         `json:"attempt_start_unix_nano"`
}

// Start sets the generation and takes the counters the previous generation
// handed over (upgrader's Inherited); a generation started by an upgrade also
// counts that upgrade, which succeeded since it runs.
func (m *Metrics) Start(generation int, inherited []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.generation = generation
	var h handover
	if len(inherited) == 0 || json.Unmarshal(inherited, &h) != nil {
		return
	}
	for _, family := range []string{"upgrades", "drain"} {
		for label, v := range h.Counts[family] {
			if v > 0 {
				m.counts[family][label] += v
			}
		}
	}
	m.counts["upgrades"][ResultOK]++
	if h.AttemptStart > 0 {
		m.upgradeDuration.observe(time.Since(time.Unix(0, h.AttemptStart)).Seconds())
	}
}

// Handover is upgrader.Options.Handover: the counters, for the next generation.
func (m *Metrics) Handover() []byte {
	b, _ := json.Marshal(handover{Counts: m.snapshot(), AttemptStart: time.Now().UnixNano()})
	return b
}

// OnUpgrade is upgrader.Options.OnUpgrade: it counts each outcome. A success
// is counted here, for the moment this generation still answers, and by the
// new generation (Start), whose count starts from this one's before it.
func (m *Metrics) OnUpgrade(res upgrader.Result, err error) {
	switch {
	case err == nil:
		m.add("upgrades", ResultOK, 1)
	case errors.Is(err, upgrader.ErrUpgradeInProgress), errors.Is(err, upgrader.ErrParentDraining):
		m.add("upgrades", ResultBusy, 1)
	case errors.Is(err, upgrader.ErrNotReady):
		m.add("upgrades", ResultNotReady, 1)
	case errors.Is(err, upgrader.ErrStopping), errors.Is(err, upgrader.ErrHandedOff):
		m.add("upgrades", ResultStopping, 1)
	default:
		m.add("upgrades", ResultFailed, 1)
	}
}

// Succeeded counts a successful upgrade that took d, where the process that
// observes it lives on (handoff run's supervisor).
func (m *Metrics) Succeeded(generation int, d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.counts["upgrades"][ResultOK]++
	m.upgradeDuration.observe(d.Seconds())
	m.generation = generation
}

// OnPreviousDrained is upgrader.Options.OnPreviousDrained: what the previous
// generation's drain did.
func (m *Metrics) OnPreviousDrained(r upgrader.DrainReport) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.drainDuration.observe(r.Duration.Seconds())
	for outcome, n := range map[string]int{"idle": r.ClosedIdle, "closed_after_response": r.ClosedAfterResponse,
		"hijacked": r.Hijacked, "http2": r.HTTP2, "migrated": r.Moved, "cut": r.Cut} {
		if n > 0 {
			m.counts["drain"][outcome] += float64(n)
		}
	}
}

// add adds v to a counter (and so to the values handed over).
func (m *Metrics) add(family, label string, v float64) {
	m.mu.Lock()
	m.counts[family][label] += v
	m.mu.Unlock()
}

func (m *Metrics) snapshot() map[string]map[string]float64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := map[string]map[string]float64{}
	for f, vs := range m.counts {
		out[f] = map[string]float64{}
		for k, v := range vs {
			out[f][k] = v
		}
	}
	return out
}

// Child is one supervised process, for Supervised.
type Child struct {
	Instance int
	PID      int
	Phase    string // starting, serving, draining
	Restarts int
}

// Supervised adds the metrics of handoff run's children, read from children
// at each scrape: handoff_children{phase} and, per instance,
// handoff_child_restarts{instance} and handoff_child_pid{instance}.
func (m *Metrics) Supervised(children func() []Child) {
	m.mu.Lock()
	m.children = children
	m.mu.Unlock()
}

// WriteTo writes the metrics to w in Prometheus's text format (version 0.0.4).
func (m *Metrics) WriteTo(w io.Writer) (int64, error) {
	cw := &countingWriter{w: w}
	bw := bufio.NewWriter(cw)
	e := &encoder{w: bw}
	m.mu.Lock()
	e.family("handoff_upgrades_total", "counter", "Upgrades asked for, by result: ok, failed, busy, not-ready, stopping.")
	e.labelled("handoff_upgrades_total", "result", m.counts["upgrades"])
	e.family("handoff_upgrade_duration_seconds", "histogram", "From the start of an upgrade to the new generation's ready.")
	e.histogram("handoff_upgrade_duration_seconds", &m.upgradeDuration)
	e.family("handoff_generation", "gauge", "The serving generation: 1 for the first process, one more for each upgrade.")
	e.sample("handoff_generation", "", "", float64(m.generation))
	e.family("handoff_drain_duration_seconds", "histogram", "How long previous generations took to drain.")
	e.histogram("handoff_drain_duration_seconds", &m.drainDuration)
	e.family("handoff_drain_connections_total", "counter",
		"Connections at the end of drains, by outcome: idle, closed_after_response, hijacked, http2, migrated, cut.")
	e.labelled("handoff_drain_connections_total", "outcome", m.counts["drain"])
	children := m.children
	m.mu.Unlock()
	if m.inFlight != nil {
		e.family("handoff_requests_in_flight", "gauge", "Requests being served by this process.")
		e.sample("handoff_requests_in_flight", "", "", float64(m.inFlight()))
	}
	if children != nil {
		writeChildren(e, children())
	}
	writeRuntime(e)
	writeProcess(e)
	if e.err == nil {
		e.err = bw.Flush()
	}
	return cw.n, e.err
}

func writeChildren(e *encoder, children []Child) {
	phases := map[string]float64{"starting": 0, "serving": 0, "draining": 0}
	restarts, pids := map[string]float64{}, map[string]float64{}
	for _, c := range children {
		phases[c.Phase]++
		if c.Phase == "serving" {
			inst := strconv.Itoa(c.Instance)
			restarts[inst], pids[inst] = float64(c.Restarts), float64(c.PID)
		}
	}
	e.family("handoff_children", "gauge", "Supervised children, by phase.")
	e.labelled("handoff_children", "phase", phases)
	e.family("handoff_child_restarts", "gauge", "Restarts of the serving child of an instance after crashes.")
	e.labelled("handoff_child_restarts", "instance", restarts)
	e.family("handoff_child_pid", "gauge", "The PID of the serving child of an instance.")
	e.labelled("handoff_child_pid", "instance", pids)
}

// histogram is a Prometheus histogram: cumulative counts per upper bound.
type histogram struct {
	bounds []float64
	counts []uint64 // counts[i]: observations <= bounds[i] and > bounds[i-1]
	count  uint64
	sum    float64
}

func newHistogram(bounds []float64) histogram {
	return histogram{bounds: bounds, counts: make([]uint64, len(bounds))}
}

func (h *histogram) observe(v float64) {
	if i := sort.SearchFloat64s(h.bounds, v); i < len(h.bounds) {
		h.counts[i]++
	}
	h.count++
	h.sum += v
}

// encoder writes the text format; the first write error sticks.
type encoder struct {
	w   *bufio.Writer
	err error
}

func (e *encoder) write(parts ...string) {
	for _, p := range parts {
		if e.err != nil {
			return
		}
		_, e.err = e.w.WriteString(p)
	}
}

func (e *encoder) family(name, typ, help string) {
	e.write("# HELP ", name, " ", helpEscaper.Replace(help), "\n# TYPE ", name, " ", typ, "\n")
}

// sample writes one series; label is empty for a series without labels.
func (e *encoder) sample(name, label, value string, v float64) {
	if label == "" {
		e.write(name, " ", formatFloat(v), "\n")
		return
	}
	e.write(name, "{", label, `="`, labelEscaper.Replace(value), `"} `, formatFloat(v), "\n")
}

// labelled writes one series per label value, in order.
func (e *encoder) labelled(name, label string, values map[string]float64) {
	keys := make([]string, 0, len(values))
	for k := range values {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		e.sample(name, label, k, values[k])
	}
}

func (e *encoder) histogram(name string, h *histogram) {
	var cum uint64
	for i, b := range h.bounds {
		cum += h.counts[i]
		e.sample(name+"_bucket", "le", formatFloat(b), float64(cum))
	}
	e.sample(name+"_bucket", "le", "+Inf", float64(h.count))
	e.sample(name+"_sum", "", "", h.sum)
	e.sample(name+"_count", "", "", float64(h.count))
}

var (
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
	labelEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
)

func formatFloat(v float64) string {
	return strconv.FormatFloat(v, 'g', -1, 64) // +Inf, -Inf and NaN as the format spells them
}

type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}
