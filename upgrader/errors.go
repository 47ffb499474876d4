package upgrader

import (
	"errors"
	"fmt"
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

// cutPID parses msg as prefix, a PID, and the rest, which it returns.
// (Parsed by hand rather than with regexp: a package-level regexp is compiled
// at every start of the binary, on the critical path of an upgrade.)
func cutPID(msg, prefix string) (pid int, rest string, ok bool) {
	s, ok := strings.CutPrefix(msg, prefix)
	if !ok {
		return 0, "", false
	}
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	pid, err := strconv.Atoi(s[:i])
	if err != nil {
		return 0, "", false
	}
	return pid, s[i:], true
}

// fromTableflip turns an error string of tableflip v1.2.3's Upgrade into one of
// ours. tableflip returns only plain strings; this is the one place that reads them
// (see errors_test.go for the strings it knows).
func fromTableflip(err error) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	if pid, rest, ok := cutPID(msg, "child pid="); ok && (rest == " exited" || strings.HasPrefix(rest, " exited: ")) {
		status := strings.TrimPrefix(strings.TrimPrefix(rest, " exited"), ": ")
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
	if pid, rest, ok := cutPID(msg, "new child pid="); ok && rest == " timed out" {
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
