package upgrader

import (
	"os"
	"os/signal"
	"syscall"
)

// A new generation must not take over before its signal handlers are in
// place (Ready waits for them): a SIGTERM sent to it once it serves would
// otherwise kill it with nothing left serving. Their setup costs the Go
// runtime a thread of its own and a round trip to it per signal, 0.2 to 0.3 ms
// on a loaded machine, which Ready would wait for. So a new generation whose
// previous one handled signals starts that setup from this package's init,
// before main, and New adopts it (or undoes it, see takeEarlySignals).
const earlySignalsEnv = "HANDOFF_EARLY_SIGNALS"

var early struct {
	c   chan os.Signal
	set chan struct{}
}

func init() {
	if os.Getenv(tableflipEnv) != "" && os.Getenv(earlySignalsEnv) == "1" {
		early.c, early.set = notifySignals()
	}
}

// EarlySignals reports whether this process, a new generation whose previous
// one used Options.HandleSignals, has caught SIGHUP, SIGTERM and SIGINT since
// this package's init, for New to take over. From then (a goroutine started by
// init sets it up, a fraction of a millisecond after exec; a signal sent
// before still does what it would by default) until New they are held: New
// acts on them (a SIGTERM then fails Ready, and the
// previous generation serves on), and a new process that never calls New is
// killed by its previous generation at the upgrade timeout. A program that
// ignores SIGHUP until New, so that a reload sent too early cannot kill it,
// need not then: a signal.Ignore would lose a SIGHUP sent meanwhile (New
// catches it again). Without Options.HandleSignals, New stops catching them and
// raises again those it caught, to do what they would have done; a program
// that set a handler of its own for one of them before New gets that one
// twice.
func EarlySignals() bool { return early.c != nil }

// takeEarlySignals returns the notification started at init for New, if
// HandleSignals asks for it. Otherwise it undoes it: a signal caught meanwhile
// is raised again, so that it does what it would have done without it.
func takeEarlySignals(handle bool) (chan os.Signal, chan struct{}) {
	c, set := early.c, early.set
	early.c, early.set = nil, nil
	// The next generation starts it early if this one handles signals.
	if handle {
		os.Setenv(earlySignalsEnv, "1")
	} else {
		os.Unsetenv(earlySignalsEnv)
	}
	if c == nil {
		return nil, nil
	}
	if handle {
		// A signal.Ignore since init (a program that ignores SIGHUP until
		// New, say) took that signal off c: Notify again, in the background
		// like the first (Ready waits for it). It costs nothing for the
		// signals c still receives.
		again := make(chan struct{})
		go func() {
			<-set
			signal.Notify(c, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
			close(again)
		}()
		return c, again
	}
	<-set
	signal.Stop(c)
	close(c)
	for sig := range c {
		syscall.Kill(os.Getpid(), sig.(syscall.Signal))
	}
	return nil, nil
}

// notifySignals starts the Notify of HandleSignals in the background: sigSet
// is closed once c receives the signals.
func notifySignals() (c chan os.Signal, sigSet chan struct{}) {
	c, sigSet = make(chan os.Signal, 16), make(chan struct{})
	go func() {
		signal.Notify(c, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
		close(sigSet)
	}()
	return c, sigSet
}

// stopSignals undoes notifySignals.
func stopSignals(c chan os.Signal, sigSet chan struct{}) {
	<-sigSet // Notify, then Stop: never the other way round
	signal.Stop(c)
	close(c)
}
