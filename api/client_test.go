package api

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// The client escapes IDs, carries the namespace, and turns error answers
// into *Error with the server's message.
func TestClient(t *testing.T) {
	var got *http.Request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r
		switch r.URL.Path {
		case "/v1/job/a b":
			json.NewEncoder(w).Encode(JobView{ID: "a b", Status: StatusRunning})
		case "/v1/barrier/j":
			var req BarrierRequest
			json.NewDecoder(r.Body).Decode(&req)
			json.NewEncoder(w).Encode(BarrierResponse{Status: BarrierRelease, Reason: req.Alloc})
		case "/v1/health":
			w.WriteHeader(http.StatusServiceUnavailable)
			json.NewEncoder(w).Encode(ErrorBody{Error: "not the leader", LeaderID: "s2"})
		default:
			w.WriteHeader(http.StatusBadGateway)
			w.Write([]byte("upstream down"))
		}
	}))
	defer srv.Close()
	c := NewClient(Config{Address: srv.URL + "/"})
	v, err := c.Job("team", "a b", true)
	if err != nil || v.Status != StatusRunning || got.URL.EscapedPath() != "/v1/job/a%20b" || got.URL.Query().Get("namespace") != "team" || got.URL.Query().Get("workers") != "1" {
		t.Fatalf("job: %v %+v %s", err, v, got.URL)
	}
	if _, err := c.Job(DefaultNamespace, "a b", false); err != nil || got.URL.Query().Has("namespace") {
		t.Errorf("the default namespace travels: %s", got.URL)
	}
	b, err := c.Barrier(context.Background(), "", "j", BarrierRequest{Alloc: "x", Wait: "1s"})
	if err != nil || b.Status != BarrierRelease || b.Reason != "x" {
		t.Errorf("barrier: %v %+v", err, b)
	}
	err = c.Health()
	if e, ok := err.(*Error); !ok || e.StatusCode != 503 || e.Message != "not the leader" || e.LeaderID != "s2" || !IsStatus(err, 503) {
		t.Errorf("health: %#v", err)
	}
	if err := c.Stop("", "x"); !IsStatus(err, 502) || err.Error() == "" {
		t.Errorf("stop: %v", err)
	}
	if _, err := c.Barrier(context.Background(), "", "j", BarrierRequest{Alloc: "x", Wait: "soon"}); err == nil {
		t.Error("a bad wait was sent")
	}
	if NewClient(Config{Address: "10.0.0.1:4747", Timeout: time.Second}).Address() != "http://10.0.0.1:4747" {
		t.Error("a bare host:port is not http")
	}
}
