// Package sdnotify is the systemd notification sequence of `handoff serve` and
// `handoff run`, written once, over go-systemd's daemon.SdNotify:
//
//   - Ready at every generation's (or serving child's) readiness, with MAINPID
//     when the main process changes (handoff serve) so that systemd follows it
//     (NotifyAccess=all);
//   - Reloading when an upgrade starts; Failed when it fails, which sends
//     STATUS= and then READY=1, so that `systemctl reload` never hangs
//     (Type=notify-reload, reload signal SIGHUP);
//   - Stopping only on a final stop: never from a handoff, never from a new
//     generation that failed before it was ready (systemd would stop the unit
//     and kill the healthy generation).
//
// Every call does nothing without NOTIFY_SOCKET.
package sdnotify

import (
	"fmt"
	"log/slog"
	"strings"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends the sequence; Log receives send failures (nil: none).
type Notifier struct {
	Log *slog.Logger
}

func (n Notifier) send(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil && n.Log != nil {
		n.Log.Warn("cannot notify systemd", "state", state, "error", err)
	}
}

// Ready says the service serves. mainPID, when not zero, is the process
// systemd should follow from now on; status is shown by systemctl status.
func (n Notifier) Ready(mainPID int, status string) {
	state := daemon.SdNotifyReady + "\nSTATUS=" + oneLine(status)
	if mainPID != 0 {
		state = fmt.Sprintf("MAINPID=%d\n%s", mainPID, state)
	}
	n.send(state)
}

// Reloading says an upgrade started.
func (n Notifier) Reloading() {
	n.send(daemon.SdNotifyReloading + "\n" + daemon.SdNotifyMonotonicUsec())
}

// Failed says the upgrade failed and the service keeps serving as before.
func (n Notifier) Failed(err error) {
	n.send("STATUS=upgrade failed: " + oneLine(err.Error()))
	n.send(daemon.SdNotifyReady)
}

// Stopping says a final stop began.
func (n Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }

func oneLine(s string) string { return strings.ReplaceAll(s, "\n", " ") }
