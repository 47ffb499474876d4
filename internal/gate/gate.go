// Package gate is the upgrade admission state machine shared by package
// upgrader (one generation upgrading itself) and the supervisor of `handoff
// run` (a program's children). It decides, for every upgrade request, whether
// to start an attempt now, queue the request until one can start, or refuse it,
// and it names the phase that status reports.
//
// The gate is pure: no goroutines, no clocks, no processes. Its owner (one
// loop) feeds it events (Ready, Lost, Draining, PreviousExited, Done, Stop,
// HandOff) and performs the side effects it asks for. It is not safe for
// concurrent use.
//
// The rules, in order:
//
//   - after Stop or HandOff every request is refused (ErrStopping);
//   - while an attempt runs, a request is refused with ErrUpgradeInProgress: a
//     SIGHUP that arrives during an upgrade starts nothing more;
//   - while nothing serves (not ready yet, or the serving child was lost), or
//     while the previous generation drains, a request that may wait is queued and
//     one that may not is refused (ErrNotReady, ErrParentDraining);
//   - otherwise the attempt starts. Queued requests share the next attempt.
package gate

import "errors"

// Refusals. Package upgrader re-exports them.
var (
	// ErrUpgradeInProgress: another upgrade is running; its outcome is not known yet.
	ErrUpgradeInProgress = errors.New("upgrade already in progress")
	// ErrParentDraining: the previous generation has not exited yet.
	ErrParentDraining = errors.New("previous generation still draining")
	// ErrNotReady: nothing serves yet (Ready not called, or no child serving).
	ErrNotReady = errors.New("this generation is not ready yet")
	// ErrStopping: a stop began; no more upgrades happen.
	ErrStopping = errors.New("stopping")
)

// Phase is what status reports.
type Phase string

// The phases, as status reports them.
const (
	Starting         Phase = "starting"          // nothing serves yet
	Serving          Phase = "serving"           // ready, nothing else going on
	Upgrading        Phase = "upgrading"         // an attempt runs
	DrainingPrevious Phase = "draining-previous" // the previous generation drains
	Stopping         Phase = "stopping"          // a final stop began
	HandedOff        Phase = "handed-off"        // a new generation took over
)

// Trigger says where a request came from.
type Trigger string

// The triggers.
const (
	Signal Trigger = "signal" // SIGHUP
	API    Trigger = "api"    // a call or the control socket
)

// Verdict is the gate's answer to a request.
type Verdict int

// The verdicts.
const (
	Refuse Verdict = iota // answer at once with Decision.Err
	Queue                 // hold; a later Next starts it
	Start                 // start an attempt now; answer at Done
)

// Decision is the gate's answer to one request.
type Decision struct {
	Verdict Verdict
	Err     error  // Refuse: why
	Reason  string // Queue: what it waits for
	// Repeat is set when Queue holds a signal request while another signal
	// request is already queued: the two coalesce, so logging it again is noise.
	Repeat bool
}

// Gate holds the admission state. R is whatever the owner answers a request
// through (a reply channel, say); the gate only keeps it.
type Gate[R any] struct {
	ready     bool // something serves
	draining  bool // the previous generation (or an old child) has not exited
	attempt   bool // an attempt runs
	stopping  bool
	handedOff bool

	waiting  []R // answered when the running attempt ends
	queued   []R // answered by the attempt that Next starts
	queuedBy map[Trigger]bool
}

// New returns a gate for a generation that is not ready yet. draining says
// whether a previous generation is still alive.
func New[R any](draining bool) *Gate[R] {
	return &Gate[R]{draining: draining, queuedBy: map[Trigger]bool{}}
}

// Ready records that this generation (or a child) now serves.
func (g *Gate[R]) Ready() { g.ready = true }

// Lost records that nothing serves any more (the serving child died).
func (g *Gate[R]) Lost() { g.ready = false }

// Draining records that an old generation was told to drain.
func (g *Gate[R]) Draining() { g.draining = true }

// PreviousExited records that the previous generation has exited.
func (g *Gate[R]) PreviousExited() { g.draining = false }

// Request decides on one request: wait says whether it may be queued rather
// than refused when it cannot start now. On Start the gate holds r until Done;
// on Queue until Next or Stop.
func (g *Gate[R]) Request(r R, t Trigger, wait bool) Decision {
	switch {
	case g.stopping || g.handedOff:
		return Decision{Verdict: Refuse, Err: ErrStopping}
	case g.attempt:
		return Decision{Verdict: Refuse, Err: ErrUpgradeInProgress}
	case !g.ready && !wait:
		return Decision{Verdict: Refuse, Err: ErrNotReady}
	case g.draining && !wait:
		return Decision{Verdict: Refuse, Err: ErrParentDraining}
	case !g.ready || g.draining:
		reason := "previous generation still draining"
		if !g.ready {
			reason = "this generation not ready yet"
		}
		d := Decision{Verdict: Queue, Reason: reason, Repeat: t == Signal && g.queuedBy[t]}
		g.queuedBy[t] = true
		g.queued = append(g.queued, r)
		return d
	}
	g.attempt = true
	g.waiting = []R{r}
	return Decision{Verdict: Start}
}

// Next starts the queued requests' attempt if one can start now: it reports
// true, and the owner starts the attempt; the requests are answered at Done.
func (g *Gate[R]) Next() bool {
	if g.stopping || g.handedOff || g.attempt || !g.ready || g.draining || len(g.queued) == 0 {
		return false
	}
	g.attempt = true
	g.waiting, g.queued = g.queued, nil
	clear(g.queuedBy)
	return true
}

// Attempting reports whether an attempt runs.
func (g *Gate[R]) Attempting() bool { return g.attempt }

// Done ends the running attempt and returns the requests that wait for its
// outcome. A successful attempt is followed by HandOff (package upgrader) or by
// Ready and Draining (the supervisor).
func (g *Gate[R]) Done() []R {
	w := g.waiting
	g.attempt, g.waiting = false, nil
	return w
}

// HandOff records that a new generation took over: no more requests.
func (g *Gate[R]) HandOff() { g.handedOff = true }

// Stop records a final stop and returns the queued requests, to be refused with
// ErrStopping. A running attempt's requests stay until Done.
func (g *Gate[R]) Stop() []R {
	g.stopping = true
	q := g.queued
	g.queued = nil
	clear(g.queuedBy)
	return q
}

// Phase is what status reports now.
func (g *Gate[R]) Phase() Phase {
	switch {
	case g.handedOff:
		return HandedOff
	case g.stopping:
		return Stopping
	case !g.ready:
		return Starting
	case g.attempt:
		return Upgrading
	case g.draining:
		return DrainingPrevious
	}
	return Serving
}
