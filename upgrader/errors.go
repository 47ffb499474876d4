package upgrader

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/gate"
	"github.com/handoff-dev/handoff/internal/pidfile"
)

// Outcomes of Upgrade that a caller can branch on with errors.Is and errors.As.
var (
	// ErrUpgradeInProgress: another upgrade is running; its outcome is not known yet.
	ErrUpgradeInProgress = gate.ErrUpgradeInProgress
	// ErrParentDraining: the previous generation has not exited yet, and tableflip
	// allows a new upgrade only once it has. UpgradeAfterDrain waits instead.
	ErrParentDraining = gate.ErrParentDraining
	// ErrNotReady: Ready has not been called in this generation yet.
	ErrNotReady = gate.ErrNotReady
	// ErrStopping: Stop was called; no more upgrades happen.
	ErrStopping = gate.ErrStopping
	// ErrHandedOff: this generation already handed its listeners to a newer one.
	ErrHandedOff = control.ErrHandedOff
	// ErrBinaryMissing: the binary to exec does not exist (checked before forking).
	ErrBinaryMissing = control.ErrBinaryMissing
	// ErrBinaryNotExecutable: the binary exists but cannot be executed (checked before forking).
	ErrBinaryNotExecutable = control.ErrBinaryNotExecutable
	// ErrTimeout: the new process did not become ready within the upgrade timeout
	// and was killed.
	ErrTimeout = control.ErrTimeout
	// ErrPreflight: the new binary's check command failed; nothing was forked to serve.
	ErrPreflight = control.ErrPreflight
	// ErrPIDFile: the PID file cannot be written.
	ErrPIDFile = pidfile.ErrPIDFile
	// ErrForced: the drain was cut short by a second SIGTERM or SIGINT.
	ErrForced = errors.New("forced stop: second signal")
	// ErrControlSocket: the control socket cannot be opened.
	ErrControlSocket = errors.New("cannot open control socket")
)

// ExitError reports a new process that exited before it was ready: its PID,
// its exit status and the last lines it wrote to stderr.
type ExitError = control.ExitError

// TimeoutError reports a new process killed for not becoming ready in time; it
// matches ErrTimeout.
type TimeoutError = control.TimeoutError

// PreflightError reports a failed check of the new binary; it matches ErrPreflight.
type PreflightError = control.PreflightError

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
