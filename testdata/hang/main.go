// Command hang is a broken "new version" of handoff used by the integration
// tests: it writes one line to stderr and then blocks until it is killed,
// never signalling readiness to its parent. SIGHUP, SIGINT and SIGTERM are
// ignored so only SIGKILL (the upgrade timeout, or the test's cleanup) ends it.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signal.Ignore(syscall.SIGHUP, syscall.SIGINT, syscall.SIGTERM)
	fmt.Fprintf(os.Stderr, "testdata-hang: pid %d blocking forever\n", os.Getpid())
	// A pending signal.Notify keeps the runtime's signal goroutine alive, so
	// the receive below blocks without tripping the deadlock detector.
	never := make(chan os.Signal, 1)
	signal.Notify(never, syscall.SIGUSR2)
	for range never {
	}
}
