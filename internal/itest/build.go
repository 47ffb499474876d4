package itest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Versions are the good builds of handoff, handoff-v1..v4; upgrades cycle
// through them so that every upgrade changes the version.
var Versions = []string{"v1", "v2", "v3", "v4"}

// NextVersion returns the version after v in the cycle v1 -> v2 -> v3 -> v4 -> v1.
func NextVersion(v string) string {
	for i, x := range Versions {
		if x == v {
			return Versions[(i+1)%len(Versions)]
		}
	}
	return Versions[0]
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Main runs the tests of m and removes the binaries [Binary] built; call it
// from TestMain.
func Main(m *testing.M) {
	code := m.Run()
	if buildDir != "" {
		_ = os.RemoveAll(buildDir)
	}
	os.Exit(code)
}

// ModuleRoot returns the directory of the go.mod above the working directory.
func ModuleRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no go.mod above the working directory")
		}
		dir = parent
	}
}

// Bins builds, once per test process and concurrently, handoff-v1..v4 (with
// -X main.version=vN) and every program under testdata/ (testdata/NAME is
// built as NAME), and returns the directory that holds them. A failed build
// fails tb.
func Bins(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() { buildDir, buildErr = build() })
	if buildErr != nil {
		tb.Fatalf("building test binaries: %v", buildErr)
	}
	return buildDir
}

// Binary returns the path of the built program name: "handoff-v1".."handoff-v4",
// or a program of testdata/ such as "exit1" (writes a line to stderr and exits
// 1) or "hang" (writes a line and blocks). It builds them all the first time
// (see [Bins]).
func Binary(tb testing.TB, name string) string {
	tb.Helper()
	return filepath.Join(Bins(tb), name)
}

func build() (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "handoff-bins-")
	if err != nil {
		return "", err
	}
	type job struct {
		out  string
		args []string
		env  []string
	}
	var jobs []job
	for _, v := range Versions {
		// As shipped (README, Set up): static, no ld.so or libc at each start.
		jobs = append(jobs, job{"handoff-" + v, []string{"-ldflags", "-X main.version=" + v, "."}, []string{"CGO_ENABLED=0"}})
	}
	progs, err := filepath.Glob(filepath.Join(root, "testdata", "*", "*.go"))
	if err != nil {
		return "", err
	}
	seen := map[string]bool{}
	for _, p := range progs {
		name := filepath.Base(filepath.Dir(p))
		if !seen[name] {
			seen[name] = true
			jobs = append(jobs, job{name, []string{"./testdata/" + name}, nil})
		}
	}
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, j := range jobs {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
			defer cancel()
			args := append([]string{"build", "-o", filepath.Join(dir, j.out)}, j.args...)
			cmd := exec.CommandContext(ctx, "go", args...)
			cmd.Dir = root
			cmd.Env = append(os.Environ(), j.env...)
			if out, err := cmd.CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
			}
		})
	}
	wg.Wait()
	return dir, errors.Join(errs...)
}
