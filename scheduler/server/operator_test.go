package server

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/snapshot"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// A saved state comes back whole: jobs stopped or submitted after the save
// are as they were at the save, and the scheduler goes on from there.
func TestSnapshotSaveRestore(t *testing.T) {
	h := newHarness(t, node("n1", 4000, 8192))
	h.submit(gang("a", jobspec.DriverMicroVM, 1))
	h.submit(gang("b", jobspec.DriverMicroVM, 2))
	rec := h.do("GET", "/v1/operator/snapshot", "")
	if rec.Code != 200 {
		t.Fatalf("save: %d %s", rec.Code, rec.Body)
	}
	saved := rec.Body.Bytes()
	hdr, st, err := snapshot.Read(bytes.NewReader(saved))
	if err != nil {
		t.Fatalf("the saved file does not read back: %v", err)
	}
	if hdr.Jobs != 2 || hdr.Server != "s1" || hdr.Index == 0 {
		t.Errorf("header %+v: want 2 jobs from s1 at an index", hdr)
	}
	if got := h.snapshotState(); got != string(st) {
		t.Fatalf("the snapshot is not the state:\n%s\n%s", st, got)
	}

	if rec := h.do("DELETE", "/v1/job/a", ""); rec.Code != 200 {
		t.Fatalf("stop a: %d %s", rec.Code, rec.Body)
	}
	h.submit(gang("c", jobspec.DriverMicroVM, 1))

	// A damaged file changes nothing.
	before := h.snapshotState()
	damaged := bytes.Replace(saved, []byte(`"a"`), []byte(`"x"`), 1)
	for name, body := range map[string][]byte{"damaged": damaged, "truncated": saved[:len(saved)/2], "not one": []byte("{}")} {
		if rec := h.do("PUT", "/v1/operator/snapshot", string(body)); rec.Code != 400 {
			t.Errorf("%s snapshot: %d %s, want 400", name, rec.Code, rec.Body)
		}
	}
	if h.snapshotState() != before {
		t.Fatal("a refused restore changed the state")
	}

	rec = h.do("PUT", "/v1/operator/snapshot", string(saved))
	if rec.Code != 200 {
		t.Fatalf("restore: %d %s", rec.Code, rec.Body)
	}
	var back snapshot.Header
	if err := json.Unmarshal(rec.Body.Bytes(), &back); err != nil || back.SHA256 != hdr.SHA256 {
		t.Errorf("restore answered %s (%v)", rec.Body, err)
	}
	// The jobs are the saved ones; the leader's own address is recorded
	// again, for followers to forward to, whatever the snapshot held.
	var got, want map[string]json.RawMessage
	json.Unmarshal([]byte(h.snapshotState()), &got)
	json.Unmarshal(st, &want)
	if string(got["Jobs"]) != string(want["Jobs"]) || string(got["NextSeq"]) != string(want["NextSeq"]) {
		t.Fatalf("after the restore the jobs are\n%s\nnot the saved\n%s", got["Jobs"], want["Jobs"])
	}
	if !strings.Contains(string(got["Members"]), `"s1"`) {
		t.Errorf("the leader's address is not recorded after the restore: %s", got["Members"])
	}
	if j := h.job("a"); j.Status == state.Finished || j.Status == state.Failed {
		t.Errorf("a is %s after the restore, as before the save it was not", j.Status)
	}
	if rec := h.do("GET", "/v1/job/c", ""); rec.Code != 404 {
		t.Errorf("c, submitted after the save, is still known: %d", rec.Code)
	}
	// The next pass reconciles the restored state with Nomad, which
	// stays the truth of what runs: c, which Nomad still runs, is
	// adopted; a, which Nomad no longer has, ends.
	h.pass()
	if j := h.job("c"); j.Status != state.Reserved && j.Status != state.Running {
		t.Errorf("c after a pass: %s, want adopted", j.Status)
	}
	if j := h.job("a"); j.Status != state.Finished && j.Status != state.Failed {
		t.Errorf("a after a pass: %s, want ended", j.Status)
	}
}

func TestRemoveMemberRefusals(t *testing.T) {
	h := newHarness(t)
	for _, c := range []struct {
		path string
		code int
		want string
	}{
		{"/v1/members/nope", 404, "no server"},
		{"/v1/members/s1", 400, "only server"},
	} {
		if rec := h.do("DELETE", c.path, ""); rec.Code != c.code || !strings.Contains(rec.Body.String(), c.want) {
			t.Errorf("DELETE %s: %d %s, want %d with %q", c.path, rec.Code, rec.Body, c.code, c.want)
		}
	}
}
