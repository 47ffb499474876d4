package server

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// selfSigned makes a certificate for 127.0.0.1.
func selfSigned(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "handoff test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(der)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// protoHandler says what the request saw.
var protoHandler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/slow" {
		time.Sleep(300 * time.Millisecond)
	}
	fmt.Fprintf(w, "%s tls=%v alpn=%s", r.Proto, r.TLS != nil, func() string {
		if r.TLS == nil {
			return ""
		}
		return r.TLS.NegotiatedProtocol
	}())
})

func startTLS(t *testing.T, tmpl *http.Server) (*Server, string, *x509.CertPool) {
	t.Helper()
	cert, pool := selfSigned(t)
	tmpl.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	s := &Server{HTTP: tmpl}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- s.ServeTLS(ln, "", "") }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Drain(ctx)
		<-done
	})
	return s, ln.Addr().String(), pool
}

func get(t *testing.T, c *http.Client, url string) (string, *http.Response) {
	t.Helper()
	resp, err := c.Get(url)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(b), resp
}

// TLS is terminated by net/http: r.TLS is set, ALPN picks h2 for a client
// that offers it and HTTP/1.1 for one that does not.
func TestServeTLSSpeaksHTTP2AndHTTP1(t *testing.T) {
	_, addr, pool := startTLS(t, &http.Server{Handler: protoHandler})
	h2 := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
	body, resp := get(t, h2, "https://"+addr+"/")
	assert.Equal(t, 2, resp.ProtoMajor)
	assert.Equal(t, "HTTP/2.0 tls=true alpn=h2", body)

	var p http.Protocols
	p.SetHTTP1(true)
	h1 := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, Protocols: &p}}
	body, resp = get(t, h1, "https://"+addr+"/")
	assert.Equal(t, 1, resp.ProtoMajor)
	assert.True(t, strings.HasPrefix(body, "HTTP/1.1 tls=true"), body)
}

// h2c with prior knowledge, when the template's Protocols ask for it.
func TestServeH2C(t *testing.T) {
	var p http.Protocols
	p.SetHTTP1(true)
	p.SetUnencryptedHTTP2(true)
	s := &Server{HTTP: &http.Server{Handler: protoHandler, Protocols: &p}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Drain(ctx)
		<-done
	}()
	var cp http.Protocols
	cp.SetUnencryptedHTTP2(true)
	c := &http.Client{Transport: &http.Transport{Protocols: &cp}}
	body, resp := get(t, c, "http://"+ln.Addr().String()+"/")
	assert.Equal(t, 2, resp.ProtoMajor)
	assert.Equal(t, "HTTP/2.0 tls=false alpn=", body)
	c.CloseIdleConnections()
	var c1 http.Protocols
	c1.SetHTTP1(true)
	body, _ = get(t, &http.Client{Transport: &http.Transport{Protocols: &c1}}, "http://"+ln.Addr().String()+"/")
	assert.Equal(t, "HTTP/1.1 tls=false alpn=", body, "HTTP/1.1 still served")
}

// An HTTP/2 connection drains with GOAWAY: the stream in flight is answered,
// and the connection closes when it is, long before the deadline.
func TestDrainHTTP2GoAway(t *testing.T) {
	s, addr, pool := startTLS(t, &http.Server{Handler: protoHandler})
	c := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
	get(t, c, "https://"+addr+"/") // the connection exists
	answered := make(chan string, 1)
	go func() {
		resp, err := c.Get("https://" + addr + "/slow")
		if err != nil {
			answered <- err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		answered <- string(b)
	}()
	eventually(t, func() bool { return s.InFlight() == 1 }, "the slow stream in flight")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	start := time.Now()
	rep, err := s.Drain(ctx)
	require.NoError(t, err, "the connection closed on its own after GOAWAY")
	assert.Equal(t, 1, rep.HTTP2)
	assert.Zero(t, rep.Cut)
	assert.Equal(t, "HTTP/2.0 tls=true alpn=h2", <-answered)
	t.Logf("drained in %v", time.Since(start))
}

// The template's fields are honoured and its ConnState is chained.
func TestTemplateIsHonoured(t *testing.T) {
	var states atomic.Int64
	tmpl := &http.Server{Handler: protoHandler, MaxHeaderBytes: 1 << 10,
		ConnState: func(net.Conn, http.ConnState) { states.Add(1) }}
	s := &Server{HTTP: tmpl}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		s.Drain(ctx)
		<-done
	}()
	req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/", nil)
	req.Header.Set("Big", strings.Repeat("x", 8<<10))
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusRequestHeaderFieldsTooLarge, resp.StatusCode, "MaxHeaderBytes honoured")
	assert.Positive(t, states.Load(), "the template's ConnState is called")
	assert.Equal(t, DefaultReadHeaderTimeout, tmpl.ReadHeaderTimeout, "a zero timeout gets the default")
}

// A hijacked connection gives libraries what they reach for.
func TestHijackedConnHasNetConn(t *testing.T) {
	got := make(chan string, 1)
	_, addr := start(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			got <- err.Error()
			return
		}
		defer c.Close()
		nc, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			got <- fmt.Sprintf("%T has no NetConn", c)
			return
		}
		_, isTCP := nc.NetConn().(*net.TCPConn)
		_, hasRaw := c.(syscall.Conn)
		got <- fmt.Sprintf("tcp=%v raw=%v", isTCP, hasRaw)
	}), time.Hour)
	c := dial(t, addr)
	c.send("/")
	assert.Equal(t, "tcp=true raw=true", <-got)
}
