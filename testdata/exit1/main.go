// Command exit1 is a broken "new version" of handoff used by the integration
// tests: it writes one line to stderr and exits with status 1 straight away,
// without ever signalling readiness to its parent.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintf(os.Stderr, "testdata-exit1: pid %d failing on purpose\n", os.Getpid())
	os.Exit(1)
}
