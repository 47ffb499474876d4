package main_test

// Integration tests of `handoff serve` over TLS (HTTP/1.1 and HTTP/2 by
// ALPN), over h2c, and of the /ws WebSocket echo, each under load across
// upgrades of the real binary (see helpers_test.go for the harness). The
// clients are in this process and never retry by themselves: a request whose
// error reaches the caller counts as failed. (Go's HTTP/2 client re-sends on
// a new connection a request that a GOAWAY refused, that is one the server
// never processed, as RFC 9113 section 6.8 allows, and its HTTP/1.1 client a
// request that failed on a reused connection before a byte of answer; both are
// allowed here.) Log lines are asserted only once the output reached EOF.

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/handoff-dev/handoff/internal/itest"
)

// ---------------------------------------------------------------------------
// Certificates, made in the test.

// tlsCA is a certificate authority of a test.
type tlsCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// tlsLeaf is a server certificate for 127.0.0.1 and its files' contents.
type tlsLeaf struct {
	cert            *x509.Certificate
	certPEM, keyPEM []byte
}

func tlsNewCA(tb testing.TB, name string) *tlsCA {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	return &tlsCA{cert: cert, key: key}
}

// issue signs a certificate for 127.0.0.1 with subject cn and serial.
func (ca *tlsCA) issue(tb testing.TB, cn string, serial int64) tlsLeaf {
	tb.Helper()
	return ca.issueFor(tb, cn, serial, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour))
}

// issueFor is issue with the validity dates given.
func (ca *tlsCA) issueFor(tb testing.TB, cn string, serial int64, notBefore, notAfter time.Time) tlsLeaf {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
		NotBefore: notBefore, NotAfter: notAfter,
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	kd, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	return tlsLeaf{
		cert:    cert,
		certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kd}),
	}
}

// tlsPool trusts the CAs given.
func tlsPool(cas ...*tlsCA) *x509.CertPool {
	p := x509.NewCertPool()
	for _, ca := range cas {
		p.AddCert(ca.cert)
	}
	return p
}

// tlsWriteFiles puts leaf in certFile and keyFile, each by a rename, as a
// deploy would.
func tlsWriteFiles(tb testing.TB, leaf tlsLeaf, certFile, keyFile string) {
	tb.Helper()
	for _, f := range []struct {
		path string
		b    []byte
	}{{certFile, leaf.certPEM}, {keyFile, leaf.keyPEM}} {
		if err := os.WriteFile(f.path+".new", f.b, 0o600); err != nil {
			tb.Fatal(err)
		}
		if err := os.Rename(f.path+".new", f.path); err != nil {
			tb.Fatal(err)
		}
	}
}

// ---------------------------------------------------------------------------
// handoff serve with or without TLS. itest.StartServer checks readiness with
// plain HTTP, which a TLS listener does not speak: this is its counterpart.

type tlsServer struct {
	proc    *itest.Proc
	logs    *itest.Logs
	dir     string
	live    string // DIR/handoff, exec'd on every upgrade
	pidFile string
	addr    string // 127.0.0.1:PORT
	base    string // https://ADDR or http://ADDR
	version string
	fresh   *http.Client // a new connection per request
}

// tlsStartServe runs DIR/handoff serve --listen 127.0.0.1:0 with args (TLS
// when pool is set: the clients trust it) and returns once the first
// generation logged listening and ready, the PID file names it and /healthz
// answers from it.
func tlsStartServe(tb testing.TB, dir string, pool *x509.CertPool, drainTimeout string, args ...string) *tlsServer {
	tb.Helper()
	s := &tlsServer{dir: dir, live: filepath.Join(dir, "handoff"), pidFile: filepath.Join(dir, "handoff.pid"), version: "v1"}
	itest.CopyFile(tb, itest.Binary(tb, "handoff-v1"), s.live, 0o755)
	argv := append([]string{"serve", "--listen", "127.0.0.1:0", "--pidfile", s.pidFile, "--log-format", "json",
		"--upgrade-timeout", "15s", "--drain-timeout", drainTimeout}, args...)
	cmd := exec.Command(s.live, argv...)
	cmd.Dir = dir
	cmd.Env = itest.CleanEnv(nil)
	s.proc = itest.StartCmd(tb, cmd)
	s.logs = s.proc.Logs
	first := s.proc.PID
	l := s.logs.Wait(tb, 0, "listening", itest.PIDIs(first), 15*time.Second)
	s.addr = l.Str("addr")
	if host, port, err := net.SplitHostPort(s.addr); err != nil || host != "127.0.0.1" || port == "0" {
		tb.Fatalf("listening line has addr %q: %s", s.addr, l.Raw)
	}
	tr := &http.Transport{DisableKeepAlives: true}
	s.base = "http://" + s.addr
	if pool != nil {
		s.base = "https://" + s.addr
		tr.TLSClientConfig = &tls.Config{RootCAs: pool}
	}
	s.fresh = &http.Client{Transport: tr, Timeout: 10 * time.Second}
	s.logs.Wait(tb, 0, "ready", itest.PIDIs(first), 15*time.Second)
	itest.Eventually(tb, 10*time.Second, func() bool { p, err := itest.ReadPIDFile(s.pidFile); return err == nil && p == first },
		"PID file to name the first process %d", first)
	s.waitServing(tb, first, "v1")
	return s
}

// get does GET path on a new connection and returns the answer, its body and
// the Handoff-Pid.
func (s *tlsServer) get(path string) (*http.Response, string, int, error) {
	resp, err := s.fresh.Get(s.base + path)
	if err != nil {
		return nil, "", 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	pid, _ := strconv.Atoi(resp.Header.Get("Handoff-Pid"))
	return resp, string(b), pid, err
}

// waitServing waits (10s) until /healthz on a new connection answers from pid
// with version.
func (s *tlsServer) waitServing(tb testing.TB, pid int, version string) {
	tb.Helper()
	var last string
	if !itest.Poll(10*time.Second, func() bool {
		resp, body, p, err := s.get("/healthz")
		if err != nil {
			last = err.Error()
			return false
		}
		last = fmt.Sprintf("status %d pid %d version %q body %q", resp.StatusCode, p, resp.Header.Get("Handoff-Version"), body)
		return resp.StatusCode == 200 && p == pid && resp.Header.Get("Handoff-Version") == version && body == "ok"
	}) {
		tb.Fatalf("/healthz never answered from pid %d version %s; last answer: %s", pid, version, last)
	}
}

// upgrade deploys the next version and runs handoff upgrade, which must
// succeed; it waits for the new generation to serve and returns both PIDs.
// The old generation may still drain.
func (s *tlsServer) upgrade(tb testing.TB) (oldPID, newPID int) {
	tb.Helper()
	oldPID = itest.ReadPID(tb, s.pidFile)
	v := itest.NextVersion(s.version)
	itest.CopyFile(tb, itest.Binary(tb, "handoff-"+v), s.live+".new", 0o755)
	if err := os.Rename(s.live+".new", s.live); err != nil {
		tb.Fatal(err)
	}
	r := itest.CLI(tb, "upgrade", "--pidfile", s.pidFile)
	if r.Code != 0 {
		tb.Fatalf("handoff upgrade to %s: exit %d, want 0\n%v", v, r.Code, r)
	}
	u := itest.ParseUpgraded(tb, r)
	if u.OldPID != oldPID || u.Version != v || u.NewPID == oldPID {
		tb.Fatalf("handoff upgrade: %+v, want old pid %d, version %s\n%v", u, oldPID, v, r)
	}
	s.waitServing(tb, u.NewPID, v)
	s.version = v
	return oldPID, u.NewPID
}

// stop stops the live generation (the load must be over) and waits until
// every generation exited and the output reached EOF: only then may the logs
// be asserted on.
func (s *tlsServer) stop(tb testing.TB) {
	tb.Helper()
	pid := itest.ReadPID(tb, s.pidFile)
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		tb.Fatalf("SIGTERM %d: %v", pid, err)
	}
	s.proc.Wait(tb, 60*time.Second)
}

// tlsDrained returns the drained line of generation pid; the output must have
// reached EOF.
func tlsDrained(tb testing.TB, logs *itest.Logs, pid int) (itest.Line, bool) {
	tb.Helper()
	select {
	case <-logs.Done():
	default:
		tb.Fatalf("tlsDrained before the output reached EOF")
	}
	l, _, ok := logs.First(0, "drained", itest.PIDIs(pid))
	if !ok {
		tb.Errorf("generation %d logged no drained line", pid)
	}
	return l, ok
}

// tlsWaitGone waits (within) for pid to exit, and says how long it took.
func tlsWaitGone(tb testing.TB, pid int, within time.Duration) time.Duration {
	tb.Helper()
	start := time.Now()
	if !itest.Poll(within, func() bool { return !itest.Alive(pid) }) {
		tb.Fatalf("replaced generation %d still alive %v later", pid, within)
	}
	return time.Since(start)
}

// ---------------------------------------------------------------------------
// Load: workers that each send a request per tick, through the client given,
// and count every error that reaches them.

type tlsLoadOpts struct {
	base      string
	clients   []*http.Client // worker i uses clients[i%len(clients)]
	workers   int
	every     time.Duration // per worker
	slowEvery int           // each worker's every slowEvery-th request is /slow?ms=300
	// check says what is wrong with a complete answer (nil when fine).
	check func(resp *http.Response) error
}

type tlsLoad struct {
	opts  tlsLoadOpts
	stopC chan struct{}
	wg    sync.WaitGroup

	mu       sync.Mutex
	requests int
	failed   int
	slow     int
	errs     []string
	byPID    map[int]int
}

func tlsStartLoad(tb testing.TB, o tlsLoadOpts) *tlsLoad {
	l := &tlsLoad{opts: o, stopC: make(chan struct{}), byPID: map[int]int{}}
	for w := range o.workers {
		l.wg.Go(func() { l.worker(w) })
	}
	tb.Cleanup(l.stop) // a failed test stops it too
	return l
}

func (l *tlsLoad) worker(w int) {
	c := l.opts.clients[w%len(l.opts.clients)]
	tick := time.NewTicker(l.opts.every)
	defer tick.Stop()
	for n := 1; ; n++ {
		select {
		case <-l.stopC:
			return
		case <-tick.C:
		}
		path, want := "/", "Hello World !!!"
		if l.opts.slowEvery > 0 && n%l.opts.slowEvery == 0 {
			path, want = "/slow?ms=300", "slept 300 ms"
		} else if n%2 == 0 {
			path, want = fmt.Sprintf("/hello/w%d-%d", w, n), fmt.Sprintf("Hello w%d-%d!!!", w, n)
		}
		l.one(c, path, want)
	}
}

func (l *tlsLoad) one(c *http.Client, path, want string) {
	start := time.Now()
	pid, err := func() (int, error) {
		resp, err := c.Get(l.opts.base + path)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		pid, _ := strconv.Atoi(resp.Header.Get("Handoff-Pid"))
		switch {
		case err != nil:
			return pid, fmt.Errorf("reading the body: %w", err)
		case resp.StatusCode != 200 || string(b) != want:
			return pid, fmt.Errorf("status %d body %q, want 200 %q", resp.StatusCode, b, want)
		case pid == 0:
			return pid, errors.New("no Handoff-Pid")
		}
		if l.opts.check != nil {
			if err := l.opts.check(resp); err != nil {
				return pid, err
			}
		}
		return pid, nil
	}()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.requests++
	if strings.HasPrefix(path, "/slow") {
		l.slow++
	}
	if err != nil {
		l.failed++
		if len(l.errs) < 20 {
			l.errs = append(l.errs, fmt.Sprintf("%s GET %s (after %v, pid %d): %v",
				start.Format("15:04:05.000"), path, time.Since(start).Round(time.Millisecond), pid, err))
		}
		return
	}
	l.byPID[pid]++
}

// count is how many answers pid gave so far.
func (l *tlsLoad) count(pid int) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.byPID[pid]
}

// waitFlowing waits (15s) until pid has answered n more requests.
func (l *tlsLoad) waitFlowing(tb testing.TB, pid, n int) {
	tb.Helper()
	from := l.count(pid)
	itest.Eventually(tb, 15*time.Second, func() bool { return l.count(pid) >= from+n },
		"%d answers from pid %d (had %d)", n, pid, from)
}

func (l *tlsLoad) stop() {
	select {
	case <-l.stopC:
	default:
		close(l.stopC)
	}
	l.wg.Wait()
}

// stopAndCheck stops the load and asserts that nothing failed, that it ran,
// and that every generation of gens answered part of it.
func (l *tlsLoad) stopAndCheck(tb testing.TB, gens []int) {
	tb.Helper()
	l.stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	tb.Logf("load: %d requests (%d slow), %d failed; answers by pid %v", l.requests, l.slow, l.failed, l.byPID)
	if l.failed != 0 {
		tb.Errorf("%d of %d requests failed; first errors:\n%s", l.failed, l.requests, strings.Join(l.errs, "\n"))
	}
	if l.slow == 0 {
		tb.Errorf("no /slow request was sent")
	}
	for i, p := range gens {
		if l.byPID[p] == 0 {
			tb.Errorf("generation %d (pid %d) answered no request", i+1, p)
		}
	}
}

func tlsProtocols(h1, h2, h2c bool) *http.Protocols {
	var p http.Protocols
	p.SetHTTP1(h1)
	p.SetHTTP2(h2)
	p.SetUnencryptedHTTP2(h2c)
	return &p
}

// tlsUpgradesUnderLoad does n upgrades under load; each old generation must
// exit within gone, and load must reach the new one before the next. It
// returns every generation's PID, first one first.
func tlsUpgradesUnderLoad(t *testing.T, s *tlsServer, load *tlsLoad, n int, gone time.Duration) []int {
	t.Helper()
	gens := []int{itest.ReadPID(t, s.pidFile)}
	load.waitFlowing(t, gens[0], 100)
	for i := 1; i <= n; i++ {
		mark := s.logs.Mark()
		old, p := s.upgrade(t)
		took := tlsWaitGone(t, old, gone)
		// The new generation learns it a moment later; until then it would
		// refuse the next upgrade (previous generation still draining).
		s.logs.Wait(t, mark, "previous generation exited", itest.PIDIs(p), 10*time.Second)
		t.Logf("upgrade %d: %d -> %d (%s); old generation gone %v after the new one served", i, old, p, s.version, took.Round(time.Millisecond))
		load.waitFlowing(t, p, 100)
		gens = append(gens, p)
	}
	return gens
}

// ---------------------------------------------------------------------------
// 1. HTTP/1.1 over TLS.

func TestTLSHTTP1UnderLoadAcrossUpgrades(t *testing.T) {
	dir := t.TempDir()
	ca := tlsNewCA(t, "handoff test CA")
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	tlsWriteFiles(t, ca.issue(t, "handoff test", 1), certFile, keyFile)
	s := tlsStartServe(t, dir, tlsPool(ca), "10s", "--tls-cert", certFile, "--tls-key", keyFile)

	const workers = 8
	tr := &http.Transport{
		TLSClientConfig:     &tls.Config{RootCAs: tlsPool(ca)},
		Protocols:           tlsProtocols(true, false, false),
		MaxIdleConnsPerHost: workers,
	}
	defer tr.CloseIdleConnections()
	load := tlsStartLoad(t, tlsLoadOpts{
		base: s.base, clients: []*http.Client{{Transport: tr, Timeout: 20 * time.Second}},
		workers: workers, every: 5 * time.Millisecond, slowEvery: 25,
		check: func(resp *http.Response) error {
			if resp.TLS == nil || resp.Proto != "HTTP/1.1" {
				return fmt.Errorf("proto %s, TLS %v: want HTTP/1.1 over TLS", resp.Proto, resp.TLS != nil)
			}
			return nil
		},
	})
	// TLS connections never move: an idle one stays in the old generation
	// until its next request (answered with Connection: close) or the drain
	// deadline.
	gens := tlsUpgradesUnderLoad(t, s, load, 5, 20*time.Second)
	load.stopAndCheck(t, gens)
	tr.CloseIdleConnections()
	s.stop(t)
	for _, p := range gens[:len(gens)-1] {
		if d, ok := tlsDrained(t, s.logs, p); ok {
			t.Logf("generation %d: %s", p, d.Raw)
			if n, _ := d.Num("http2"); n != 0 {
				t.Errorf("generation %d drained %d HTTP/2 connections, want 0 (HTTP/1.1 only)", p, n)
			}
			if n, _ := d.Num("moved"); n != 0 {
				t.Errorf("generation %d moved %d TLS connections, want 0", p, n)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// 2 and 3. HTTP/2 over TLS, and h2c.

func TestTLSHTTP2UnderLoadAcrossUpgrades(t *testing.T) {
	dir := t.TempDir()
	ca := tlsNewCA(t, "handoff test CA")
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	tlsWriteFiles(t, ca.issue(t, "handoff test", 1), certFile, keyFile)
	s := tlsStartServe(t, dir, tlsPool(ca), "10s", "--tls-cert", certFile, "--tls-key", keyFile)
	tlsH2UnderLoad(t, s, func() *http.Transport {
		return &http.Transport{TLSClientConfig: &tls.Config{RootCAs: tlsPool(ca)}, Protocols: tlsProtocols(false, true, false)}
	}, func(resp *http.Response) error {
		if resp.ProtoMajor != 2 || resp.TLS == nil || resp.TLS.NegotiatedProtocol != "h2" {
			return fmt.Errorf("proto %s, TLS %v: want HTTP/2 negotiated by ALPN h2", resp.Proto, resp.TLS != nil)
		}
		return nil
	})
}

// The plaintext listener speaks HTTP/1.1 and h2c with prior knowledge, side
// by side, on the real binary.
func TestH2CAndHTTP1OnOneListener(t *testing.T) {
	s := tlsStartServe(t, t.TempDir(), nil, "10s")
	for _, c := range []struct {
		p     *http.Protocols
		major int
	}{{tlsProtocols(false, false, true), 2}, {tlsProtocols(true, false, false), 1}} {
		tr := &http.Transport{Protocols: c.p}
		resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get(s.base + "/hello/h2c")
		if err != nil {
			t.Fatalf("GET with protocols %v: %v", c.p, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		tr.CloseIdleConnections()
		if err != nil || resp.StatusCode != 200 || string(b) != "Hello h2c!!!" || resp.ProtoMajor != c.major || resp.TLS != nil {
			t.Errorf("GET with protocols %v: %s %d %q (%v), want HTTP/%d 200", c.p, resp.Proto, resp.StatusCode, b, err, c.major)
		}
	}
}

func TestH2CUnderLoadAcrossUpgrades(t *testing.T) {
	s := tlsStartServe(t, t.TempDir(), nil, "10s")
	tlsH2UnderLoad(t, s, func() *http.Transport {
		return &http.Transport{Protocols: tlsProtocols(false, false, true)}
	}, func(resp *http.Response) error {
		if resp.ProtoMajor != 2 || resp.TLS != nil {
			return fmt.Errorf("proto %s, TLS %v: want h2c", resp.Proto, resp.TLS != nil)
		}
		return nil
	})
}

// tlsH2UnderLoad runs HTTP/2 load on 4 connections (one transport each) across
// 5 upgrades; every answer must be HTTP/2, and every old generation must have
// sent GOAWAY on HTTP/2 connections.
func tlsH2UnderLoad(t *testing.T, s *tlsServer, transport func() *http.Transport, check func(*http.Response) error) {
	var clients []*http.Client
	for range 4 {
		tr := transport()
		defer tr.CloseIdleConnections()
		clients = append(clients, &http.Client{Transport: tr, Timeout: 20 * time.Second})
	}
	load := tlsStartLoad(t, tlsLoadOpts{base: s.base, clients: clients, workers: 8, every: 5 * time.Millisecond, slowEvery: 25, check: check})
	// An HTTP/2 connection leaves with GOAWAY once its streams are answered:
	// the old generation exits soon after its last /slow request.
	gens := tlsUpgradesUnderLoad(t, s, load, 5, 10*time.Second)
	load.stopAndCheck(t, gens)
	s.stop(t)
	for _, p := range gens[:len(gens)-1] {
		if d, ok := tlsDrained(t, s.logs, p); ok {
			t.Logf("generation %d: %s", p, d.Raw)
			if n, _ := d.Num("http2"); n <= 0 {
				t.Errorf("generation %d drained %d HTTP/2 connections, want > 0", p, n)
			}
			if n, ok := d.Num("cut"); !ok || n != 0 {
				t.Errorf("generation %d cut %d connections, want 0", p, n)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// 4. Certificate rotation by upgrade.

func TestTLSCertificateRotation(t *testing.T) {
	dir := t.TempDir()
	caA, caB := tlsNewCA(t, "handoff test CA A"), tlsNewCA(t, "handoff test CA B")
	leafA, leafB := caA.issue(t, "handoff leaf A", 0xA1), caB.issue(t, "handoff leaf B", 0xB2)
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	tlsWriteFiles(t, leafA, certFile, keyFile)
	both := tlsPool(caA, caB)
	s := tlsStartServe(t, dir, both, "10s", "--tls-cert", certFile, "--tls-key", keyFile)

	// Which certificate each generation presented, as the load saw it.
	var mu sync.Mutex
	serials := map[int]map[string]bool{}
	check := func(resp *http.Response) error {
		if resp.TLS == nil || len(resp.TLS.PeerCertificates) == 0 {
			return errors.New("no TLS peer certificate")
		}
		pid, _ := strconv.Atoi(resp.Header.Get("Handoff-Pid"))
		mu.Lock()
		defer mu.Unlock()
		if serials[pid] == nil {
			serials[pid] = map[string]bool{}
		}
		serials[pid][resp.TLS.PeerCertificates[0].SerialNumber.String()] = true
		return nil
	}
	h1 := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: both}, Protocols: tlsProtocols(true, false, false), MaxIdleConnsPerHost: 4}
	h2a := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: both}, Protocols: tlsProtocols(false, true, false)}
	h2b := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: both}, Protocols: tlsProtocols(false, true, false)}
	for _, tr := range []*http.Transport{h1, h2a, h2b} {
		defer tr.CloseIdleConnections()
	}
	clients := []*http.Client{{Transport: h1, Timeout: 20 * time.Second}, {Transport: h2a, Timeout: 20 * time.Second}, {Transport: h2b, Timeout: 20 * time.Second}}
	load := tlsStartLoad(t, tlsLoadOpts{base: s.base, clients: clients, workers: 6, every: 5 * time.Millisecond, slowEvery: 25, check: check})

	// presented is the certificate a new TLS connection gets, and the PID that answers on it.
	presented := func() (*x509.Certificate, int) {
		t.Helper()
		resp, _, pid, err := s.get("/healthz")
		if err != nil {
			t.Fatalf("GET /healthz on a new connection: %v", err)
		}
		if resp.TLS == nil || len(resp.TLS.PeerCertificates) == 0 {
			t.Fatalf("GET /healthz: no peer certificate")
		}
		return resp.TLS.PeerCertificates[0], pid
	}
	same := func(c *x509.Certificate, want tlsLeaf) bool {
		return c.SerialNumber.Cmp(want.cert.SerialNumber) == 0 && c.Subject.CommonName == want.cert.Subject.CommonName &&
			c.Issuer.CommonName == want.cert.Issuer.CommonName
	}

	first := itest.ReadPID(t, s.pidFile)
	load.waitFlowing(t, first, 100)
	// The files change under the running generation, which keeps cert A.
	tlsWriteFiles(t, leafB, certFile, keyFile)
	for range 3 {
		if c, pid := presented(); !same(c, leafA) || pid != first {
			t.Errorf("before the upgrade: a new connection got serial %v subject %q from pid %d, want cert A (serial %v, %q) from %d",
				c.SerialNumber, c.Subject.CommonName, pid, leafA.cert.SerialNumber, leafA.cert.Subject.CommonName, first)
		}
	}
	old, p := s.upgrade(t)
	tlsWaitGone(t, old, 20*time.Second)
	for range 3 {
		if c, pid := presented(); !same(c, leafB) || pid != p {
			t.Errorf("after the upgrade: a new connection got serial %v subject %q from pid %d, want cert B (serial %v, %q) from %d",
				c.SerialNumber, c.Subject.CommonName, pid, leafB.cert.SerialNumber, leafB.cert.Subject.CommonName, p)
		}
	}
	load.waitFlowing(t, p, 100)
	load.stopAndCheck(t, []int{first, p})
	mu.Lock()
	defer mu.Unlock()
	wantA, wantB := map[string]bool{leafA.cert.SerialNumber.String(): true}, map[string]bool{leafB.cert.SerialNumber.String(): true}
	if !tlsMapsEqual(serials[first], wantA) || !tlsMapsEqual(serials[p], wantB) {
		t.Errorf("certificates seen by the load, by pid: %v; want %d: %v, %d: %v", serials, first, wantA, p, wantB)
	}
}

func tlsMapsEqual(a, b map[string]bool) bool {
	if len(a) != len(b) {
		return false
	}
	for k := range a {
		if !b[k] {
			return false
		}
	}
	return true
}

// ---------------------------------------------------------------------------
// 5. WebSocket: a client that re-sends what was not echoed.

// wsConnEnd is one connection of a wsClient: the PID that accepted it and
// how it ended.
type wsConnEnd struct {
	pid       int
	code      int // the close code received; 0 when it ended otherwise
	err       string
	byClient  bool // the client closed it at the end
	delivered int  // messages echoed on it
}

// wsClient sends numbered text messages on /ws, one per tick; a message is
// acknowledged when its echo comes back. When a connection ends, it
// reconnects and re-sends every message not acknowledged, in order.
type wsClient struct {
	url   string
	pidOf func(clientPort int) int // the server process that holds the connection
	stopC chan struct{}            // stop sending new messages; finish the rest
	done  chan struct{}

	mu       sync.Mutex
	next     int // the next new number
	acked    map[int]bool
	pending  map[int]bool // sent, not acknowledged
	ends     []wsConnEnd
	livePID  int // the PID of the current connection
	errs     []string
	dialErrs []string
}

func wsStartClient(tb testing.TB, url string, pidOf func(int) int, every time.Duration) *wsClient {
	c := &wsClient{url: url, pidOf: pidOf, stopC: make(chan struct{}), done: make(chan struct{}), next: 1, acked: map[int]bool{}, pending: map[int]bool{}}
	go c.run(every)
	tb.Cleanup(func() {
		c.stop()
		itest.WaitChan(c.done, 20*time.Second)
	})
	return c
}

func (c *wsClient) stop() {
	select {
	case <-c.stopC:
	default:
		close(c.stopC)
	}
}

func (c *wsClient) errorf(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.errs) < 20 {
		c.errs = append(c.errs, fmt.Sprintf(format, args...))
	}
}

func (c *wsClient) run(every time.Duration) {
	defer close(c.done)
	d := websocket.Dialer{HandshakeTimeout: 10 * time.Second}
	for {
		c.mu.Lock()
		finished := tlsClosed(c.stopC) && len(c.pending) == 0
		failing := len(c.dialErrs) >= 20
		c.mu.Unlock()
		if finished || failing {
			return
		}
		ws, resp, err := d.Dial(c.url, nil)
		if err != nil {
			c.mu.Lock()
			c.dialErrs = append(c.dialErrs, fmt.Sprintf("%s %v", time.Now().Format("15:04:05.000"), err))
			c.mu.Unlock()
			continue
		}
		resp.Body.Close()
		// gorilla writes the 101 itself, without Handoff-Pid: /proc says
		// which generation holds the server end.
		pid := c.pidOf(ws.NetConn().LocalAddr().(*net.TCPAddr).Port)
		end := c.serve(ws, pid, every)
		ws.Close()
		c.mu.Lock()
		c.ends = append(c.ends, end)
		c.mu.Unlock()
	}
}

// serve runs one connection until it ends, and says how.
func (c *wsClient) serve(ws *websocket.Conn, pid int, every time.Duration) wsConnEnd {
	end := wsConnEnd{pid: pid}
	c.mu.Lock()
	c.livePID = pid
	resend := make([]int, 0, len(c.pending))
	for n := range c.pending {
		resend = append(resend, n)
	}
	c.mu.Unlock()
	slices.Sort(resend)

	readerDone := make(chan struct{})
	var delivered int
	var readErr error
	go func() {
		defer close(readerDone)
		for {
			kind, msg, err := ws.ReadMessage()
			if err != nil {
				readErr = err
				return
			}
			n, perr := strconv.Atoi(string(msg))
			c.mu.Lock()
			switch {
			case kind != websocket.TextMessage || perr != nil:
				c.mu.Unlock()
				c.errorf("pid %d: unexpected message %d %q", pid, kind, msg)
				continue
			case c.pending[n]:
				delete(c.pending, n)
				c.acked[n] = true
				delivered++
			case !c.acked[n]:
				c.mu.Unlock()
				c.errorf("pid %d: echo of %d, never sent", pid, n)
				continue
			}
			c.mu.Unlock()
		}
	}()

	writeErr := func() error {
		for _, n := range resend {
			if err := ws.WriteMessage(websocket.TextMessage, []byte(strconv.Itoa(n))); err != nil {
				return err
			}
		}
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			select {
			case <-readerDone:
				return nil
			case <-tick.C:
			}
			c.mu.Lock()
			if tlsClosed(c.stopC) {
				left := len(c.pending)
				c.mu.Unlock()
				if left > 0 {
					continue // their echoes, or the end of this connection, will come
				}
				end.byClient = true
				msg := websocket.FormatCloseMessage(websocket.CloseNormalClosure, "done")
				return ws.WriteControl(websocket.CloseMessage, msg, time.Now().Add(5*time.Second))
			}
			n := c.next
			c.next++
			c.pending[n] = true
			c.mu.Unlock()
			if err := ws.WriteMessage(websocket.TextMessage, []byte(strconv.Itoa(n))); err != nil {
				return err
			}
		}
	}()
	if writeErr != nil {
		// The connection is going: the reader sees why, or the read
		// deadline ends it.
		ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	} else if end.byClient {
		ws.SetReadDeadline(time.Now().Add(10 * time.Second)) // the server's close in answer
	}
	<-readerDone
	end.delivered = delivered
	var ce *websocket.CloseError
	if errors.As(readErr, &ce) {
		end.code = ce.Code
	}
	end.err = fmt.Sprint(readErr)
	if writeErr != nil {
		end.err += "; write: " + writeErr.Error()
	}
	return end
}

func (c *wsClient) live() (pid, acked int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.livePID, len(c.acked)
}

// waitOn waits (15s) until the client is connected to pid and 50 more
// messages were acknowledged.
func (c *wsClient) waitOn(tb testing.TB, pid int) {
	tb.Helper()
	_, from := c.live()
	itest.Eventually(tb, 15*time.Second, func() bool { p, n := c.live(); return p == pid && n >= from+50 },
		"the WebSocket client on pid %d with 50 more acknowledged messages", pid)
}

func tlsClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestWebSocketReconnectsAcrossUpgrades(t *testing.T) {
	// The drain deadline is far: an old generation must leave because its
	// WebSockets closed, not because it was cut.
	s := itest.StartServer(t, itest.ServerOpts{DrainTimeout: "30s", UpgradeTimeout: "15s"})
	const nClients = 3
	pidOf := func(clientPort int) int {
		for _, e := range itest.ReadTCP() {
			if e.LocalPort == s.Port && e.RemPort == clientPort && e.Inode != 0 {
				for _, p := range s.Procs() {
					if itest.HasSocketInode(p, e.Inode) {
						return p
					}
				}
			}
		}
		return 0
	}
	var clients []*wsClient
	for range nClients {
		clients = append(clients, wsStartClient(t, "ws://"+s.Addr+"/ws", pidOf, 2*time.Millisecond))
	}
	gens := []int{s.LivePID()}
	for _, c := range clients {
		c.waitOn(t, gens[0])
	}
	for i := 1; i <= 3; i++ {
		start := time.Now()
		old, p := s.Upgrade(itest.NextVersion(s.Version), 10*time.Second) // old gone within 10s
		t.Logf("upgrade %d: %d -> %d; old generation gone %v after the HUP", i, old, p, time.Since(start).Round(time.Millisecond))
		for _, c := range clients {
			c.waitOn(t, p)
		}
		gens = append(gens, p)
	}
	for _, c := range clients {
		c.stop()
	}
	for i, c := range clients {
		if !itest.WaitChan(c.done, 20*time.Second) {
			t.Fatalf("client %d did not finish within 20s of its stop", i)
		}
	}

	for i, c := range clients {
		c.mu.Lock()
		n := c.next - 1
		var missing []int
		for k := 1; k <= n; k++ {
			if !c.acked[k] {
				missing = append(missing, k)
			}
		}
		t.Logf("client %d: %d messages, all acknowledged: %v; connections: %+v", i, n, len(missing) == 0, c.ends)
		if len(missing) > 0 || len(c.acked) != n {
			t.Errorf("client %d: %d messages sent, %d acknowledged; missing %v", i, n, len(c.acked), missing[:min(len(missing), 20)])
		}
		if len(c.errs) > 0 {
			t.Errorf("client %d: %s", i, strings.Join(c.errs, "\n"))
		}
		if len(c.dialErrs) > 0 {
			t.Errorf("client %d: %d connections refused or failed: %s", i, len(c.dialErrs), strings.Join(c.dialErrs, "\n"))
		}
		got1012 := map[int]bool{}
		for _, e := range c.ends {
			switch {
			case e.byClient:
			case e.code == websocket.CloseServiceRestart:
				got1012[e.pid] = true
			default:
				t.Errorf("client %d: a connection to pid %d ended without close code 1012: %+v", i, e.pid, e)
			}
		}
		for _, old := range gens[:len(gens)-1] {
			if !got1012[old] {
				t.Errorf("client %d: no close 1012 from generation %d; connections: %+v", i, old, c.ends)
			}
		}
		if len(c.ends) == 0 || !c.ends[len(c.ends)-1].byClient || c.ends[len(c.ends)-1].pid != gens[len(gens)-1] {
			t.Errorf("client %d: the last connection should be to %d, closed by the client: %+v", i, gens[len(gens)-1], c.ends)
		}
		c.mu.Unlock()
	}

	live := s.LivePID()
	s.Signal(live, syscall.SIGTERM)
	s.Proc.Wait(t, 60*time.Second)
	for _, p := range gens[:len(gens)-1] {
		if d, ok := tlsDrained(t, s.Logs, p); ok {
			t.Logf("generation %d: %s", p, d.Raw)
			if n, _ := d.Num("hijacked"); n != nClients {
				t.Errorf("generation %d: %d hijacked connections closed in the drain, want %d", p, n, nClients)
			}
			if n, ok := d.Num("cut"); !ok || n != 0 {
				t.Errorf("generation %d cut %d connections, want 0", p, n)
			}
		}
	}
}

// ---------------------------------------------------------------------------
// An HTTP/2 connection whose TLS handshake ends after the drain began.

// tlsH2Conn speaks just enough HTTP/2 by hand to see the frames a server
// sends: it acknowledges SETTINGS and reports the type of every frame.
type tlsH2Conn struct {
	c      net.Conn
	frames chan byte // the type of each frame read; closed at the end of the connection
}

func tlsH2Open(tb testing.TB, c net.Conn) *tlsH2Conn {
	tb.Helper()
	h := &tlsH2Conn{c: c, frames: make(chan byte, 64)}
	preface := append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0) // and an empty SETTINGS
	if _, err := c.Write(preface); err != nil {
		tb.Fatalf("HTTP/2 preface: %v", err)
	}
	go func() {
		defer close(h.frames)
		var hdr [9]byte
		for {
			if _, err := io.ReadFull(c, hdr[:]); err != nil {
				return
			}
			n := int(hdr[0])<<16 | int(hdr[1])<<8 | int(hdr[2])
			if _, err := io.CopyN(io.Discard, c, int64(n)); err != nil {
				return
			}
			if hdr[3] == 4 && hdr[4]&1 == 0 { // SETTINGS, not an ACK
				c.Write([]byte{0, 0, 0, 4, 1, 0, 0, 0, 0})
			}
			select {
			case h.frames <- hdr[3]:
			default: // nobody is looking
			}
		}
	}()
	return h
}

// get sends GET path on stream id (HPACK by hand: :method GET, :scheme
// https, :path / from the static table, :authority literal).
func (h *tlsH2Conn) get(tb testing.TB, id uint32, authority string) {
	tb.Helper()
	block := append([]byte{0x82, 0x87, 0x84, 0x01, byte(len(authority))}, authority...)
	f := []byte{0, 0, byte(len(block)), 1, 0x5, byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id)} // HEADERS, END_STREAM|END_HEADERS
	if _, err := h.c.Write(append(f, block...)); err != nil {
		tb.Fatalf("HTTP/2 HEADERS: %v", err)
	}
}

// waitFrame waits (within) for a frame of type typ and reports whether it
// came before the connection ended; seen lists the types read meanwhile.
func (h *tlsH2Conn) waitFrame(typ byte, within time.Duration) (ok, ended bool, seen []byte) {
	t := time.NewTimer(within)
	defer t.Stop()
	for {
		select {
		case f, open := <-h.frames:
			if !open {
				return false, true, seen
			}
			seen = append(seen, f)
			if f == typ {
				return true, false, seen
			}
		case <-t.C:
			return false, false, seen
		}
	}
}

const (
	h2Headers  = 0x1
	h2Settings = 0x4
	h2GoAway   = 0x7
)

// A client connected to the old generation just before its drain, whose TLS
// handshake ends after the GOAWAYs went out (a WAN round trip is enough), must
// be told to leave too: otherwise it is served until the drain deadline, then
// cut with its streams in flight.
func TestTLSHTTP2LateHandshakeGetsGoAway(t *testing.T) {
	dir := t.TempDir()
	ca := tlsNewCA(t, "handoff test CA")
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	tlsWriteFiles(t, ca.issue(t, "handoff test", 1), certFile, keyFile)
	s := tlsStartServe(t, dir, tlsPool(ca), "10s", "--tls-cert", certFile, "--tls-key", keyFile)
	first := itest.ReadPID(t, s.pidFile)
	cfg := &tls.Config{RootCAs: tlsPool(ca), NextProtos: []string{"h2"}, ServerName: "127.0.0.1"}

	// conn1, an HTTP/2 connection, says when the drain's GOAWAYs went out.
	c1, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", s.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c1.Close()
	h1 := tlsH2Open(t, c1)
	if ok, _, seen := h1.waitFrame(h2Settings, 10*time.Second); !ok {
		t.Fatalf("conn1: no SETTINGS from the server (frames %v)", seen)
	}
	// conn2 is accepted by the first generation and says nothing yet.
	raw, err := net.DialTimeout("tcp", s.addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	port := raw.LocalAddr().(*net.TCPAddr).Port
	itest.Eventually(t, 10*time.Second, func() bool {
		for _, e := range itest.ReadTCP() {
			if e.RemPort == port && e.Inode != 0 && itest.HasSocketInode(first, e.Inode) {
				return true
			}
		}
		return false
	}, "the first generation %d to accept conn2", first)

	old, _ := s.upgrade(t)
	if ok, _, seen := h1.waitFrame(h2GoAway, 10*time.Second); !ok {
		t.Fatalf("conn1: no GOAWAY from the draining generation %d (frames %v)", old, seen)
	}
	tc := tls.Client(raw, cfg)
	raw.SetDeadline(time.Now().Add(30 * time.Second))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("conn2: TLS handshake with the draining generation: %v", err)
	}
	if p := tc.ConnectionState().NegotiatedProtocol; p != "h2" {
		t.Fatalf("conn2: ALPN %q, want h2", p)
	}
	h2 := tlsH2Open(t, tc)
	h2.get(t, 1, s.addr)
	start := time.Now()
	ok, ended, seen := h2.waitFrame(h2GoAway, 5*time.Second)
	switch {
	case ok:
		t.Logf("conn2: GOAWAY after %v (frames %v)", time.Since(start).Round(time.Millisecond), seen)
	case ended:
		t.Errorf("conn2: closed without GOAWAY after %v (frames %v)", time.Since(start).Round(time.Millisecond), seen)
	default:
		t.Errorf("conn2: no GOAWAY within 5s of its handshake with the draining generation %d (frames %v: served as if nothing happened)", old, seen)
	}
	// Leave as a client that got GOAWAY would.
	tc.Close()
	c1.Close()
	s.stop(t)
	if d, ok := tlsDrained(t, s.logs, old); ok {
		t.Logf("generation %d: %s", old, d.Raw)
		if n, ok := d.Num("cut"); !ok || n != 0 {
			t.Errorf("generation %d cut %d connections, want 0", old, n)
		}
	}
}

// A /ws client that sends and never reads holds up no other client (its
// echoes once held the hub's lock, which every other socket's echo and the
// drain's close frames waited on); the 101 answer carries Handoff-Pid; a
// message over the read limit closes its socket with 1009.
func TestWebSocketNonReadingClientHoldsUpNoOne(t *testing.T) {
	s := itest.StartServer(t, itest.ServerOpts{})
	url := "ws://" + s.Addr + "/ws"
	good, resp, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	defer good.Close()
	if got := resp.Header.Get("Handoff-Pid"); got != strconv.Itoa(s.LivePID()) {
		t.Errorf("101 answer: Handoff-Pid %q, want %d", got, s.LivePID())
	}
	echo := func(c *websocket.Conn, msg string) error {
		c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if err := c.WriteMessage(websocket.TextMessage, []byte(msg)); err != nil {
			return err
		}
		_, got, err := c.ReadMessage()
		if err == nil && string(got) != msg {
			err = fmt.Errorf("echo %q, want %q", got, msg)
		}
		return err
	}
	if err := echo(good, "before"); err != nil {
		t.Fatalf("echo before: %v", err)
	}

	// The bad client: a small receive buffer, 60 KB messages, no reads, until
	// its own writes stop going out (the server stopped reading it).
	small := &websocket.Dialer{NetDialContext: (&net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		return rc.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
	}}).DialContext}
	bad, _, err := small.Dial(url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	defer bad.Close()
	chunk := bytes.Repeat([]byte("x"), 60<<10)
	stuck := false
	for range 2000 {
		bad.SetWriteDeadline(time.Now().Add(2 * time.Second))
		if err := bad.WriteMessage(websocket.BinaryMessage, chunk); err != nil {
			stuck = true
			break
		}
	}
	if !stuck {
		t.Fatalf("precondition: the non-reading client's writes never stopped going out")
	}
	if err := echo(good, "while another client does not read"); err != nil {
		t.Errorf("echo while another client does not read: %v", err)
	}

	big, _, err := websocket.DefaultDialer.Dial(url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	defer big.Close()
	big.SetWriteDeadline(time.Now().Add(5 * time.Second))
	big.SetReadDeadline(time.Now().Add(5 * time.Second))
	big.WriteMessage(websocket.BinaryMessage, bytes.Repeat([]byte("y"), 2<<20))
	_, _, err = big.ReadMessage()
	if !websocket.IsCloseError(err, websocket.CloseMessageTooBig) {
		t.Errorf("a 2 MiB message: read %v, want close 1009 (message too big)", err)
	}
}

// --check, and so --preflight, refuses a certificate outside its dates: every
// client would refuse it. A valid one passes.
func TestCheckRefusesExpiredCertificate(t *testing.T) {
	dir := t.TempDir()
	ca := tlsNewCA(t, "handoff test CA")
	bin := itest.Binary(t, "handoff-v1")
	for _, c := range []struct {
		name      string
		from, to  time.Time
		wantCode  int
		wantInErr string
	}{
		{"valid", time.Now().Add(-time.Hour), time.Now().Add(time.Hour), 0, "ok"},
		{"expired", time.Now().Add(-48 * time.Hour), time.Now().Add(-24 * time.Hour), 1, "is not valid now"},
		{"not yet valid", time.Now().Add(24 * time.Hour), time.Now().Add(48 * time.Hour), 1, "is not valid now"},
	} {
		certFile, keyFile := filepath.Join(dir, c.name+".pem"), filepath.Join(dir, c.name+".key")
		tlsWriteFiles(t, ca.issueFor(t, "handoff test", 1, c.from, c.to), certFile, keyFile)
		r := itest.Run(t, 30*time.Second, bin, "serve", "--listen", "127.0.0.1:0", "--tls-cert", certFile, "--tls-key", keyFile, "--check")
		if r.Code != c.wantCode || !strings.Contains(r.Stderr, c.wantInErr) || !strings.HasPrefix(r.Stderr, "handoff serve --check: ") {
			t.Errorf("%s certificate: --check exit %d, want %d with %q\n%v", c.name, r.Code, c.wantCode, c.wantInErr, r)
		}
	}
}
