package server

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
)

// FuzzAPIRequests sends arbitrary requests to the API of a server over
// in-memory Raft and a fake Nomad that never fails: bad input must be
// answered with a 4xx that leaves the replicated state as it was, and
// never a 5xx or a crash. Membership requests are left out: accepted, they
// change the Raft group itself, and are tested on their own.
func FuzzAPIRequests(f *testing.F) {
	job, _ := json.Marshal(api.SubmitRequest{Job: gang("seed", jobspec.DriverMicroVM, 1)})
	raw, _ := json.Marshal(api.SubmitRequest{Job: gang("raw", jobspec.DriverRawExec, 2)})
	for _, s := range []struct {
		method uint8
		path   string
		body   string
	}{
		{1, "/v1/jobs", string(job)},
		{1, "/v1/jobs", string(raw)},
		{1, "/v1/jobs", `{"Job":{"ID":"x","Meta":{"cohort.gang":"1","cohort.max_runtime":"1m"},"TaskGroups":[{"Name":"g","Tasks":[{"Name":"t","Driver":"microvm"}]}]}}`},
		{1, "/v1/jobs", `{"Job":{"ID":"x","Type":"service","Meta":{"cohort.gang":"1"}}}`},
		{1, "/v1/barrier/known", `{"Alloc":"00000000-0000-4000-8000-000000000001","Instance":"a","Wait":"1s"}`},
		{1, "/v1/barrier/unknown?namespace=team", `{"Alloc":"00000000-0000-4000-8000-000000000001"}`},
		{2, "/v1/job/known", ""},
		{0, "/v1/job/known?workers=1", ""},
		{0, "/v1/job/known/bill?run=2", ""},
		{0, "/v1/queue", ""},
		{0, "/v1/nodes", ""},
		{0, "/metrics", ""},
		{0, "/ui/", ""},
	} {
		f.Add(s.method, s.path, []byte(s.body))
	}
	h := newHarness(f, node("n1", 64000, 65536))
	h.submit(gang("known", jobspec.DriverMicroVM, 2))
	handler := h.srv.Handler()
	f.Fuzz(func(t *testing.T, method uint8, path string, body []byte) {
		m := []string{"GET", "POST", "DELETE", "PUT"}[method%4]
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		if strings.HasPrefix(path, "/v1/members") {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, m, "http://cohort"+path, bytes.NewReader(body))
		if err != nil {
			return
		}
		before := h.snapshotState()
		rec := httptest.NewRecorder()
		handler.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("%s %q %q: %d %s", m, path, body, rec.Code, rec.Body)
		}
		if rec.Code >= 400 && h.snapshotState() != before {
			t.Fatalf("%s %q %q: rejected with %d, but the state changed", m, path, body, rec.Code)
		}
		if rec.Code >= 400 && !json.Valid(rec.Body.Bytes()) && rec.Code != http.StatusMethodNotAllowed && rec.Code != http.StatusNotFound {
			t.Fatalf("%s %q: error answer is not JSON: %s", m, path, rec.Body)
		}
	})
}
