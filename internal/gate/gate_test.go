package gate

import (
	"fmt"
	"slices"
	"testing"
)

// state builds a gate in one of the states an owner can reach.
type state struct {
	ready, draining, attempt, stopping, handedOff bool
}

func (s state) gate() *Gate[int] {
	g := New[int](s.draining)
	if s.ready {
		g.Ready()
	}
	if s.attempt {
		// Only a ready, non-draining gate starts an attempt; the previous
		// generation may start draining during it (supervisor: a restart).
		g.ready, g.draining = true, false
		if d := g.Request(-1, API, false); d.Verdict != Start {
			panic("setup")
		}
		g.ready, g.draining = s.ready, s.draining
	}
	if s.stopping {
		g.Stop()
	}
	if s.handedOff {
		g.HandOff()
	}
	return g
}

// TestRequestEveryState covers every combination of the gate's state with
// every kind of request: signal or API, may wait or not.
func TestRequestEveryState(t *testing.T) {
	for _, s := range allStates() {
		for _, trig := range []Trigger{Signal, API} {
			for _, wait := range []bool{false, true} {
				name := fmt.Sprintf("%+v/%s/wait=%v", s, trig, wait)
				t.Run(name, func(t *testing.T) {
					g := s.gate()
					d := g.Request(1, trig, wait)
					want := expect(s, wait)
					if d.Verdict != want.Verdict || d.Err != want.Err {
						t.Fatalf("got %v %v, want %v %v", d.Verdict, d.Err, want.Verdict, want.Err)
					}
					// Whatever was decided, the phase follows the state.
					if got, want := g.Phase(), phaseOf(s, d.Verdict == Start); got != want {
						t.Fatalf("phase %s, want %s", got, want)
					}
				})
			}
		}
	}
}

func allStates() []state {
	var out []state
	for i := range 1 << 5 {
		out = append(out, state{i&1 != 0, i&2 != 0, i&4 != 0, i&8 != 0, i&16 != 0})
	}
	return out
}

// expect is the rule of the package doc, written independently of Request.
func expect(s state, wait bool) Decision {
	if s.stopping || s.handedOff {
		return Decision{Verdict: Refuse, Err: ErrStopping}
	}
	if s.attempt {
		return Decision{Verdict: Refuse, Err: ErrUpgradeInProgress}
	}
	if !s.ready || s.draining {
		if wait {
			return Decision{Verdict: Queue}
		}
		if !s.ready {
			return Decision{Verdict: Refuse, Err: ErrNotReady}
		}
		return Decision{Verdict: Refuse, Err: ErrParentDraining}
	}
	return Decision{Verdict: Start}
}

func phaseOf(s state, started bool) Phase {
	switch {
	case s.handedOff:
		return HandedOff
	case s.stopping:
		return Stopping
	case !s.ready:
		return Starting
	case s.attempt || started:
		return Upgrading
	case s.draining:
		return DrainingPrevious
	}
	return Serving
}

// TestQueuedStartOnlyWhenPossible: queued requests start together, and only
// once the generation is ready and the previous one has exited.
func TestQueuedStartOnlyWhenPossible(t *testing.T) {
	g := New[int](true)
	for i, trig := range []Trigger{Signal, Signal, API} {
		d := g.Request(i, trig, true)
		if d.Verdict != Queue || d.Reason != "this generation not ready yet" {
			t.Fatalf("request %d: %+v", i, d)
		}
		if wantRepeat := i == 1; d.Repeat != wantRepeat {
			t.Fatalf("request %d: repeat %v", i, d.Repeat)
		}
	}
	if g.Next() {
		t.Fatal("started before ready")
	}
	g.Ready()
	if d := g.Request(3, API, true); d.Reason != "previous generation still draining" {
		t.Fatalf("reason %q", d.Reason)
	}
	if g.Next() {
		t.Fatal("started while the previous generation drains")
	}
	g.PreviousExited()
	if !g.Next() {
		t.Fatal("queued requests did not start")
	}
	if g.Next() {
		t.Fatal("second start while one runs")
	}
	if d := g.Request(9, Signal, true); d.Err != ErrUpgradeInProgress {
		t.Fatalf("during the attempt: %+v", d)
	}
	if got := g.Done(); !slices.Equal(got, []int{0, 1, 2, 3}) {
		t.Fatalf("waiting %v", got)
	}
	if g.Next() || g.Attempting() {
		t.Fatal("nothing queued, nothing runs")
	}
	// The signal coalescing starts afresh after a start.
	if d := g.Request(10, Signal, true); d.Verdict != Start {
		t.Fatalf("after the attempt: %+v", d)
	}
}

// TestStopDuringEachPhase: a stop refuses queued requests, lets a running
// attempt's requests wait for its outcome, and refuses everything after.
func TestStopDuringEachPhase(t *testing.T) {
	for _, s := range allStates() {
		if s.stopping || s.handedOff {
			continue
		}
		t.Run(fmt.Sprintf("%+v", s), func(t *testing.T) {
			g := s.gate()
			d := g.Request(7, Signal, true)
			q := g.Stop()
			if d.Verdict == Queue && !slices.Equal(q, []int{7}) {
				t.Fatalf("queued request not returned by Stop: %v", q)
			}
			if d.Verdict != Queue && len(q) != 0 {
				t.Fatalf("Stop returned %v", q)
			}
			if g.Next() {
				t.Fatal("a start after Stop")
			}
			if d := g.Request(8, API, true); d.Err != ErrStopping {
				t.Fatalf("after Stop: %+v", d)
			}
			if g.Phase() != Stopping {
				t.Fatalf("phase %s", g.Phase())
			}
			if g.Attempting() {
				w := g.Done()
				if d.Verdict == Start && !slices.Equal(w, []int{7}) {
					t.Fatalf("waiting %v", w)
				}
			}
		})
	}
}

// TestLostDuringAttempt: the supervisor's serving child dies while an upgrade
// runs; the gate says nothing serves, and a failed attempt leaves it so, for
// the owner to restart.
func TestLostDuringAttempt(t *testing.T) {
	g := New[int](false)
	g.Ready()
	if d := g.Request(1, API, false); d.Verdict != Start {
		t.Fatal(d)
	}
	g.Lost()
	if g.Phase() != Starting {
		t.Fatalf("phase %s", g.Phase())
	}
	if d := g.Request(2, API, true); d.Err != ErrUpgradeInProgress {
		t.Fatalf("%+v", d)
	}
	g.Done()
	if d := g.Request(3, API, false); d.Err != ErrNotReady {
		t.Fatalf("no child serves: %+v", d)
	}
	if d := g.Request(4, Signal, true); d.Verdict != Queue {
		t.Fatalf("%+v", d)
	}
	g.Ready()
	if !g.Next() {
		t.Fatal("queued request did not start once a child serves")
	}
}

func BenchmarkRequest(b *testing.B) {
	g := New[int](false)
	g.Ready()
	for i := range b.N {
		g.Request(i, API, false)
		g.Done()
	}
}
