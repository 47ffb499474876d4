package upgrader

import (
	"os"
	"os/signal"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// startEarly does what init does in a new generation whose previous one
// handled signals.
func startEarly(t *testing.T) {
	t.Helper()
	t.Setenv(earlySignalsEnv, "")
	early.c, early.set = notifySignals()
	<-early.set
	require.True(t, EarlySignals())
}

// A signal.Ignore between init and New (handoff serve's main ignored SIGHUP
// until New) must not leave the generation deaf to SIGHUP.
func TestEarlySignalsSurviveIgnore(t *testing.T) {
	startEarly(t)
	signal.Ignore(syscall.SIGHUP)
	c, set := takeEarlySignals(true)
	require.NotNil(t, c)
	defer stopSignals(c, set)
	<-set
	assert.False(t, signal.Ignored(syscall.SIGHUP), "SIGHUP is caught again once New has taken the early signals")
	assert.False(t, EarlySignals(), "taken once")
	assert.Equal(t, "1", os.Getenv(earlySignalsEnv), "the next generation starts them early too")
}

// Without HandleSignals, New undoes the early catching and raises again what
// it caught: a signal does what it would have done without it.
func TestEarlySignalsRaisedAgainWithoutHandleSignals(t *testing.T) {
	own := make(chan os.Signal, 4)
	signal.Notify(own, syscall.SIGHUP) // stands for the default action, which would end the test
	defer signal.Stop(own)
	startEarly(t)
	require.NoError(t, syscall.Kill(os.Getpid(), syscall.SIGHUP))
	wait := func(what string) {
		select {
		case <-own:
		case <-time.After(5 * time.Second):
			t.Fatalf("no SIGHUP %s", what)
		}
	}
	wait("sent")
	c, set := takeEarlySignals(false)
	assert.Nil(t, c)
	assert.Nil(t, set)
	wait("raised again")
	_, ok := os.LookupEnv(earlySignalsEnv)
	assert.False(t, ok, "the next generation does not start them early")
}
