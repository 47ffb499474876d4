// app.go holds the reference application that handoff serve runs: its routes.
package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"github.com/handoff-dev/handoff/internal/refapp"
)

// newMux is the reference application: / and /hello/{name} greet, /healthz
// answers ok, /slow?ms=N answers after N milliseconds, /ws echoes WebSocket
// messages (ws.go); every response carries the serving process's PID and
// version in Handoff-Pid and Handoff-Version. It routes by hand, as
// http.ServeMux would (404 for other paths, 405 with Allow for methods other
// than GET and HEAD): registering patterns with a ServeMux cost each new
// generation 0.1 ms of CPU on the critical path of an upgrade.
func newMux(hub *wsHub) http.Handler {
	pid := strconv.Itoa(os.Getpid())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Handoff-Pid", pid)
		h.Set("Handoff-Version", version)
		path := r.URL.Path
		name, hello := strings.CutPrefix(path, "/hello/")
		hello = hello && name != "" && !strings.Contains(name, "/")
		if !hello && path != "/" && path != "/healthz" && path != "/slow" && path != "/ws" {
			http.NotFound(w, r)
			return
		}
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			h.Set("Allow", "GET, HEAD")
			http.Error(w, http.StatusText(http.StatusMethodNotAllowed), http.StatusMethodNotAllowed)
			return
		}
		switch {
		case hello:
			fmt.Fprintf(w, "Hello %s!!!", name)
		case path == "/":
			io.WriteString(w, "Hello World !!!")
		case path == "/healthz":
			io.WriteString(w, "ok")
		case path == "/ws":
			hub.serveWS(w, r)
		default: // /slow
			refapp.Slow(w, r)
		}
	})
}
