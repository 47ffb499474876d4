package main

import (
	"bufio"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// The reference app answers every request as its ServeMux would, the ones it
// routes by hand included: status, body, Location and Allow.
func TestAppAnswersAsServeMux(t *testing.T) {
	hub := newWSHub()
	app, ref := newMux(hub), appServeMux(hub)
	for _, raw := range []string{
		"GET / ", "HEAD / ", "POST / ", "GET /healthz ", "PUT /healthz ", "GET /hello/a ", "HEAD /hello/a ",
		"GET /hello/a%20b ", "GET /hello/a%2Fb ", "POST /hello/a%2Fb ", "GET /hello/.. ", "POST /hello/.. ",
		"GET /hello/%2e%2e ", "GET /hello/%2F ", "GET // ", "GET //healthz ", "GET /./healthz ", "GET /hello//x ",
		"GET /hello/a/../b ", "GET /hello/a/b ", "GET /hello/ ", "GET /hello ", "GET /nope ", "GET /slow?ms=x ",
		"GET /slow?ms=0 ", "OPTIONS * ", "CONNECT / ", "GET /ws ", "DELETE /ws ", "GET /healthz/ ",
	} {
		var got [2]*httptest.ResponseRecorder
		for i, h := range []http.Handler{app, ref} {
			req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw + "HTTP/1.1\r\nHost: test\r\n\r\n")))
			if err != nil {
				t.Fatalf("%q: %v", raw, err)
			}
			got[i] = httptest.NewRecorder()
			h.ServeHTTP(got[i], req)
		}
		a, r := got[0], got[1]
		if a.Code != r.Code || a.Body.String() != r.Body.String() ||
			a.Header().Get("Location") != r.Header().Get("Location") || a.Header().Get("Allow") != r.Header().Get("Allow") {
			t.Errorf("%q: app answers %d %q (Location %q, Allow %q), ServeMux %d %q (Location %q, Allow %q)", raw,
				a.Code, a.Body, a.Header().Get("Location"), a.Header().Get("Allow"),
				r.Code, r.Body, r.Header().Get("Location"), r.Header().Get("Allow"))
		}
		if a.Header().Get("Handoff-Pid") == "" {
			t.Errorf("%q: no Handoff-Pid", raw)
		}
	}
}
