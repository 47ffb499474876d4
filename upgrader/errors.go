package upgrader

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Outcomes of Upgrade that a caller can branch on with errors.Is and errors.As.
var (
	// ErrUpgradeInProgress: another upgrade is running; its outcome is not known yet.
	ErrUpgradeInProgress = errors.New("upgrade already in progress")
	// ErrParentDraining: the previous generation has not exited yet, and tableflip
	// allows a new upgrade only once it has. UpgradeAfterDrain waits instead.
	ErrParentDraining = errors.New("previous generation still draining")
	// ErrNotReady: Ready has not been called in this generation yet.
	ErrNotReady = errors.New("this generation is not ready yet")
	// ErrStopping: Stop was called; no more upgrades happen.
	ErrStopping = errors.New("stopping")
	// ErrHandedOff: this generation already handed its listeners to a newer one.
	ErrHandedOff = errors.New("already handed off to a new generation")
	// ErrBinaryMissing: the binary to exec does not exist (checked before forking).
	ErrBinaryMissing = errors.New("binary missing")
	// ErrBinaryNotExecutable: the binary exists but cannot be executed (checked before forking).
	ErrBinaryNotExecutable = errors.New("binary not executable")
	// ErrTimeout: the new process did not become ready within the upgrade timeout
	// and was killed.
	ErrTimeout = errors.New("new process timed out before ready")
	// ErrPIDFile: the PID file cannot be written.
	ErrPIDFile = errors.New("cannot write pid file")
	// ErrForced: the drain was cut short by a second SIGTERM or SIGINT.
	ErrForced = errors.New("forced stop: second signal")
	// ErrControlSocket: the control socket cannot be opened.
	ErrControlSocket = errors.New("cannot open control socket")
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
	PID    int
	Stderr []string // the last lines it wrote to stderr
}

func (e *TimeoutError) Error() string {
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

// withStderr attaches the new process's last stderr lines to err.
func withStderr(err error, lines []string) error {
	var exit *ExitError
	var timeout *TimeoutError
	switch {
	case errors.As(err, &exit):
		exit.Stderr = lines
	case errors.As(err, &timeout):
		timeout.Stderr = lines
	}
	return err
}

// Kind names an upgrade error in one word, for logs and machine-readable answers:
// "in-progress", "draining", "not-ready", "stopping", "handed-off", "binary-missing",
// "binary-not-executable", "exited", "timeout", "preflight" or "other"; "" for nil.
func Kind(err error) string {
	var exit *ExitError
	switch {
	case err == nil:
		return ""
	case errors.As(err, &exit):
		return "exited"
	case errors.Is(err, ErrUpgradeInProgress):
		return "in-progress"
	case errors.Is(err, ErrParentDraining):
		return "draining"
	case errors.Is(err, ErrNotReady):
		return "not-ready"
	case errors.Is(err, ErrStopping):
		return "stopping"
	case errors.Is(err, ErrHandedOff):
		return "handed-off"
	case errors.Is(err, ErrBinaryMissing):
		return "binary-missing"
	case errors.Is(err, ErrBinaryNotExecutable):
		return "binary-not-executable"
	case errors.Is(err, ErrTimeout):
		return "timeout"
	case errors.Is(err, ErrPreflight):
		return "preflight"
	}
	return "other"
}

var (
	tfExited   = regexp.MustCompile(`^child pid=(\d+) exited(?:: (.*))?$`)
	tfTimedOut = regexp.MustCompile(`^new child pid=(\d+) timed out$`)
)

// fromTableflip turns an error string of tableflip v1.2.3's Upgrade into one of
// ours. tableflip returns only plain strings; this is the one place that reads them
// (see errors_test.go for the strings it knows).
func fromTableflip(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	if m := tfExited.FindStringSubmatch(msg); m != nil {
		pid, _ := strconv.Atoi(m[1])
		status := m[2]
		if status == "" {
			status = "exit status 0"
		}
		code := -1
		if s, ok := strings.CutPrefix(status, "exit status "); ok {
			if n, err := strconv.Atoi(s); err == nil {
				code = n
			}
		}
		return &ExitError{PID: pid, Status: status, Code: code}
	}
	if m := tfTimedOut.FindStringSubmatch(msg); m != nil {
		pid, _ := strconv.Atoi(m[1])
		return &TimeoutError{PID: pid}
	}
	switch msg {
	case "upgrade in progress":
		return ErrUpgradeInProgress
	case "parent hasn't exited":
		return ErrParentDraining
	case "process is not ready yet":
		return ErrNotReady
	case "terminating":
		return ErrStopping
	case "already upgraded":
		return ErrHandedOff
	}
	return fmt.Errorf("upgrade: %w", err)
}
