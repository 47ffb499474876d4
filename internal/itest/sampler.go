package itest

import (
	"sync"
	"testing"
	"time"
)

// Steady keeps the processes of a sample that were also in the previous one
// (prev, keyed by PID) and returns the next prev. A process counts only once
// it has lived across two samples: Go's runtime clones a child that exits at
// once (os.checkPidfd's probe, at a process's first StartProcess), which a
// single sample may catch.
func Steady[P any](prev map[int]bool, ps []P, pid func(P) int) ([]P, map[int]bool) {
	var out []P
	next := make(map[int]bool, len(ps))
	for _, p := range ps {
		next[pid(p)] = true
		if prev[pid(p)] {
			out = append(out, p)
		}
	}
	return out, next
}

// SteadyPIDs is [Steady] for samples of PIDs.
func SteadyPIDs(prev map[int]bool, ps []int) ([]int, map[int]bool) {
	return Steady(prev, ps, func(p int) int { return p })
}

// MaxSampler records the largest set of steady processes (see [Steady]) that
// its sample function returned. Read Max, MaxSeen and Samples once Stop has
// returned.
type MaxSampler[P any] struct {
	Max     int // the most processes at once
	MaxSeen []P // the sample that had them
	Samples int // how many samples were taken

	stop func()
}

// StartMaxSampler calls sample every period until [MaxSampler.Stop].
func StartMaxSampler[P any](every time.Duration, sample func() []P, pid func(P) int) *MaxSampler[P] {
	g := &MaxSampler[P]{}
	var prev map[int]bool
	g.stop = repeat(every, func() {
		var ps []P
		ps, prev = Steady(prev, sample(), pid)
		g.Samples++
		if len(ps) > g.Max {
			g.Max, g.MaxSeen = len(ps), ps
		}
	})
	return g
}

// Every calls f at once and then every period, in a goroutine of its own,
// until the stop it returns is called (stop waits for the goroutine, and may
// be called again) or tb ends.
func Every(tb testing.TB, every time.Duration, f func()) (stop func()) {
	stop = repeat(every, f)
	tb.Cleanup(stop)
	return stop
}

// repeat is Every without a test to end it.
func repeat(every time.Duration, f func()) (stop func()) {
	stopC, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			f()
			select {
			case <-stopC:
				return
			case <-tick.C:
			}
		}
	}()
	return sync.OnceFunc(func() { close(stopC); <-done })
}

// Stop ends the sampling and waits for the sampler's goroutine to return; it
// may be called again.
func (g *MaxSampler[P]) Stop() { g.stop() }

// StartGroupSampler counts the live processes of process group pgid.
func StartGroupSampler(pgid int, every time.Duration) *MaxSampler[int] {
	return StartMaxSampler(every, func() []int { return GroupProcs(pgid) }, func(p int) int { return p })
}

// StartChildSampler counts the live (non-zombie) children of ppid.
func StartChildSampler(ppid int, every time.Duration) *MaxSampler[Stat] {
	return StartMaxSampler(every, func() []Stat { return LiveChildren(ppid) }, func(s Stat) int { return s.PID })
}
