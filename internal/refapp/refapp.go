// Package refapp holds what the reference application of handoff serve (app.go)
// shares with the test programs that stand in for it (testdata).
package refapp

import (
	"fmt"
	"net/http"
	"strconv"
	"time"
)

// MaxSlowMS is the longest /slow?ms= a request may ask for.
const MaxSlowMS = 60000

// Slow answers /slow?ms=N after N milliseconds, or nothing if the client goes
// first; 400 when N is not an integer from 0 to MaxSlowMS.
func Slow(w http.ResponseWriter, r *http.Request) {
	ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
	if err != nil || ms < 0 || ms > MaxSlowMS {
		http.Error(w, fmt.Sprintf("ms must be an integer from 0 to %d", MaxSlowMS), http.StatusBadRequest)
		return
	}
	t := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
		fmt.Fprintf(w, "slept %d ms", ms)
	case <-r.Context().Done():
	}
}
