package server

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/api"
)

// The queue says why each gang waits: the first that does not fit names
// what it needs and the most any node has free; one behind it that fits
// waits for it; GET of a queued job says the same.
func TestQueueSaysWhyGangsWait(t *testing.T) {
	h := newHarness(t) // two nodes of 8 workers of 500 MHz, 512 MiB; big takes 8 + 6
	h.submit(gang("big", "microvm", 14))
	h.submit(gang("next", "microvm", 4))
	h.submit(gang("small", "microvm", 1))
	rec := h.serve(httptest.NewRequest(http.MethodGet, "/v1/queue", nil))
	var q []api.JobView
	if err := json.Unmarshal(rec.Body.Bytes(), &q); err != nil || len(q) != 2 {
		t.Fatalf("queue: %v %s", err, rec.Body)
	}
	if q[0].ID != "next" || !strings.HasPrefix(q[0].Waiting, "waits for room: needs 4 workers of 500 MHz, 512 MiB (4 in all); the most free of 2 eligible nodes was") ||
		!strings.Contains(q[0].Waiting, "with 1000 MHz, 1024 MiB") {
		t.Errorf("next: %q", q[0].Waiting)
	}
	if q[1].ID != "small" || !strings.Contains(q[1].Waiting, "fits, but waits behind next") {
		t.Errorf("small: %q", q[1].Waiting)
	}
	rec = h.serve(httptest.NewRequest(http.MethodGet, "/v1/job/next", nil))
	var v api.JobView
	if err := json.Unmarshal(rec.Body.Bytes(), &v); err != nil || v.Waiting != q[0].Waiting {
		t.Errorf("GET next: %v %+v", err, v)
	}
	rec = h.serve(httptest.NewRequest(http.MethodGet, "/v1/job/big", nil))
	var big api.JobView
	if err := json.Unmarshal(rec.Body.Bytes(), &big); err != nil || big.Waiting != "" {
		t.Errorf("a placed gang says it waits: %v %+v", err, big)
	}
}
