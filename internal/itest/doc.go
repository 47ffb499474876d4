// Package itest is the harness of handoff's integration tests, which exec the
// real binary and observe it from the outside only: its logs, its PID file,
// /proc and HTTP. It follows tailscale's tstest/integration:
//
//   - [Binary] builds the binaries once per test process (handoff-v1..v4 with
//     -X main.version=vN, and the broken programs under testdata/), and
//     [Main] removes them at the end.
//   - [Start] and [StartCmd] start a long-running process in its own process
//     group, its stdout and stderr read into [Logs]; the test's cleanup kills
//     the whole group and waits (bounded) for every process of it and for the
//     end of its output, then dumps the output when the test failed.
//   - [Run] and [Go] run a one-shot command in its own process group, killed
//     at a timeout; its output is complete when its [Result] is returned.
//   - [Poll], [Eventually] and [Logs.Wait] wait for a condition with a
//     deadline; nothing here sleeps to synchronise.
//   - [Server] is `handoff serve` under test, [Runner] is `handoff run`, and
//     [Load] is the load generator (`handoff load`, internal/loadgen).
//
// Reading output races the process: a line a process wrote is in [Logs]
// only once the reader goroutine got to it. So a wait for a line polls with
// a deadline while the process runs, and once it has exited, [Proc.Wait]
// returns only after the reader reached the end of the output: then
// [Logs.First] and [Logs.Find] see everything the process wrote.
//
// Every wait is bounded, and every failure names what it waited for.
package itest
