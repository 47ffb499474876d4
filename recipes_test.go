package main_test

// Verified recipes for real servers under `handoff run` (issue 11): Express
// (npm), gunicorn, uvicorn and puma (Debian's packages), each run as its
// example's README says and upgraded ten times under the load tool's
// non-retrying load (500 req/s, 30% on new connections, 2% /slow?ms=800):
// no request may fail, each new child serves, and each replaced one drains
// and exits 0 by itself.
//
// The tests observe handoff from the outside, as the harness does: status for
// the children, HTTP for who answers, and, once handoff was stopped and its
// output read to the end, its log lines. handoff and the load tool run in
// process groups of their own, and so does every child handoff starts; the
// cleanup kills them all (see recipeRun.kill).

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/handoff-dev/handoff/internal/control"
	"github.com/handoff-dev/handoff/internal/itest"
)

const (
	recipeRate     = 500
	recipeUpgrades = 10
)

func recipeLoadArgs() []string {
	return []string{"--conns", "16", "--new-conn-fraction", "0.3", "--slow-fraction", "0.02", "--slow", "800ms"}
}

// TestRecipeExpress: examples/express (Express 5 from npm), two instances.
func TestRecipeExpress(t *testing.T) {
	itest.SkipWithout(t, "node")
	root := moduleRoot(t)
	if _, err := os.Stat(filepath.Join(root, "examples", "express", "node_modules", "express", "package.json")); err != nil {
		t.Skipf("examples/express/node_modules is missing (%v): run `npm ci` in examples/express (.ci/run does)", err)
	}
	testRecipe(t, recipe{
		example:   "express",
		instances: 2,
		command:   []string{"node", "server.js"},
	})
}

// TestRecipeGunicorn: examples/gunicorn (gunicorn's own systemd support:
// LISTEN_FDS and sd_notify), gthread workers without keep-alive.
func TestRecipeGunicorn(t *testing.T) {
	itest.SkipWithout(t, "gunicorn")
	testRecipe(t, recipe{
		example: "gunicorn",
		command: []string{"gunicorn", "-c", "gunicorn.conf.py", "app:app"},
	})
}

// TestRecipeUvicorn: examples/uvicorn (uvicorn on fd 3, run by serve.py for
// sd_notify readiness and a drain that reads what its connections hold).
func TestRecipeUvicorn(t *testing.T) {
	python := pythonWith(t, "uvicorn")
	testRecipe(t, recipe{
		example: "uvicorn",
		command: []string{python, "serve.py", "app:app"},
	})
}

// TestRecipePuma: examples/puma (puma's systemd support: activated sockets and
// sd_notify through the sd_notify gem), without keep-alive.
func TestRecipePuma(t *testing.T) {
	itest.SkipWithout(t, "puma")
	if r := itest.Run(t, 30*time.Second, "ruby", "-e", `require "sd_notify"`); r.Code != 0 {
		t.Skipf("ruby's sd_notify gem is missing (Debian: ruby-sd-notify), which puma needs to say it is ready: %s", r.Stderr)
	}
	testRecipe(t, recipe{
		example: "puma",
		command: []string{"puma", "-C", "puma.rb", "config.ru"},
	})
}

// recipe is a server run under handoff run as its example's README says.
type recipe struct {
	example   string   // the directory under examples/, where the command runs
	command   []string // after handoff run ... --
	instances int      // --instances; 0 means 1
}

// testRecipe runs the recipe's server under handoff run, upgrades it
// recipeUpgrades times under load and checks that nothing was lost.
func testRecipe(t *testing.T, rc recipe) {
	if rc.instances == 0 {
		rc.instances = 1
	}
	began := time.Now()
	r := startRecipe(t, rc)
	first := r.waitServing(nil, 30*time.Second)
	r.waitHealthz(first, 15*time.Second)
	load := itest.StartLoad(t, r.addr, recipeRate, recipeLoadArgs()...)

	gens := [][]int{first}
	all := slices.Clone(first)
	for i := 1; i <= recipeUpgrades; i++ {
		took := time.Now()
		out := r.upgrade()
		cur := r.waitServing(all, 30*time.Second)
		t.Logf("upgrade %d (%v): %s; serving %v", i, time.Since(took).Round(time.Millisecond), strings.TrimSpace(out), cur)
		r.waitHealthz(cur, 15*time.Second)
		gens = append(gens, cur)
		all = append(all, cur...)
	}
	// The load runs on until the generation before the last has drained and
	// exited: the last one then has had fresh connections to answer (stopped
	// at once, a loaded host could leave it none).
	prev := gens[len(gens)-2]
	itest.Eventually(t, 30*time.Second, func() bool {
		return !slices.ContainsFunc(prev, itest.Alive)
	}, "the children %v of the generation before the last to exit", prev)

	res, sent := load.Stop()
	load.Check(t, res, sent)
	// Every generation served the load. Not every child of it: with several
	// instances on one socket the kernel may wake the same one for every
	// fresh connection in the short life of a generation on a loaded host.
	for g, pids := range gens {
		answered := 0
		for _, pid := range pids {
			if ps, ok := itest.PIDStat(res, pid); ok {
				answered += int(ps.Count)
			}
		}
		if answered == 0 {
			t.Errorf("generation %d (children %v) answered no load-tool request", g+1, pids)
		}
	}

	// Stop handoff: every child drains, handoff exits 0, and its output is
	// then complete for the checks below.
	if err := syscall.Kill(r.pid, syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM handoff %d: %v", r.pid, err)
	}
	if st := r.proc.Wait(t, 40*time.Second); st.ExitCode() != 0 {
		t.Errorf("handoff run exit status %d after SIGTERM, want 0 (%v)", st.ExitCode(), st)
	}
	// A replaced child exits as "old child exited", or as "child exited" when
	// it was still draining at the stop, as the last ones are.
	logs := r.proc.Logs
	exited := func(l itest.Line) bool { return l.Msg() == "old child exited" || l.Msg() == "child exited" }
	for _, pid := range all {
		l, _, ok := logs.First(0, "", func(l itest.Line) bool { return exited(l) && itest.NumIs("child_pid", pid)(l) })
		switch {
		case !ok:
			t.Errorf("no exit logged for child %d", pid)
		case l.Str("status") != "exit status 0":
			t.Errorf("child %d exited with %q, want exit status 0 (it drained): %s", pid, l.Str("status"), l.Raw)
		}
	}
	if ls, _ := logs.Find(0, "", func(l itest.Line) bool { return l.Str("level") == "ERROR" || l.Str("level") == "WARN" }); len(ls) > 0 {
		t.Errorf("handoff logged %d warnings or errors, the first: %s", len(ls), ls[0].Raw)
	}
	if ls, _ := logs.Find(0, "", func(l itest.Line) bool { return strings.Contains(l.Raw, "Traceback (most recent call last)") }); len(ls) > 0 {
		t.Errorf("a child wrote a Python traceback: %s", ls[0].Raw)
	}
	t.Logf("%s: %d requests, %d failed, %d upgrades, %d instance(s), in %v",
		rc.example, res.Requests, res.Failed, recipeUpgrades, rc.instances, time.Since(began).Round(100*time.Millisecond))
}

// recipeRun is handoff run with a recipe's server, started by startRecipe.
type recipeRun struct {
	t         *testing.T
	proc      *itest.Proc
	pid       int    // handoff's PID, also its process group
	marker    string // in the environment of handoff and of every process it starts
	pidFile   string
	addr      string // 127.0.0.1:PORT
	instances int
}

// startRecipe starts, in examples/NAME,
//
//	handoff-v1 run --listen 127.0.0.1:0 --pidfile DIR/run.pid --log-format json
//	    --ready-timeout 30s --drain-timeout 25s [--instances N] -- COMMAND
//
// and returns once handoff logged "ready" and its port is known.
func startRecipe(t *testing.T, rc recipe) *recipeRun {
	t.Helper()
	dir := t.TempDir()
	r := &recipeRun{t: t, pidFile: filepath.Join(dir, "run.pid"), instances: rc.instances}
	r.marker = "HANDOFF_RECIPE_TEST=" + dir
	args := []string{"run", "--listen", "127.0.0.1:0", "--pidfile", r.pidFile, "--log-format", "json",
		"--ready-timeout", "30s", "--drain-timeout", "25s"}
	if rc.instances > 1 {
		args = append(args, "--instances", strconv.Itoa(rc.instances))
	}
	cmd := exec.Command(itest.Binary(t, "handoff-v1"), append(append(args, "--"), rc.command...)...)
	cmd.Dir = filepath.Join(moduleRoot(t), "examples", rc.example)
	// No bytecode written into the examples.
	cmd.Env = itest.CleanEnv([]string{r.marker, "PYTHONDONTWRITEBYTECODE=1"})
	r.proc = itest.StartCmd(t, cmd)
	r.pid = r.proc.PID
	t.Cleanup(r.kill) // runs before the Proc's own cleanup

	r.proc.WaitLog(t, 0, "ready", itest.PIDIs(r.pid), 40*time.Second)
	var port int
	r.waitFor(10*time.Second, func() bool { port = itest.ListenPort(r.pid); return port != 0 },
		func() string { return fmt.Sprintf("a LISTEN socket on 127.0.0.1 held by handoff %d", r.pid) })
	r.addr = fmt.Sprintf("127.0.0.1:%d", port)
	r.waitFor(10*time.Second, func() bool { p, err := itest.ReadPIDFile(r.pidFile); return err == nil && p == r.pid },
		func() string { return fmt.Sprintf("PID file %s to name handoff %d", r.pidFile, r.pid) })
	return r
}

// waitFor polls cond (see itest.Poll) and fails the test when it does not hold
// within timeout, or at once when handoff exits; what says, when it fails,
// what was awaited.
func (r *recipeRun) waitFor(timeout time.Duration, cond func() bool, what func() string) {
	r.t.Helper()
	exited := false
	ok := itest.Poll(timeout, func() bool {
		if !r.proc.Running() {
			exited = true
			return true
		}
		return cond()
	})
	switch {
	case exited:
		r.t.Fatalf("handoff run exited (%v) while waiting for: %s", r.proc.Cmd.ProcessState, what())
	case !ok:
		r.t.Fatalf("timed out after %v waiting for: %s", timeout, what())
	}
}

// waitServing waits until status lists exactly r.instances serving children,
// none of them in not, and returns their PIDs.
func (r *recipeRun) waitServing(not []int, timeout time.Duration) []int {
	r.t.Helper()
	var st control.Status
	var serving []int
	r.waitFor(timeout, func() bool {
		st = itest.Status(r.t, r.pidFile)
		serving = serving[:0]
		for _, c := range st.Children {
			if c.Phase == control.ChildServing {
				serving = append(serving, c.PID)
			}
		}
		return len(serving) == r.instances && !slices.ContainsFunc(serving, func(p int) bool { return slices.Contains(not, p) })
	}, func() string {
		return fmt.Sprintf("status to list %d serving children, none of %v (last: %+v)", r.instances, not, st.Children)
	})
	if st.PID != r.pid {
		r.t.Errorf("status pid %d, want handoff's %d", st.PID, r.pid)
	}
	return slices.Clone(serving)
}

// waitHealthz waits until GET /healthz on a fresh connection answers 200 "ok"
// from one of pids three times in a row.
func (r *recipeRun) waitHealthz(pids []int, timeout time.Duration) {
	r.t.Helper()
	streak, last := 0, "none"
	r.waitFor(timeout, func() bool {
		resp, err := itest.Get(r.addr, "/healthz")
		if err != nil {
			last, streak = err.Error(), 0
			return false
		}
		last = fmt.Sprintf("status %d Handoff-Pid %d body %q", resp.Status, resp.PID, resp.Body)
		if resp.Status == 200 && resp.Body == "ok" && slices.Contains(pids, resp.PID) {
			streak++
		} else {
			streak = 0
		}
		return streak >= 3
	}, func() string {
		return fmt.Sprintf("GET /healthz to answer from one of %v three times in a row (last answer: %s)", pids, last)
	})
}

// upgrade runs handoff upgrade --pidfile F --wait, which must exit 0, and
// returns its stdout.
func (r *recipeRun) upgrade() string {
	r.t.Helper()
	cmd := exec.Command(itest.Binary(r.t, "handoff-v1"), "upgrade", "--pidfile", r.pidFile, "--wait")
	cmd.Env = itest.CleanEnv(nil)
	res := itest.RunCmd(r.t, 60*time.Second, cmd)
	if res.Code != 0 {
		r.t.Fatalf("handoff upgrade: exit %d, want 0\n%v", res.Code, res)
	}
	return res.Stdout
}

// ours returns the live processes whose environment holds r.marker: handoff,
// the children it started and theirs (gunicorn's workers), whatever their
// process group.
func (r *recipeRun) ours() []int {
	var out []int
	for _, st := range itest.Procs(func(st itest.Stat) bool { return st.State != 'Z' }) {
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", st.PID))
		if err == nil && slices.ContainsFunc(bytes.Split(env, []byte{0}), func(kv []byte) bool { return string(kv) == r.marker }) {
			out = append(out, st.PID)
		}
	}
	return out
}

// kill is the cleanup: with handoff frozen (so that it starts no child
// meanwhile), each child's process group is SIGKILLed; handoff is then let go
// to reap them, and the Proc's own cleanup kills handoff's group. Whatever of
// ours still runs after that is killed, and must be gone within 10s.
func (r *recipeRun) kill() {
	if r.proc.Running() {
		_ = syscall.Kill(r.pid, syscall.SIGSTOP)
		for _, k := range itest.Children(r.pid) {
			itest.KillGroup(k.PID)
		}
		_ = syscall.Kill(r.pid, syscall.SIGCONT)
		itest.Poll(5*time.Second, func() bool { return len(itest.LiveChildren(r.pid)) == 0 })
	}
	r.proc.Kill()
	left := r.ours()
	for _, pid := range left {
		itest.KillGroup(pid)
	}
	if !itest.Poll(10*time.Second, func() bool { return len(r.ours()) == 0 }) {
		r.t.Errorf("processes of the recipe still alive 10s after SIGKILL: %v (were %v)", r.ours(), left)
	}
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	root, err := itest.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// pythonWith returns a Python 3 interpreter that can import module: python3
// on PATH, else Debian's /usr/bin/python3 (where its python3-* packages are,
// when PATH leads to another Python); it skips the test when neither can.
func pythonWith(t *testing.T, module string) string {
	t.Helper()
	var tried []string
	for _, py := range []string{"python3", "/usr/bin/python3"} {
		path, err := exec.LookPath(py)
		if err != nil || slices.Contains(tried, path) {
			continue
		}
		tried = append(tried, path)
		if r := itest.Run(t, 30*time.Second, path, "-c", "import "+module); r.Code == 0 {
			return path
		}
	}
	t.Skipf("no Python 3 can import %s (tried %v): install it (Debian: python3-%s)", module, tried, module)
	return ""
}
