// Package metrics exposes a handoff generation's Prometheus metrics, with
// github.com/prometheus/client_golang. It is a package of its own so that an
// embedder of package upgrader who does not want the dependency does not get
// it: wire it in with the hooks of upgrader.Options.
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
package metrics

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

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

// Metrics are one generation's metrics. Create them with New.
type Metrics struct {
	reg             *prometheus.Registry
	upgrades        *prometheus.CounterVec
	upgradeDuration prometheus.Histogram
	generation      prometheus.Gauge
	drainDuration   prometheus.Histogram
	drainConns      *prometheus.CounterVec

	// The counters' values, kept to hand them over (client_golang counters
	// cannot be read back cheaply).
	counts map[string]map[string]float64
	start  time.Time
}

// New returns the metrics of a generation; inFlight, if not nil, reports the
// requests being served (package server's Server.InFlight). The Go and process
// collectors are included.
func New(inFlight func() int64) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		upgrades: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "handoff_upgrades_total",
			Help: "Upgrades asked for, by result: ok, failed, busy, not-ready, stopping."}, []string{"result"}),
		upgradeDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "handoff_upgrade_duration_seconds",
			Help:    "From the start of an upgrade to the new generation's ready.",
			Buckets: []float64{.002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60}}),
		generation: prometheus.NewGauge(prometheus.GaugeOpts{Name: "handoff_generation",
			Help: "The serving generation: 1 for the first process, one more for each upgrade."}),
		drainDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "handoff_drain_duration_seconds",
			Help:    "How long previous generations took to drain.",
			Buckets: []float64{.001, .005, .01, .05, .1, .5, 1, 2, 5, 10, 30, 60}}),
		drainConns: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "handoff_drain_connections_total",
			Help: "Connections at the end of drains, by outcome: idle, closed_after_response, hijacked, http2, migrated, cut."},
			[]string{"outcome"}),
		counts: map[string]map[string]float64{"upgrades": {}, "drain": {}},
		start:  time.Now(),
	}
	m.reg.MustRegister(m.upgrades, m.upgradeDuration, m.generation, m.drainDuration, m.drainConns,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if inFlight != nil {
		m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "handoff_requests_in_flight",
			Help: "Requests being served by this process."}, func() float64 { return float64(inFlight()) }))
	}
	return m
}

// Registry is where the metrics are registered; add your own collectors to it.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Handler serves the metrics in Prometheus's text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg})
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
	m.generation.Set(float64(generation))
	var h handover
	if len(inherited) == 0 || json.Unmarshal(inherited, &h) != nil {
		return
	}
	for result, v := range h.Counts["upgrades"] {
		m.add("upgrades", result, v)
	}
	for outcome, v := range h.Counts["drain"] {
		m.add("drain", outcome, v)
	}
	m.add("upgrades", ResultOK, 1)
	if h.AttemptStart > 0 {
		m.upgradeDuration.Observe(time.Since(time.Unix(0, h.AttemptStart)).Seconds())
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
	m.add("upgrades", ResultOK, 1)
	m.upgradeDuration.Observe(d.Seconds())
	m.generation.Set(float64(generation))
}

// OnPreviousDrained is upgrader.Options.OnPreviousDrained: what the previous
// generation's drain did.
func (m *Metrics) OnPreviousDrained(r upgrader.DrainReport) {
	m.drainDuration.Observe(r.Duration.Seconds())
	for outcome, n := range map[string]int{"idle": r.ClosedIdle, "closed_after_response": r.ClosedAfterResponse,
		"hijacked": r.Hijacked, "http2": r.HTTP2, "migrated": r.Moved, "cut": r.Cut} {
		if n > 0 {
			m.add("drain", outcome, float64(n))
		}
	}
}

// add adds v to a counter and to the values handed over.
func (m *Metrics) add(family, label string, v float64) {
	switch family {
	case "upgrades":
		m.upgrades.WithLabelValues(label).Add(v)
	case "drain":
		m.drainConns.WithLabelValues(label).Add(v)
	}
	countsMu.Lock()
	m.counts[family][label] += v
	countsMu.Unlock()
}

func (m *Metrics) snapshot() map[string]map[string]float64 {
	countsMu.Lock()
	defer countsMu.Unlock()
	out := map[string]map[string]float64{}
	for f, vs := range m.counts {
		out[f] = map[string]float64{}
		for k, v := range vs {
			out[f][k] = v
		}
	}
	return out
}

// Child is one supervised process, for ChildCollector.
type Child struct {
	Instance int
	PID      int
	Phase    string // starting, serving, draining
	Restarts int
}

// Supervised registers the metrics of handoff run's children, read from
// children at each scrape: handoff_children{phase} and, per instance,
// handoff_child_restarts{instance} and handoff_child_pid{instance}.
func (m *Metrics) Supervised(children func() []Child) {
	m.reg.MustRegister(&childCollector{children: children})
}

type childCollector struct{ children func() []Child }

var (
	childrenDesc = prometheus.NewDesc("handoff_children", "Supervised children, by phase.", []string{"phase"}, nil)
	restartsDesc = prometheus.NewDesc("handoff_child_restarts", "Restarts of the serving child of an instance after crashes.",
		[]string{"instance"}, nil)
	pidDesc = prometheus.NewDesc("handoff_child_pid", "The PID of the serving child of an instance.", []string{"instance"}, nil)
)

func (c *childCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- childrenDesc
	ch <- restartsDesc
	ch <- pidDesc
}

func (c *childCollector) Collect(ch chan<- prometheus.Metric) {
	phases := map[string]int{"starting": 0, "serving": 0, "draining": 0}
	for _, k := range c.children() {
		phases[k.Phase]++
		if k.Phase == "serving" {
			inst := strconv.Itoa(k.Instance)
			ch <- prometheus.MustNewConstMetric(restartsDesc, prometheus.GaugeValue, float64(k.Restarts), inst)
			ch <- prometheus.MustNewConstMetric(pidDesc, prometheus.GaugeValue, float64(k.PID), inst)
		}
	}
	for phase, n := range phases {
		ch <- prometheus.MustNewConstMetric(childrenDesc, prometheus.GaugeValue, float64(n), phase)
	}
}
