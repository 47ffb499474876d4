package itest

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
)

// CLI runs handoff-v1 args... to its end (see [Run], [CLITimeout]).
func CLI(tb testing.TB, args ...string) Result {
	tb.Helper()
	bin := Binary(tb, "handoff-v1")
	cmd := exec.Command(bin, args...)
	cmd.Dir = filepath.Dir(bin)
	cmd.Env = CleanEnv(nil)
	return RunCmd(tb, CLITimeout, cmd)
}

// StartCLI starts handoff-v1 args... without waiting (see [Go], [CLITimeout]).
func StartCLI(tb testing.TB, args ...string) *Running {
	tb.Helper()
	bin := Binary(tb, "handoff-v1")
	cmd := exec.Command(bin, args...)
	cmd.Dir = filepath.Dir(bin)
	cmd.Env = CleanEnv(nil)
	return Go(tb, CLITimeout, cmd)
}

// Status runs handoff status --pidfile F --json, which must exit 0, and
// decodes its answer.
func Status(tb testing.TB, pidfile string) control.Status {
	tb.Helper()
	r := CLI(tb, "status", "--pidfile", pidfile, "--json")
	if r.Code != 0 {
		tb.Fatalf("handoff status: %v", r)
	}
	var st control.Status
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		tb.Fatalf("handoff status --json: %v\n%v", err, r)
	}
	return st
}

// UpgradeCLI runs handoff upgrade --pidfile PIDFILE extra... and logs its result.
func (s *Server) UpgradeCLI(tb testing.TB, extra ...string) Result {
	tb.Helper()
	r := CLI(tb, append([]string{"upgrade", "--pidfile", s.PIDFile}, extra...)...)
	tb.Logf("%s", r)
	return r
}

// Status runs handoff status on the server (see [Status]).
func (s *Server) Status(tb testing.TB) control.Status {
	tb.Helper()
	return Status(tb, s.PIDFile)
}

// StatusOf polls handoff status (10s) until pid answers: right after a
// handoff the old generation may still answer one last request on the
// shared socket.
func (s *Server) StatusOf(tb testing.TB, pid int) control.Status {
	tb.Helper()
	var st control.Status
	if !Poll(10*time.Second, func() bool { st = s.Status(tb); return st.PID == pid }) {
		tb.Fatalf("handoff status not answered by pid %d within 10s; last answer from %d", pid, st.PID)
	}
	return st
}

// JSON returns v as JSON, for failure messages.
func JSON(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

// UpgradedRE is handoff upgrade's success line.
var UpgradedRE = regexp.MustCompile(`^upgraded: pid (\d+) -> (\d+), version (\S+), generation (\d+), ready in ([0-9]+(?:\.[0-9]+)?) ms\n$`)

// Upgraded is handoff upgrade's success line, parsed.
type Upgraded struct {
	OldPID, NewPID, Generation int
	Version                    string
	ReadyMS                    float64
}

// ParseUpgraded parses handoff upgrade's success line (all of its stdout);
// it fails tb when stdout is anything else.
func ParseUpgraded(tb testing.TB, r Result) Upgraded {
	tb.Helper()
	m := UpgradedRE.FindStringSubmatch(r.Stdout)
	if m == nil {
		tb.Fatalf("handoff upgrade stdout %q does not match %s\n%v", r.Stdout, UpgradedRE, r)
	}
	var u Upgraded
	u.OldPID, _ = strconv.Atoi(m[1])
	u.NewPID, _ = strconv.Atoi(m[2])
	u.Version = m[3]
	u.Generation, _ = strconv.Atoi(m[4])
	u.ReadyMS, _ = strconv.ParseFloat(m[5], 64)
	return u
}

// GoodUpgrade deploys version and runs handoff upgrade extra...; it checks
// the verdict (exit 0, no stderr, the old pid, a new pid that the PID file
// names, version, generation, a ready time within (0, 30s]), waits for the
// new generation to serve, and returns its pid. The old one may still drain.
func (s *Server) GoodUpgrade(t testing.TB, version string, generation int, extra ...string) int {
	t.Helper()
	old := s.LivePID()
	s.Deploy(version)
	r := s.UpgradeCLI(t, extra...)
	if r.Code != 0 {
		t.Fatalf("upgrade to %s: exit %d, want 0\n%v", version, r.Code, r)
	}
	if r.Stderr != "" {
		t.Errorf("upgrade to %s: unexpected stderr %q", version, r.Stderr)
	}
	u := ParseUpgraded(t, r)
	filePID, err := s.ReadPID()
	switch {
	case err != nil:
		t.Errorf("PID file right after handoff upgrade exited 0: %v", err)
	case u.NewPID != filePID:
		t.Errorf("handoff upgrade names new pid %d, the PID file names %d", u.NewPID, filePID)
	}
	if u.OldPID != old {
		t.Errorf("handoff upgrade names old pid %d, want %d", u.OldPID, old)
	}
	if u.NewPID == old || u.NewPID <= 1 {
		t.Fatalf("handoff upgrade names new pid %d (old %d)", u.NewPID, old)
	}
	if u.Version != version {
		t.Errorf("handoff upgrade names version %q, want %q", u.Version, version)
	}
	if u.Generation != generation {
		t.Errorf("handoff upgrade names generation %d, want %d", u.Generation, generation)
	}
	if u.ReadyMS <= 0 || u.ReadyMS > 30000 {
		t.Errorf("handoff upgrade: ready in %v ms, want within (0, 30000]", u.ReadyMS)
	}
	s.WaitServing(u.NewPID, version, 10*time.Second)
	s.Version = version
	return u.NewPID
}
