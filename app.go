// app.go holds the reference application that handoff serve runs: its routes.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"

	"github.com/handoff-dev/handoff/internal/refapp"
)

// newMux is the reference application: / and /hello/{name} greet, /healthz
// answers ok, /slow?ms=N answers after N milliseconds, /ws echoes WebSocket
// messages (ws.go); every response carries the serving process's PID and
// version in Handoff-Pid and Handoff-Version. The usual requests (GET or HEAD
// of one of those paths, written plainly) are routed by hand, and the others
// by an http.ServeMux made at the first of them, so that they are answered as
// a ServeMux answers (redirects to the clean path, 404, 405 with Allow):
// registering its patterns cost each new generation 0.1 ms of CPU on the
// critical path of an upgrade.
func newMux(hub *wsHub) http.Handler {
	pid := strconv.Itoa(os.Getpid())
	mux := sync.OnceValue(func() *http.ServeMux { return appServeMux(hub) })
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Handoff-Pid", pid)
		h.Set("Handoff-Version", version)
		if (r.Method == http.MethodGet || r.Method == http.MethodHead) && r.URL.RawPath == "" {
			switch p := r.URL.Path; p {
			case "/":
				root(w, r)
				return
			case "/healthz":
				healthz(w, r)
				return
			case "/slow":
				refapp.Slow(w, r)
				return
			case "/ws":
				hub.serveWS(w, r)
				return
			default:
				if name, ok := strings.CutPrefix(p, "/hello/"); ok && name != "" && name != "." && name != ".." && !strings.Contains(name, "/") {
					hello(w, name)
					return
				}
			}
		}
		mux().ServeHTTP(w, r)
	})
}

// appServeMux routes the reference application with an http.ServeMux: newMux
// hands it every request it does not route by hand.
func appServeMux(hub *wsHub) *http.ServeMux {
	m := http.NewServeMux()
	m.HandleFunc("GET /ws", hub.serveWS)
	m.HandleFunc("GET /{$}", root)
	m.HandleFunc("GET /hello/{name}", func(w http.ResponseWriter, r *http.Request) { hello(w, r.PathValue("name")) })
	m.HandleFunc("GET /healthz", healthz)
	m.HandleFunc("GET /slow", refapp.Slow)
	return m
}

func root(w http.ResponseWriter, r *http.Request)    { io.WriteString(w, "Hello World !!!") }
func healthz(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }
func hello(w http.ResponseWriter, name string)       { fmt.Fprintf(w, "Hello %s!!!", name) }
