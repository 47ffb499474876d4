package upgrader_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"time"

	"github.com/handoff-dev/handoff/server"
	"github.com/handoff-dev/handoff/upgrader"
)

// A complete server that upgrades itself on SIGHUP: the new process inherits the
// listener, opens its resources, says Ready; the old one then drains and exits.
func Example() {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	srv := &server.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "Hello World !!!")
	})}
	upg, err := upgrader.New(upgrader.Options{PIDFile: "/run/app.pid", Logger: log,
		HandleSignals: true,               // SIGHUP upgrades; SIGTERM/SIGINT stop, a second one at once
		StopAccepting: srv.StopAccepting}) // at once when a new generation is ready
	if err != nil {
		log.Error("cannot start", "error", err)
		os.Exit(1)
	}
	defer upg.Close() // last: removes the PID file after a final stop

	ln, err := upg.Listen("tcp", "127.0.0.1:8080") // inherited after an upgrade
	if err != nil {
		log.Error("cannot listen", "error", err)
		os.Exit(3)
	}
	// Open databases and files here, before Ready: until then the old process serves.
	go srv.Serve(ln)
	if moved := upg.Moved(); moved != nil {
		go srv.Serve(moved) // idle connections the previous generation hands over
	}
	if err := upg.Ready(); err != nil {
		log.Error("cannot become ready", "error", err)
		os.Exit(1)
	}

	<-upg.Done() // a new generation is ready, or a stop was asked for
	ctx, cancel := upg.DrainContext(context.Background(), 30*time.Second)
	defer cancel()
	// After a handoff, idle keep-alive connections move to the new generation.
	report, err := srv.DrainTo(ctx, upg.Mover())
	log.Info("drained", "requests", report.Requests, "moved", report.Moved, "cut", report.Cut, "error", err)
	// Close databases and files here: no handler runs any more (report.Running is 0).
}
