package main

// The routes of the benchmark's load, like handoff serve's (app.go): GET /
// answers "Hello World !!!", GET /slow?ms=N after N milliseconds, and every
// answer names the serving process in Handoff-Pid. This is the only addition
// to tableflip's example that the load needs: the example serves
// http.DefaultServeMux, and registers nothing on it.

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"
)

func init() {
	pid := strconv.Itoa(os.Getpid())
	http.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", pid)
		io.WriteString(w, "Hello World !!!")
	})
	http.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Handoff-Pid", pid)
		ms, err := strconv.Atoi(r.URL.Query().Get("ms"))
		if err != nil || ms < 0 || ms > 60000 {
			http.Error(w, "ms must be an integer from 0 to 60000", http.StatusBadRequest)
			return
		}
		time.Sleep(time.Duration(ms) * time.Millisecond)
		fmt.Fprintf(w, "slept %d ms", ms)
	})
}
