package main_test

// The integration tests (integration_test.go, control_integration_test.go,
// run_test.go) and the benchmarks (bench_test.go, run_bench_test.go) drive the
// real handoff binary through the harness in internal/itest: it is built once
// per test process, every process runs in its own process group that the
// test's cleanup kills and waits for, and the processes are observed from the
// outside only (logs, the PID file, /proc, HTTP). Traffic goes to 127.0.0.1
// only. This file holds what the scenarios share.

import (
	"strings"
	"testing"

	"github.com/handoff-dev/handoff/internal/itest"
)

func TestMain(m *testing.M) { itest.Main(m) }

// Load used by the "under load" cases: open loop at loadRate req/s, a mix of
// pooled keep-alive connections, a new connection per request (30%) and slow
// requests (2%, 300ms).
const loadRate = 1000

func loadArgs() []string {
	return []string{"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", "300ms"}
}

// firstLine returns the first line of s, trimmed.
func firstLine(s string) string {
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}
