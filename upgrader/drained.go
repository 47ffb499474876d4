package upgrader

import (
	"encoding/json"
	"time"
)

// MaxHandover bounds what Options.Handover may pass to the next generation.
const MaxHandover = 2048

// DrainReport is what a generation's drain did, as the server reports it to
// Drained (package server's Report says the same in more detail).
type DrainReport struct {
	Requests            int64         // answered while draining
	ClosedIdle          int           // idle connections closed
	ClosedAfterResponse int           // connections closed after their last answer
	Hijacked            int           // hijacked connections (WebSockets) closed
	HTTP2               int           // HTTP/2 connections sent GOAWAY
	Moved               int           // connections handed to the new generation
	Cut                 int           // connections closed at the deadline
	Running             int64         // handlers still running at the end
	Duration            time.Duration // of the drain
	Err                 error         // why it ended early: the deadline, a second signal
}

// Drained reports what this generation's drain did. It answers a stop asked
// for over the control socket (`handoff stop` waits for it), and after a
// handoff it reaches the new generation (Options.OnPreviousDrained). Call it
// once, after the drain and before Close.
func (u *Upgrader) Drained(r DrainReport) {
	u.mu.Lock()
	select {
	case <-u.drainedC:
		u.mu.Unlock()
		return
	default:
	}
	u.drained = r
	close(u.drainedC)
	moves, successor := u.moves, u.handedTo != nil && u.successorMoves
	u.mu.Unlock()
	if moves != nil && successor {
		if err := moves.tell(r); err != nil {
			u.log.Warn("cannot tell the new generation how the drain went", "error", err)
		}
	}
}

// Inherited returns what the previous generation's Options.Handover passed to
// this one, or nil.
func (u *Upgrader) Inherited() []byte { return u.inherited }

// drainMessage is DrainReport on the moves channel.
type drainMessage struct {
	Requests   int64  `json:"requests"`
	ClosedIdle int    `json:"closed_idle"`
	ClosedResp int    `json:"closed_after_response"`
	Hijacked   int    `json:"hijacked"`
	HTTP2      int    `json:"http2"`
	Moved      int    `json:"moved"`
	Cut        int    `json:"cut"`
	Running    int64  `json:"running"`
	DurationNS int64  `json:"duration_ns"`
	Err        string `json:"error,omitempty"`
}

// drainPrefix starts a drain report on the moves channel; batches of
// descriptors carry their count instead.
const drainPrefix = 'D'

func (m *movesOut) tell(r DrainReport) error {
	dm := drainMessage{Requests: r.Requests, ClosedIdle: r.ClosedIdle, ClosedResp: r.ClosedAfterResponse,
		Hijacked: r.Hijacked, HTTP2: r.HTTP2, Moved: r.Moved, Cut: r.Cut, Running: r.Running, DurationNS: int64(r.Duration)}
	if r.Err != nil {
		dm.Err = r.Err.Error()
	}
	b, _ := json.Marshal(dm)
	m.conn.SetWriteDeadline(time.Now().Add(moveTimeout))
	_, err := m.conn.Write(append([]byte{drainPrefix}, b...))
	return err
}

func parseDrain(b []byte) (DrainReport, bool) {
	var dm drainMessage
	if len(b) < 2 || b[0] != drainPrefix || json.Unmarshal(b[1:], &dm) != nil {
		return DrainReport{}, false
	}
	r := DrainReport{Requests: dm.Requests, ClosedIdle: dm.ClosedIdle, ClosedAfterResponse: dm.ClosedResp,
		Hijacked: dm.Hijacked, HTTP2: dm.HTTP2, Moved: dm.Moved, Cut: dm.Cut, Running: dm.Running,
		Duration: time.Duration(dm.DurationNS)}
	if dm.Err != "" {
		r.Err = drainError(dm.Err)
	}
	return r, true
}

// drainError is the previous generation's error, by its text.
type drainError string

func (e drainError) Error() string { return string(e) }
