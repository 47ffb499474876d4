package server

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
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
				c.http2, c.movable = true, false
				c.mu.Unlock()
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

// goAway sends a graceful GOAWAY on every HTTP/2 connection and returns how
// many there were.
func (s *Server) goAway() int {
	n := 0
	s.mu.Lock()
	for c := range s.conns {
		if c.isHTTP2() {
			n++
		}
	}
	s.mu.Unlock()
	if s.h2 != nil && n > 0 {
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // only its hooks matter: it tracks no connection
		s.h2.Shutdown(ctx)
	}
	return n
}

// ours finds the tracked connection under nc: nc itself, or the connection a
// *tls.Conn runs over.
func ours(nc net.Conn) *conn {
	for range 3 {
		switch c := nc.(type) {
		case *conn:
			return c
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
