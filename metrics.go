// metrics.go holds the --metrics endpoint of handoff serve and handoff run.
package main

import (
	"context"
	"net"
	"net/http"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/sockaddr"
	"github.com/handoff-dev/handoff/internal/supervisor"
	"github.com/handoff-dev/handoff/metrics"
	"github.com/handoff-dev/handoff/server"
	"github.com/handoff-dev/handoff/upgrader"
)

// serveMetrics is handoff serve's /metrics: on a listener handed over like the
// others, so the endpoint never goes away during an upgrade, served by a
// server.Server of its own so that a scrape in flight at a handoff is answered.
type serveMetrics struct {
	addr string
	m    *metrics.Metrics
	ln   net.Listener
	srv  *server.Server
}

// newServeMetrics hooks the metrics into opts when addr is set; nil otherwise.
func newServeMetrics(addr string, app *server.Server, opts *upgrader.Options) *serveMetrics {
	if addr == "" {
		return nil
	}
	m := metrics.New(app.InFlight)
	opts.OnUpgrade, opts.Handover, opts.OnPreviousDrained = m.OnUpgrade, m.Handover, m.OnPreviousDrained
	return &serveMetrics{addr: addr, m: m}
}

// listen takes the counters the previous generation handed over and the
// listener for addr (inherited after an upgrade).
func (sm *serveMetrics) listen(upg *upgrader.Upgrader) (net.Addr, error) {
	sm.m.Start(upg.Generation(), upg.Inherited())
	network, addr := sockaddr.Split(sm.addr)
	ln, err := upg.ListenAs("metrics", network, addr) // by name: --listen may give the same address string
	if err != nil {
		return nil, err
	}
	sm.ln = ln
	return ln.Addr(), nil
}

// serve answers /metrics, from Ready on: a new generation that fails is
// never scraped.
func (sm *serveMetrics) serve(errs chan<- error) {
	if sm == nil {
		return
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", sm.m.Handler())
	sm.srv = &server.Server{Handler: mux}
	go func() { errs <- sm.srv.Serve(sm.ln) }()
}

// drain stops this generation's endpoint; the next one serves on.
func (sm *serveMetrics) drain(ctx context.Context) {
	switch {
	case sm == nil:
	case sm.srv != nil:
		sm.srv.Drain(ctx)
	case sm.ln != nil:
		sm.ln.Close() // never served: not ready
	}
}

// runMetrics is handoff run's /metrics: the same metrics, and the children's.
func runMetrics(addr string, opts *supervisor.Options, status func() control.Status) (*http.Server, net.Listener, error) {
	m := metrics.New(nil)
	m.Start(1, nil)
	opts.OnUpgrade = func(res control.Result, err error) {
		if err == nil {
			m.Succeeded(res.Generation, res.Duration)
			return
		}
		m.OnUpgrade(upgrader.Result{}, err)
	}
	m.Supervised(func() []metrics.Child {
		var out []metrics.Child
		for _, c := range status().Children {
			out = append(out, metrics.Child{Instance: c.Instance, PID: c.PID, Phase: string(c.Phase), Restarts: c.Restarts})
		}
		return out
	})
	network, address := sockaddr.Split(addr)
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln, nil
}
