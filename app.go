// app.go holds the reference application that handoff serve runs: its routes.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

// maxSlowMS is the longest /slow?ms= a request may ask for.
const maxSlowMS = 60000

// newMux is the reference application: / and /hello/{name} greet, /healthz
// answers ok, /slow?ms=N answers after N milliseconds, /ws echoes WebSocket
// messages (ws.go); every response carries the serving process's PID and
// version in Handoff-Pid and Handoff-Version.
func newMux(hub *wsHub) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ws", hub.serveWS)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "Hello World !!!")
	})
	mux.HandleFunc("GET /hello/{name}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "Hello %s!!!", r.PathValue("name"))
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "ok")
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > maxSlowMS {
			http.Error(w, fmt.Sprintf("ms must be an integer from 0 to %d", maxSlowMS), http.StatusBadRequest)
			return
		}
		t := time.NewTimer(time.Duration(ms) * time.Millisecond)
		defer t.Stop()
		select {
		case <-t.C:
			fmt.Fprintf(w, "slept %d ms", ms)
		case <-r.Context().Done():
		}
	})
	pid := strconv.Itoa(os.Getpid())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", pid)
		w.Header().Set("Handoff-Version", version)
		mux.ServeHTTP(w, r)
	})
}
