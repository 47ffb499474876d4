package server

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"time"
)

// HTTP/2 drains with GOAWAY: the client learns which streams were processed
// and may re-send the rest on a new connection (RFC 9113 section 6.8). net/http's
// own HTTP/2 server sends a graceful GOAWAY on every connection only from a
// hook that http.Server.Shutdown runs, and Shutdown would also drop requests
// read after it began. So the HTTP/2 server is set up on a second http.Server,
// h2, that never serves (net/http configures HTTP/2 at its Serve, here on a
// closed listener), and is lent to the serving one through TLSNextProto;
// h2.Shutdown then runs that hook alone. Connections keep the serving server's
// settings (its handler, timeouts, HTTP2 config): net/http passes it as the
// base of each HTTP/2 connection.
func (s *Server) setupHTTP2() error {
	p := s.protocols()
	if !p.HTTP2() && !p.UnencryptedHTTP2() {
		return nil
	}
	if _, ok := s.srv.TLSNextProto["h2"]; ok {
		return nil // the template brings its own HTTP/2 (x/net/http2)
	}
	s.h2 = &http.Server{Protocols: &p}
	ln := closedListener{}
	if err := s.h2.Serve(ln); err != nil && err != net.ErrClosed {
		// Serve sets HTTP/2 up before its first Accept, which fails at once.
		if _, ok := s.h2.TLSNextProto["h2"]; !ok {
			return err
		}
	}
	if s.srv.TLSNextProto == nil {
		s.srv.TLSNextProto = map[string]func(*http.Server, *tls.Conn, http.Handler){}
	}
	for proto, serve := range s.h2.TLSNextProto {
		s.srv.TLSNextProto[proto] = func(hs *http.Server, tc *tls.Conn, h http.Handler) {
			if c := ours(tc); c != nil {
				c.mu.Lock()
				c.http2, c.movable, c.http2At = true, false, time.Now()
				c.mu.Unlock()
				s.mu.Lock()
				if _, ok := s.conns[c]; ok { // not already forgotten
					s.h2conns[c] = struct{}{}
				}
				s.mu.Unlock()
			}
			serve(hs, tc, h)
		}
	}
	s.srv.Protocols = &p
	return nil
}

// protocols is what the serving server speaks: its template's Protocols, or
// net/http's default (HTTP/1.1, and HTTP/2 over TLS).
func (s *Server) protocols() http.Protocols {
	if s.srv.Protocols != nil {
		return *s.srv.Protocols
	}
	var p http.Protocols
	p.SetHTTP1(true)
	if _, ok := s.srv.TLSNextProto["h2"]; ok || s.srv.TLSNextProto == nil {
		p.SetHTTP2(true)
	}
	return p
}

// goAway sends a graceful GOAWAY on every HTTP/2 connection not told yet and
// returns how many it told. The drain calls it at every pass: a connection
// whose handshake ends after the drain began is told too. One is told once
// net/http's HTTP/2 server has surely registered it (a pass after it became
// HTTP/2); telling one twice does nothing.
func (s *Server) goAway() int {
	if s.h2 == nil {
		return 0
	}
	settled := time.Now().Add(-pollInterval)
	var tell []*conn
	s.mu.Lock()
	for c := range s.h2conns { // not every connection: a drain at scale has few of these
		c.mu.Lock()
		if !c.toldAway && !c.http2At.After(settled) {
			tell = append(tell, c)
		}
		c.mu.Unlock()
	}
	s.mu.Unlock()
	if len(tell) == 0 {
		return 0
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // only its hooks matter: it tracks no connection
	s.h2.Shutdown(ctx)
	s.mu.Lock()
	for _, c := range tell {
		c.mu.Lock()
		c.toldAway = true
		c.mu.Unlock()
		delete(s.h2conns, c)
	}
	s.mu.Unlock()
	return len(tell)
}

// ours finds the tracked connection under nc: nc itself, or the connection a
// *tls.Conn runs over.
func ours(nc net.Conn) *conn {
	for range 4 {
		switch c := nc.(type) {
		case *conn:
			return c
		case interface{ UnencryptedNetConn() net.Conn }:
			nc = c.UnencryptedNetConn() // h2c: net/http passes it inside a *tls.Conn
		case interface{ NetConn() net.Conn }:
			nc = c.NetConn()
		default:
			return nil
		}
	}
	return nil
}

// closedListener fails every Accept.
type closedListener struct{}

func (closedListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (closedListener) Close() error              { return nil }
func (closedListener) Addr() net.Addr            { return &net.TCPAddr{} }
