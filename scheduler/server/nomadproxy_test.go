package server

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// Requests that are not gang registrations reach Nomad unchanged: method,
// path, query, body and the ACL token header.
func TestNomadProxyPassesThrough(t *testing.T) {
	var got *http.Request
	var gotBody string
	nomad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Clone(r.Context())
		b, _ := io.ReadAll(r.Body)
		gotBody = string(b)
		io.WriteString(w, `{"ok":true}`)
	}))
	defer nomad.Close()
	p, err := (&Server{}).NewNomadProxy(nomad.URL)
	if err != nil {
		t.Fatal(err)
	}
	front := httptest.NewServer(p)
	defer front.Close()

	cases := []struct{ method, path, body string }{
		{"GET", "/v1/job/x/allocations?index=7&wait=5s", ""},
		{"PUT", "/v1/jobs", `{"Job":{"ID":"plain","Meta":{"owner":"me"}}}`}, // no gang meta
		{"DELETE", "/v1/job/x?purge=true", ""},
		{"GET", "/v1/evaluation/unknown-eval", ""}, // not one of cohort's
	}
	for _, c := range cases {
		req, _ := http.NewRequest(c.method, front.URL+c.path, strings.NewReader(c.body))
		req.Header.Set("X-Nomad-Token", "secret-token")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if got == nil || got.Method != c.method || got.URL.RequestURI() != c.path || gotBody != c.body {
			t.Errorf("%s %s arrived as %v with body %q", c.method, c.path, got, gotBody)
			continue
		}
		if tok := got.Header.Get("X-Nomad-Token"); tok != "secret-token" {
			t.Errorf("%s %s: token header %q", c.method, c.path, tok)
		}
		got = nil
	}
}
