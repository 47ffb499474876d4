package upgrader

import (
	"errors"
	"fmt"
	"testing"

	"github.com/handoff-dev/handoff/internal/control"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The strings are tableflip v1.2.3's (upgrader.go, doUpgrade and run).
func TestFromTableflip(t *testing.T) {
	for _, tc := range []struct {
		tableflip string
		kind      string
		exit      *ExitError
	}{
		{"child pid=42 exited: exit status 1", "exited", &ExitError{PID: 42, Status: "exit status 1", Code: 1}},
		{"child pid=7 exited: signal: killed", "exited", &ExitError{PID: 7, Status: "signal: killed", Code: -1}},
		{"child pid=9 exited", "exited", &ExitError{PID: 9, Status: "exit status 0", Code: 0}},
		{"new child pid=11 timed out", "timeout", nil},
		{"upgrade in progress", "in-progress", nil},
		{"parent hasn't exited", "draining", nil},
		{"process is not ready yet", "not-ready", nil},
		{"terminating", "stopping", nil},
		{"already upgraded", "handed-off", nil},
		{"can't start child: pipe failed: too many open files", "other", nil},
		{"child pid= exited", "other", nil},
		{"child pid=12 exitedx", "other", nil},
		{"new child pid=13 timed out later", "other", nil},
	} {
		t.Run(tc.tableflip, func(t *testing.T) {
			err := fromTableflip(errors.New(tc.tableflip))
			assert.Equal(t, tc.kind, kindOf(err))
			if tc.exit != nil {
				var exit *ExitError
				require.ErrorAs(t, err, &exit)
				assert.Equal(t, tc.exit, exit)
			}
			if tc.kind == "other" {
				assert.Contains(t, err.Error(), tc.tableflip)
			}
		})
	}
	assert.NoError(t, fromTableflip(nil))
}

func TestKindOfWrappedErrors(t *testing.T) {
	assert.Equal(t, "", kindOf(nil))
	assert.Equal(t, "binary-missing", kindOf(fmt.Errorf("x: %w", ErrBinaryMissing)))
	assert.Equal(t, "binary-not-executable", kindOf(fmt.Errorf("x: %w", ErrBinaryNotExecutable)))
	assert.Equal(t, "exited", kindOf(fmt.Errorf("x: %w", &ExitError{PID: 1})))
}

func kindOf(err error) string { return string(control.KindOf(err)) }
