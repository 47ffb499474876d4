package control

import (
	"errors"
	"fmt"

	"github.com/handoff-dev/handoff/internal/gate"
)

// Outcomes of an upgrade attempt that a caller can branch on with errors.Is and
// errors.As. Package upgrader re-exports them.
var (
	// ErrHandedOff: this generation already handed its listeners to a newer one.
	ErrHandedOff = errors.New("already handed off to a new generation")
	// ErrBinaryMissing: the binary to exec does not exist (checked before forking).
	ErrBinaryMissing = errors.New("binary missing")
	// ErrBinaryNotExecutable: the binary exists but cannot be executed (checked before forking).
	ErrBinaryNotExecutable = errors.New("binary not executable")
	// ErrTimeout: the new process did not become ready within the upgrade timeout
	// and was killed.
	ErrTimeout = errors.New("new process timed out before ready")
	// ErrPreflight: the new binary's check command failed; nothing was forked to serve.
	ErrPreflight = errors.New("preflight check failed")
)

// ExitError reports a new process that exited before it was ready.
type ExitError struct {
	PID    int      // the new process's PID
	Status string   // as os.ProcessState says it: "exit status 1", "signal: killed"
	Code   int      // the exit code, or -1 when it was killed by a signal
	Stderr []string // the last lines it wrote to stderr
}

func (e *ExitError) Error() string {
	return fmt.Sprintf("new process %d exited before ready: %s", e.PID, e.Status)
}

// TimeoutError reports a new process killed for not becoming ready in time; it
// matches ErrTimeout.
type TimeoutError struct {
	PID     int
	Stderr  []string // the last lines it wrote to stderr
	Stopped bool     // it was told to stop and drain what it accepted, rather than killed
}

func (e *TimeoutError) Error() string {
	if e.Stopped {
		return fmt.Sprintf("new process %d timed out before ready and was told to stop (it drains what it accepted)", e.PID)
	}
	return fmt.Sprintf("new process %d timed out before ready and was killed", e.PID)
}

func (e *TimeoutError) Unwrap() error { return ErrTimeout }

// PreflightError reports a failed check of the new binary; it matches ErrPreflight.
type PreflightError struct {
	Status string   // "exit status 1", or why it could not run
	Output []string // the last lines of its output
}

func (e *PreflightError) Error() string {
	msg := "preflight check failed: " + e.Status
	if n := len(e.Output); n > 0 {
		msg += ": " + e.Output[n-1]
	}
	return msg
}

func (e *PreflightError) Unwrap() error { return ErrPreflight }

// Kind names an outcome in one word, for logs and machine-readable answers.
type Kind string

// The kinds. The empty Kind means no error.
const (
	KindInProgress          Kind = "in-progress"
	KindDraining            Kind = "draining"
	KindNotReady            Kind = "not-ready"
	KindStopping            Kind = "stopping"
	KindHandedOff           Kind = "handed-off"
	KindBinaryMissing       Kind = "binary-missing"
	KindBinaryNotExecutable Kind = "binary-not-executable"
	KindExited              Kind = "exited"
	KindTimeout             Kind = "timeout"
	KindPreflight           Kind = "preflight"
	KindOther               Kind = "other"
	KindRefused             Kind = "refused"     // the control socket refused the peer
	KindBadRequest          Kind = "bad-request" // the control socket could not read the request
)

// Busy reports whether the kind means "retry later": another upgrade runs, or
// the previous generation still drains.
func (k Kind) Busy() bool { return k == KindInProgress || k == KindDraining }

// KindOf names err; "" for nil.
func KindOf(err error) Kind {
	var exit *ExitError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &exit):
		return KindExited
	case errors.Is(err, gate.ErrUpgradeInProgress):
		return KindInProgress
	case errors.Is(err, gate.ErrParentDraining):
		return KindDraining
	case errors.Is(err, gate.ErrNotReady):
		return KindNotReady
	case errors.Is(err, gate.ErrStopping):
		return KindStopping
	case errors.Is(err, ErrHandedOff):
		return KindHandedOff
	case errors.Is(err, ErrBinaryMissing):
		return KindBinaryMissing
	case errors.Is(err, ErrBinaryNotExecutable):
		return KindBinaryNotExecutable
	case errors.Is(err, ErrTimeout):
		return KindTimeout
	case errors.Is(err, ErrPreflight):
		return KindPreflight
	}
	return KindOther
}
