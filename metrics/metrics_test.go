package metrics

import (
	"bytes"
	"errors"
	"net/http/httptest"
	"os"
	"runtime"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/handoff-dev/handoff/upgrader"
)

// parse reads m's output with Prometheus's own text parser, which rejects
// anything a Prometheus server would not scrape.
func parse(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if ct := rec.Header().Get("Content-Type"); expfmt.ResponseFormat(rec.Header()) != expfmt.NewFormat(expfmt.TypeTextPlain) {
		t.Errorf("Content-Type %q is not Prometheus's text format", ct)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(rec.Body.Bytes()))
	if err != nil {
		t.Fatalf("Prometheus's parser refuses the output: %v\n%s", err, rec.Body.String())
	}
	return fams
}

// value returns the value of the series of family name whose one label (if
// any) has value lv.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name, lv string) float64 {
	t.Helper()
	f, ok := fams[name]
	if !ok {
		t.Fatalf("no family %s", name)
	}
	for _, m := range f.Metric {
		if len(m.Label) > 0 && m.Label[0].GetValue() != lv {
			continue
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		}
	}
	t.Fatalf("%s has no series %q", name, lv)
	return 0
}

func TestOutputParsesAndCounts(t *testing.T) {
	in := int64(3)
	prev := New(nil)
	prev.Start(4, nil)
	prev.OnUpgrade(upgrader.Result{}, nil)
	prev.OnUpgrade(upgrader.Result{}, errors.New("new process exited"))
	prev.OnUpgrade(upgrader.Result{}, upgrader.ErrUpgradeInProgress)

	m := New(func() int64 { return in })
	m.Start(5, prev.Handover())
	m.OnUpgrade(upgrader.Result{}, upgrader.ErrNotReady)
	m.OnPreviousDrained(upgrader.DrainReport{Duration: 30 * time.Millisecond, ClosedIdle: 2, Moved: 7})
	fams := parse(t, m)

	for _, c := range []struct {
		name, label string
		want        float64
	}{
		{"handoff_generation", "", 5},
		{"handoff_requests_in_flight", "", 3},
		// 1 ok counted by the previous generation, and 1 by this one's Start.
		{"handoff_upgrades_total", ResultOK, 2},
		{"handoff_upgrades_total", ResultFailed, 1},
		{"handoff_upgrades_total", ResultBusy, 1},
		{"handoff_upgrades_total", ResultNotReady, 1},
		{"handoff_drain_connections_total", "idle", 2},
		{"handoff_drain_connections_total", "migrated", 7},
	} {
		if got := value(t, fams, c.name, c.label); got != c.want {
			t.Errorf("%s{%q} = %v, want %v", c.name, c.label, got, c.want)
		}
	}
	if typ := fams["handoff_upgrades_total"].GetType(); typ != dto.MetricType_COUNTER {
		t.Errorf("handoff_upgrades_total is a %v", typ)
	}

	h := fams["handoff_drain_duration_seconds"].Metric[0].Histogram
	if h.GetSampleCount() != 1 || h.GetSampleSum() != 0.03 {
		t.Errorf("drain histogram: count %d sum %v, want 1 and 0.03", h.GetSampleCount(), h.GetSampleSum())
	}
	for _, b := range h.Bucket {
		want := uint64(0)
		if b.GetUpperBound() >= 0.03 {
			want = 1
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("drain bucket le=%v: %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
		}
	}
	// The handed-over attempt start makes one upgrade duration.
	if n := fams["handoff_upgrade_duration_seconds"].Metric[0].Histogram.GetSampleCount(); n != 1 {
		t.Errorf("upgrade durations: %d, want 1", n)
	}

	// client_golang's names, which dashboards use.
	for _, name := range []string{"go_goroutines", "go_threads", "go_memstats_alloc_bytes", "go_memstats_heap_alloc_bytes",
		"go_memstats_alloc_bytes_total", "go_memstats_mallocs_total", "go_memstats_sys_bytes", "go_memstats_next_gc_bytes",
		"go_sched_gomaxprocs_threads", "go_gc_gomemlimit_bytes", "process_resident_memory_bytes", "process_virtual_memory_bytes",
		"process_virtual_memory_max_bytes", "process_open_fds", "process_max_fds"} {
		if v := value(t, fams, name, ""); v <= 0 {
			t.Errorf("%s = %v, want > 0", name, v)
		}
	}
	if typ := fams["go_gc_duration_seconds"].GetType(); typ != dto.MetricType_SUMMARY ||
		len(fams["go_gc_duration_seconds"].Metric[0].GetSummary().GetQuantile()) != 5 {
		t.Errorf("go_gc_duration_seconds: %v, want a summary of 5 quantiles", fams["go_gc_duration_seconds"])
	}
	if _, ok := fams["process_network_receive_bytes_total"]; !ok {
		t.Error("no process_network_receive_bytes_total")
	}
	if v := value(t, fams, "process_cpu_seconds_total", ""); v < 0 {
		t.Errorf("process_cpu_seconds_total = %v", v)
	}
	// The start time is this process's, within the clock's resolution.
	start := value(t, fams, "process_start_time_seconds", "")
	if now := float64(time.Now().Unix()); start > now+1 || start < now-24*3600*365 {
		t.Errorf("process_start_time_seconds = %v, now %v", start, now)
	}
	if v := value(t, fams, "go_info", runtime.Version()); v != 1 {
		t.Errorf("go_info = %v", v)
	}
}

func TestSupervisedChildren(t *testing.T) {
	m := New(nil)
	m.Succeeded(3, 40*time.Millisecond)
	m.Supervised(func() []Child {
		return []Child{{Instance: 0, PID: 101, Phase: "serving", Restarts: 2},
			{Instance: 1, PID: 102, Phase: "serving"}, {Instance: 1, PID: 99, Phase: "draining"}}
	})
	fams := parse(t, m)
	if _, ok := fams["handoff_requests_in_flight"]; ok {
		t.Error("handoff_requests_in_flight without an inFlight function")
	}
	for _, c := range []struct {
		name, label string
		want        float64
	}{
		{"handoff_generation", "", 3},
		{"handoff_upgrades_total", ResultOK, 1},
		{"handoff_children", "serving", 2},
		{"handoff_children", "draining", 1},
		{"handoff_children", "starting", 0},
		{"handoff_child_restarts", "0", 2},
		{"handoff_child_pid", "1", 102},
	} {
		if got := value(t, fams, c.name, c.label); got != c.want {
			t.Errorf("%s{%q} = %v, want %v", c.name, c.label, got, c.want)
		}
	}
}

// A garbled or hostile handover is ignored, and a label value that needs
// escaping comes out parseable.
func TestBadHandoverAndEscaping(t *testing.T) {
	m := New(nil)
	m.Start(2, []byte(`{"counts":{"upgrades":{"ok":-5,"x\"\n\\y":1}}}`))
	fams := parse(t, m)
	if v := value(t, fams, "handoff_upgrades_total", ResultOK); v != 1 {
		t.Errorf("ok = %v after a negative handover, want 1 (this generation's start)", v)
	}
	if v := value(t, fams, "handoff_upgrades_total", "x\"\n\\y"); v != 1 {
		t.Errorf("escaped label: %v", v)
	}
	m2 := New(nil)
	m2.Start(2, []byte("not json"))
	if v := value(t, parse(t, m2), "handoff_generation", ""); v != 2 {
		t.Errorf("generation %v", v)
	}
}

func TestWriteToReportsErrors(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "m")
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	if _, err := New(nil).WriteTo(f); err == nil {
		t.Error("WriteTo a closed file: no error")
	}
	var buf bytes.Buffer
	n, err := New(nil).WriteTo(&buf)
	if err != nil || n != int64(buf.Len()) {
		t.Errorf("WriteTo: n %d, err %v, wrote %d", n, err, buf.Len())
	}
}
