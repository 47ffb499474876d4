// ws.go holds the reference application's WebSocket echo route, /ws.
package main

import (
	"net/http"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

// wsHub is the set of open /ws sockets, so that a drain can tell each to
// leave.
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
	c, err := wsUpgrader.Upgrade(w, r, nil)
	if err != nil {
		return // Upgrade answered already
	}
	defer c.Close()
	if !h.add(c) {
		h.goAway(c) // arrived as the drain began
		return
	}
	defer h.remove(c)
	for {
		kind, msg, err := c.ReadMessage()
		if err != nil {
			return
		}
		h.mu.Lock() // writes are serialised with goAway's close frame
		err = c.WriteMessage(kind, msg)
		h.mu.Unlock()
		if err != nil {
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
// sees the client's close frame in answer and returns.
func (h *wsHub) closeAll() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.leaving = true
	for c := range h.conns {
		h.goAwayLocked(c)
	}
}

func (h *wsHub) goAway(c *websocket.Conn) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.goAwayLocked(c)
}

func (h *wsHub) goAwayLocked(c *websocket.Conn) {
	msg := websocket.FormatCloseMessage(websocket.CloseServiceRestart, "server restarting: reconnect")
	c.WriteControl(websocket.CloseMessage, msg, time.Now().Add(time.Second))
	// A client that never answers the close is cut at the drain deadline.
}
