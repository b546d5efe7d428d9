package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// snapshotState is the replicated state's bytes, to compare before and
// after a request.
func (h *harness) snapshotState() string {
	var b []byte
	h.r.Read(func(st *state.State) { b, _ = st.Marshal() })
	return string(b)
}

func (h *harness) do(method, path, body string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.srv.Handler().ServeHTTP(rec, httptest.NewRequest(method, path, strings.NewReader(body)))
	return rec
}

// Every rejected request says why, with a 4xx, and leaves the state as it
// was.
func TestRejectedRequestsChangeNothing(t *testing.T) {
	h := newHarness(t)
	h.submit(gang("known", jobspec.DriverMicroVM, 1))
	job, _ := json.Marshal(api.SubmitRequest{Job: gang("fine", jobspec.DriverMicroVM, 1)})
	for _, c := range []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"POST", "/v1/jobs", `{"Job":`, 400, "decoding the request body"},
		{"POST", "/v1/jobs", `{}`, 400, `body must be {`},
		{"POST", "/v1/jobs", string(job) + `{}`, 400, "more than one JSON value"},
		{"POST", "/v1/jobs", `{"Job":{"ID":"` + strings.Repeat("a", maxJobBody) + `"}}`, 413, "request body over"},
		{"POST", "/v1/jobs", `{"Job":{"ID":"x y","Meta":{"cohort.gang":"1","cohort.max_runtime":"1m"}}}`, 400, "space or a slash"},
		{"POST", "/v1/barrier/known", `{"Alloc":"not-a-uuid"}`, 400, "must be a Nomad allocation ID"},
		{"POST", "/v1/barrier/known", `{"Alloc":"00000000-0000-4000-8000-000000000000","Wait":"forever"}`, 400, "Wait must be a duration"},
		{"POST", "/v1/barrier/known", `{"Alloc":"00000000-0000-4000-8000-000000000000","Instance":"` + strings.Repeat("i", 65) + `"}`, 400, "at most 64"},
		{"POST", "/v1/barrier/known?namespace=bad%2Fns", `{"Alloc":"00000000-0000-4000-8000-000000000000"}`, 400, "not a valid Nomad namespace"},
		{"DELETE", "/v1/job/unknown", ``, 404, "no such job"},
		{"GET", "/v1/job/known/bill?run=0", ``, 400, "run must be"},
		{"GET", "/v1/job/" + strings.Repeat("z", 200), ``, 400, "at most 128"},
		{"POST", "/v1/members/join", `{"ID":""}`, 403, "needs a cohort server's certificate"},
	} {
		before := h.snapshotState()
		rec := h.do(c.method, c.path, c.body)
		if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.want) {
			t.Errorf("%s %s: %d %s, want %d saying %q", c.method, c.path[:min(len(c.path), 40)], rec.Code, rec.Body.String()[:min(rec.Body.Len(), 200)], c.code, c.want)
		}
		if after := h.snapshotState(); after != before {
			t.Errorf("%s %s changed the state", c.method, c.path[:min(len(c.path), 40)])
		}
	}
	// The server still works.
	if rec := h.do("POST", "/v1/jobs", string(job)); rec.Code != 200 {
		t.Errorf("a good submission after the bad ones: %d %s", rec.Code, rec.Body)
	}
}

// Requests that are not gang registrations reach Nomad unchanged: method,
// path, query, body and the ACL token header; `nomad job stop` of a gang
// cohort knows stops it in cohort, even while it is queued.
func TestNomadProxy(t *testing.T) {
	h := newHarness(t)
	var got *http.Request
	var gotBody string
	nomad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r.Clone(r.Context())
		b, _ := io.ReadAll(r.Body)
		gotBody = string(b)
		io.WriteString(w, `{"ok":true}`)
	}))
	defer nomad.Close()
	p, err := h.srv.NewNomadProxy(nomad.URL, nil)
	if err != nil {
		t.Fatal(err)
	}
	front := httptest.NewServer(p)
	defer front.Close()

	for _, c := range []struct{ method, path, body string }{
		{"GET", "/v1/job/x/allocations?index=7&wait=5s", ""},
		{"PUT", "/v1/jobs", `{"Job":{"ID":"plain","Meta":{"owner":"me"}}}`}, // no gang meta
		{"DELETE", "/v1/job/x?purge=true", ""},                              // not a gang cohort knows
		{"GET", "/v1/evaluation/unknown-eval", ""},                          // not one of cohort's
	} {
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

	// A gang registered through the endpoint is planned by Nomad with the
	// caller's token, then admitted by cohort.
	body, _ := json.Marshal(map[string]any{"Job": gang("viaproxy", jobspec.DriverMicroVM, 1)})
	req, _ := http.NewRequest("PUT", front.URL+"/v1/jobs", bytes.NewReader(body))
	req.Header.Set("X-Nomad-Token", "secret-token")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var reg struct{ EvalID, Warnings string }
	json.NewDecoder(resp.Body).Decode(&reg)
	resp.Body.Close()
	if resp.StatusCode != 200 || reg.EvalID == "" || !strings.Contains(reg.Warnings, "admitted for gang scheduling") {
		t.Fatalf("register through the endpoint: %d %+v", resp.StatusCode, reg)
	}
	if got == nil || got.URL.Path != "/v1/job/viaproxy/plan" || got.Header.Get("X-Nomad-Token") != "secret-token" {
		t.Errorf("nomad was not asked to plan the gang with the caller's token: %v", got)
	}
	if h.job("viaproxy").Status != state.Reserved {
		t.Errorf("not admitted: %+v", h.job("viaproxy"))
	}
	// The namespace is taken as Nomad takes it: the query's (nomad job run
	// -namespace) before the job's own.
	body, _ = json.Marshal(map[string]any{"Job": gang("elsewhere", jobspec.DriverMicroVM, 1)})
	resp, err = http.Post(front.URL+"/v1/jobs?namespace=team", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if _, ok := h.srv.job("team/elsewhere"); !ok || got.URL.Query().Get("namespace") != "team" {
		t.Errorf("a registration with ?namespace=team: %d, planned in %q, jobs %v", resp.StatusCode, got.URL.Query().Get("namespace"), h.srv.jobKeys())
	}
	// A gang whose volume the caller may not mount is refused after
	// Nomad's plan, which does not check mounts.
	h.nomad.acl = map[string]fakeToken{"secret-token": {submit: map[string]bool{"default": true}}}
	h.srv.acl.mu.Lock()
	h.srv.acl.onUntil = time.Time{} // ask Nomad again whether its ACLs are on
	h.srv.acl.mu.Unlock()
	vol := gang("mounts", jobspec.DriverMicroVM, 1)
	vol.TaskGroups[0].Volumes = map[string]*nomadapi.VolumeRequest{"data": {Name: "data", Type: "host", Source: "data"}}
	body, _ = json.Marshal(map[string]any{"Job": vol})
	req, _ = http.NewRequest("PUT", front.URL+"/v1/jobs", bytes.NewReader(body))
	req.Header.Set("X-Nomad-Token", "secret-token")
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	refusal, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if _, ok := h.srv.job("mounts"); resp.StatusCode != 403 || !strings.Contains(string(refusal), `host_volume "data"`) || ok {
		t.Errorf("a gang mounting a volume the token may not: %d %s (admitted: %v)", resp.StatusCode, refusal, ok)
	}
	h.nomad.acl = map[string]fakeToken{"": {submit: map[string]bool{"default": true}}}

	// nomad job stop of it stops it in cohort.
	got = nil
	req, _ = http.NewRequest("DELETE", front.URL+"/v1/job/viaproxy", nil)
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if j := h.job("viaproxy"); resp.StatusCode != 200 || j.Status != state.Finished || j.Reason != "stopped by request" {
		t.Errorf("nomad job stop through the endpoint: %d %+v", resp.StatusCode, j)
	}
}

// handingOver is a leader in the middle of handing over: it still says it
// leads, and Raft refuses its commands.
type handingOver struct{ *replica.Replica }

func (handingOver) Apply(*state.Command, time.Duration) (state.Result, error) {
	return state.Result{}, fmt.Errorf("%w: leadership transfer in progress", replica.ErrNotLeader)
}

// A submission the leader's Raft refuses while it hands over is answered
// 503 with where the leader is, for the caller to retry; not an empty 200.
func TestSubmitDuringHandOverIsRetryable(t *testing.T) {
	h := newHarness(t)
	srv, err := New(handingOver{h.r}, h.nomad, Config{Prices: billing.DefaultPrices, Now: h.clock})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	job, _ := json.Marshal(api.SubmitRequest{Job: gang("g", jobspec.DriverMicroVM, 1)})
	rec := httptest.NewRecorder()
	srv.Handler().ServeHTTP(rec, httptest.NewRequest("POST", "/v1/jobs", strings.NewReader(string(job))))
	if rec.Code != http.StatusServiceUnavailable || !strings.Contains(rec.Body.String(), "not the leader") {
		t.Fatalf("a submission during a hand-over: %d %q", rec.Code, rec.Body)
	}
}
