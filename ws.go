// ws.go holds the reference application's WebSocket echo route, /ws.
package main

import (
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// Bounds of the /ws route: a message larger than wsMaxMessage closes the
// socket (1009); an echo the client does not read within wsWriteTimeout does.
const (
	wsMaxMessage   = 1 << 20
	wsWriteTimeout = 10 * time.Second
)

// wsHub is the set of open /ws sockets, so that a drain can tell each to
// leave. Its lock guards the set only: a socket's writes never wait on it, so
// a client that stops reading holds up no one else.
type wsHub struct {
	mu      sync.Mutex
	conns   map[*websocket.Conn]bool
	leaving bool
}

func newWSHub() *wsHub { return &wsHub{conns: map[*websocket.Conn]bool{}} }

var wsUpgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}

// serveWS echoes every message back. A client's message is acknowledged when
// its echo arrives: a message not echoed was not processed, and the client
// sends it again after reconnecting.
func (h *wsHub) serveWS(w http.ResponseWriter, r *http.Request) {
	// Handoff-Pid and Handoff-Version go with the 101, as with every answer.
	h101 := http.Header{}
	for _, k := range []string{"Handoff-Pid", "Handoff-Version"} {
		if v := w.Header().Get(k); v != "" {
			h101.Set(k, v)
		}
	}
	c, err := wsUpgrader.Upgrade(w, r, h101)
	if err != nil {
		return // Upgrade answered already
	}
	defer c.Close()
	c.SetReadLimit(wsMaxMessage)
	if !h.add(c) {
		goAway(c) // arrived as the drain began
		return
	}
	defer h.remove(c)
	for {
		kind, msg, err := c.ReadMessage()
		if err != nil {
			return
		}
		// The only writer of c's messages; goAway's close frame is a control
		// frame, which gorilla/websocket lets go beside it.
		c.SetWriteDeadline(time.Now().Add(wsWriteTimeout))
		if err := c.WriteMessage(kind, msg); err != nil {
			return
		}
	}
}

func (h *wsHub) add(c *websocket.Conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.leaving {
		return false
	}
	h.conns[c] = true
	return true
}

func (h *wsHub) remove(c *websocket.Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.conns, c)
}

// closeAll is the drain hook: every socket gets close code 1012 (Service
// Restart), and clients reconnect to the new generation. The reader of each
// sees the client's close frame in answer and returns. The close frames go
// out in parallel, each bounded: one client that does not read delays no
// other.
func (h *wsHub) closeAll() {
	h.mu.Lock()
	h.leaving = true
	conns := make([]*websocket.Conn, 0, len(h.conns))
	for c := range h.conns {
		conns = append(conns, c)
	}
	h.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() { goAway(c) })
	}
	wg.Wait()
}

func goAway(c *websocket.Conn) {
	msg := websocket.FormatCloseMessage(websocket.CloseServiceRestart, "server restarting: reconnect")
	c.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	// A client that never answers the close is cut at the drain deadline.
}
