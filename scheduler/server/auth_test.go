package server

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// testPKI is a CA with a server bundle and the leaf certificates callers
// present.
type testPKI struct {
	server              *tlsutil.Bundle
	serverLeaf, n1, cli *x509.Certificate
	foreignServer       *x509.Certificate
}

func newTestPKI(t *testing.T) *testPKI {
	t.Helper()
	issue := func(ca *tlsutil.CA, c tlsutil.Cert) *tlsutil.Bundle {
		b, err := ca.IssueBundle(t.TempDir(), "c", c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ca, _ := tlsutil.NewCA("test", time.Hour)
	other, _ := tlsutil.NewCA("other", time.Hour)
	p := &testPKI{server: issue(ca, tlsutil.ServerCert(nil))}
	p.serverLeaf = p.server.Leaf
	p.n1 = issue(ca, tlsutil.NodeCert("name-n1")).Leaf
	p.cli = issue(ca, tlsutil.CLICert()).Leaf
	p.foreignServer = issue(other, tlsutil.ServerCert(nil)).Leaf
	return p
}

// request is a request as the server sees it after a TLS handshake that
// verified leaf (none when nil), with a Nomad token when given.
func request(method, path, body string, leaf *x509.Certificate, token string) *http.Request {
	r := httptest.NewRequest(method, path, strings.NewReader(body))
	if leaf != nil {
		r.TLS = &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{leaf}}, PeerCertificates: []*x509.Certificate{leaf}}
	} else {
		r.TLS = &tls.ConnectionState{}
	}
	if token != "" {
		r.Header.Set(api.TokenHeader, token)
	}
	return r
}

func (h *harness) serve(req *http.Request) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.srv.Handler().ServeHTTP(rec, req)
	return rec
}

// TestServerCallsNeedAServerCertificate: joining and registering a member
// take a server certificate of the cluster's CA; without one (none, a
// node's, a CLI's) the call is refused with 403 and the group is as it
// was. A server's certificate gets through to the body checks.
func TestServerCallsNeedAServerCertificate(t *testing.T) {
	p := newTestPKI(t)
	h := newHarnessWith(t, func(c *Config) { c.TLS = p.server })
	bogus := `{"ID":"x","RaftAddr":"127.0.0.1:9","HTTPAddr":"127.0.0.1:9"}`
	for _, path := range []string{"/v1/members/join", "/v1/members/register"} {
		for name, leaf := range map[string]*x509.Certificate{"none": nil, "node": p.n1, "cli": p.cli} {
			before := h.snapshotState()
			rec := h.serve(request("POST", path, bogus, leaf, ""))
			if rec.Code != 403 || !strings.Contains(rec.Body.String(), "server.cohort") {
				t.Errorf("%s with %s certificate: %d %s", path, name, rec.Code, rec.Body)
			}
			if h.snapshotState() != before {
				t.Errorf("%s with %s certificate changed the state", path, name)
			}
		}
	}
	// A follower forwards with its own server certificate: the caller it
	// forwards for is what its headers say, and a forged role header from
	// the caller never survives the follower (see leaderOnly).
	fwd := request("POST", "/v1/members/join", bogus, p.serverLeaf, "")
	fwd.Header.Set(forwardedHeader, "s2")
	if rec := h.serve(fwd); rec.Code != 403 {
		t.Errorf("a join forwarded for a caller without a certificate: %d %s", rec.Code, rec.Body)
	}
	fwd = request("POST", "/v1/members/register", `{"ID":"s3","HTTPAddr":"http://evil:80"}`, p.serverLeaf, "")
	fwd.Header.Set(forwardedHeader, "s2")
	fwd.Header.Set(serverHeader, "1")
	if rec := h.serve(fwd); rec.Code != 400 || !strings.Contains(rec.Body.String(), "must be https://") {
		t.Errorf("a member registered at a plain http address: %d %s", rec.Code, rec.Body)
	}
	ms, _ := h.r.Members()
	if len(ms) != 1 {
		t.Errorf("members after refused joins: %+v", ms)
	}
	// A server certificate is let through to the body's checks.
	if rec := h.serve(request("POST", "/v1/members/register", `{"ID":""}`, p.serverLeaf, "")); rec.Code != 400 {
		t.Errorf("register with a server certificate and a bad body: %d %s", rec.Code, rec.Body)
	}
	if rec := h.serve(request("POST", "/v1/members/register", `{"ID":"s2","RaftAddr":"10.0.0.2:4748","HTTPAddr":"https://10.0.0.2:4747"}`, p.serverLeaf, "")); rec.Code != 200 {
		t.Errorf("register with a server certificate: %d %s", rec.Code, rec.Body)
	}
}

// TestTokensAreNomads: with Nomad's ACLs on, what a caller may do is what
// its token may do in Nomad; refusals are 403s naming the capability.
func TestTokensAreNomads(t *testing.T) {
	h := newHarness(t)
	h.nomad.acl = map[string]fakeToken{
		"submit": {submit: map[string]bool{"default": true}},
		"reader": {read: map[string]bool{"default": true}},
		"mgmt":   {management: true},
	}
	job, _ := json.Marshal(api.SubmitRequest{Job: gang("g", jobspec.DriverMicroVM, 1)})
	for _, c := range []struct {
		method, path, body, token string
		code                      int
		want                      string
	}{
		{"POST", "/v1/jobs", string(job), "", 403, "submit-job"},
		{"POST", "/v1/jobs", string(job), "reader", 403, "submit-job"},
		{"POST", "/v1/jobs", string(job), "submit", 200, `"ID":"g"`},
		{"GET", "/v1/job/g", "", "", 403, "read-job"},
		{"GET", "/v1/job/g", "", "reader", 200, `"ID":"g"`},
		{"GET", "/v1/job/g/bill", "", "", 403, "read-job"},
		{"GET", "/v1/jobs", "", "", 200, "[]"},
		{"GET", "/v1/jobs", "", "reader", 200, `"ID":"g"`},
		{"GET", "/v1/queue", "", "", 200, "[]"},
		{"GET", "/v1/nodes", "", "reader", 403, "node"},
		{"GET", "/v1/nodes", "", "mgmt", 200, "n1"},
		{"GET", "/v1/members", "", "submit", 403, "management"},
		{"GET", "/v1/members", "", "mgmt", 200, "s1"},
		{"DELETE", "/v1/job/g", "", "reader", 403, "submit-job"},
		{"DELETE", "/v1/job/nope", "", "", 403, "read-job"},
		{"DELETE", "/v1/job/nope", "", "reader", 404, "no such job"},
		{"DELETE", "/v1/network/lease/n1", "", "submit", 403, "management"},
		{"GET", "/v1/operator/snapshot", "", "reader", 403, "management"},
		{"PUT", "/v1/operator/snapshot", "cohort-snapshot 1\n", "submit", 403, "management"},
		{"DELETE", "/v1/members/s1", "", "submit", 403, "management"},
		{"GET", "/v1/operator/snapshot", "", "mgmt", 200, "cohort-snapshot 1"},
		{"GET", "/v1/health", "", "", 200, "ok"},
		{"DELETE", "/v1/job/g", "", "submit", 200, `"ID":"g"`},
	} {
		rec := h.serve(request(c.method, c.path, c.body, nil, c.token))
		if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.want) {
			t.Errorf("%s %s with token %q: %d %s, want %d with %q", c.method, c.path, c.token, rec.Code, rec.Body.String(), c.code, c.want)
		}
	}
	// Volume mounts, which Nomad's plan does not check, are judged on
	// the caller's token too, on submission only.
	withVolume := func(id string) string {
		j := gang(id, jobspec.DriverMicroVM, 1)
		j.TaskGroups[0].Volumes = map[string]*nomadapi.VolumeRequest{"data": {Name: "data", Type: "host", Source: "data", ReadOnly: true}}
		b, _ := json.Marshal(api.SubmitRequest{Job: j})
		return string(b)
	}
	h.nomad.acl["mounter"] = fakeToken{submit: map[string]bool{"default": true}, mount: map[string]bool{"data": true}}
	for _, c := range []struct {
		token string
		code  int
		want  string
	}{{"submit", 403, `host_volume \"data\"`}, {"mounter", 200, `"ID":"vol-mounter"`}} {
		rec := h.serve(request("POST", "/v1/jobs", withVolume("vol-"+c.token), nil, c.token))
		if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.want) {
			t.Errorf("a gang mounting a host volume, token %q: %d %s, want %d with %s", c.token, rec.Code, rec.Body, c.code, c.want)
		}
	}
	if _, ok := h.srv.job("vol-submit"); ok {
		t.Error("a gang refused its mount was admitted")
	}

	// Verdicts are cached: asking again does not ask Nomad again.
	before := h.nomad.count("acl ")
	for i := 0; i < 5; i++ {
		h.serve(request("GET", "/v1/job/g", "", nil, "reader"))
	}
	if n := h.nomad.count("acl ") - before; n != 0 {
		t.Errorf("nomad asked %d more times about a cached token", n)
	}
}

// TestBarrierReportsAreAuthentic: with TLS, a boot report needs the node's
// certificate or the job's barrier token; a token opens its own job's
// barrier only; a node reports only the allocations Nomad placed on it;
// an allocation that is not the gang's is aborted, without TLS too.
func TestBarrierReportsAreAuthentic(t *testing.T) {
	p := newTestPKI(t)
	h := newHarnessWith(t, func(c *Config) { c.TLS = p.server }, node("n1", 4000, 4096), node("n2", 4000, 4096))
	job := gang("rx", jobspec.DriverRawExec, 2)
	job.TaskGroups[0].Constraints = append(job.TaskGroups[0].Constraints, nomadapi.NewConstraint("${node.unique.id}", "=", "n1"))
	key := h.submit(job).Key()
	h.pass()
	live := h.nomad.live(key)
	if len(live) != 2 {
		t.Fatalf("%d live allocations", len(live))
	}
	// The barrier task of the job as registered carries the CA, fetches
	// its program over plain HTTP, and reads the token from its own Nomad
	// variable, written before the job was registered: the job itself,
	// which read-job holders read, does not hold it.
	reg := h.nomad.latest(key)
	var source string
	for _, tk := range reg.TaskGroups[0].Tasks {
		if tk.Name == jobspec.BarrierTaskName {
			source = *tk.Artifacts[0].GetterSource
			if !strings.Contains(tk.Env[jobspec.EnvCAPEM], "BEGIN CERTIFICATE") {
				t.Errorf("barrier task env without the CA: %v", tk.Env)
			}
			if tok, ok := tk.Env[jobspec.EnvBarrierToken]; ok {
				t.Errorf("the barrier token %q is in the job's environment", tok)
			}
			if len(tk.Templates) != 1 || !strings.Contains(*tk.Templates[0].EmbeddedTmpl, `nomadVar "nomad/jobs/rx"`) || !*tk.Templates[0].Envvars {
				t.Errorf("barrier task templates: %+v", tk.Templates)
			}
		}
	}
	token := h.nomad.variable(deref(reg.Namespace), "nomad/jobs/rx")[jobspec.BarrierTokenItem]
	if put, reg := callIndex(h.nomad, "put barrier token"), callIndex(h.nomad, "register"); put < 0 || put > reg {
		t.Errorf("the token's variable written at call %d, the job registered at call %d: %v", put, reg, h.nomad.calls)
	}
	if token == "" || !strings.HasPrefix(source, "http://") {
		t.Fatalf("barrier task: token %q, source %q", token, source)
	}
	body := func(alloc, tok string) string {
		b, _ := json.Marshal(api.BarrierRequest{Alloc: alloc, Instance: "i", Token: tok})
		return string(b)
	}
	other := barrierToken(func() []byte {
		var s []byte
		h.r.Read(func(st *state.State) { s = st.Secret })
		return s
	}(), "default/other", 1)
	for _, c := range []struct {
		name    string
		body    string
		leaf    *x509.Certificate
		code    int
		want    string
		records bool
	}{
		{"no credentials", body(live[0].ID, ""), nil, 403, "certificate", false},
		{"a CLI certificate", body(live[0].ID, ""), p.cli, 403, "certificate", false},
		{"another job's token", body(live[0].ID, other), nil, 403, "barrier token", false},
		{"the job's token, not its allocation", body("00000000-0000-4000-8000-000000000999", token), nil, 200, "not a worker", false},
		{"the job's token", body(live[0].ID, token), nil, 200, `"wait"`, true},
		{"the node's certificate", body(live[1].ID, ""), p.n1, 200, `"wait"`, true},
	} {
		before := h.snapshotState()
		rec := h.serve(request("POST", "/v1/barrier/rx", c.body, c.leaf, ""))
		if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.want) {
			t.Errorf("%s: %d %s", c.name, rec.Code, rec.Body)
		}
		if changed := h.snapshotState() != before; changed != c.records {
			t.Errorf("%s: state changed %t, want %t", c.name, changed, c.records)
		}
	}
	// A node reports only what runs on it.
	h2 := newHarnessWith(t, func(c *Config) { c.TLS = p.server }, node("n2", 4000, 4096))
	k2 := h2.submit(gang("elsewhere", jobspec.DriverMicroVM, 1)).Key()
	h2.pass()
	a := h2.nomad.live(k2)[0]
	rec := h2.serve(request("POST", "/v1/barrier/elsewhere", body(a.ID, ""), p.n1, ""))
	if !strings.Contains(rec.Body.String(), "runs on node name-n2, not on name-n1") {
		t.Errorf("a node reporting another node's allocation: %d %s", rec.Code, rec.Body)
	}
}

// callIndex is the index of the first call the fake recorded that starts
// with prefix; -1 if none did.
func callIndex(f *fakeNomad, prefix string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, c := range f.calls {
		if strings.HasPrefix(c, prefix) {
			return i
		}
	}
	return -1
}

// A job whose ID cannot name a Nomad variable (a dot) carries its barrier
// token in its environment, and still passes its barrier; a gang placed
// unevenly, whose group Pin splits into one-worker groups ("a[0]"), reads
// it from the job's variable like any other; the token leaves the
// variable, and the job's own items stay, once the run ends.
func TestBarrierTokenDelivery(t *testing.T) {
	p := newTestPKI(t)
	h := newHarnessWith(t, func(c *Config) { c.TLS = p.server }, node("n1", 4000, 4096), node("n2", 4000, 4096))
	dotted := h.submit(gang("my.job", jobspec.DriverRawExec, 1)).Key()
	// 5 workers of 1000 MHz: 4 fit a node, so no node holds them all and
	// two cannot hold them evenly.
	uneven := gang("uneven", jobspec.DriverRawExec, 5)
	uneven.TaskGroups[0].Tasks[len(uneven.TaskGroups[0].Tasks)-1].Resources.CPU = ptrTo(1000)
	h.nomad.set2(func() {
		h.nomad.vars = map[string]map[string]string{deref(uneven.Namespace) + " nomad/jobs/uneven": {"theirs": "kept"}}
	})
	unevenKey := h.submit(uneven).Key()
	h.pass()
	var envToken string
	for _, tk := range h.nomad.latest(dotted).TaskGroups[0].Tasks {
		if tk.Name == jobspec.BarrierTaskName {
			envToken = tk.Env[jobspec.EnvBarrierToken]
			if len(tk.Templates) != 0 {
				t.Errorf("a template for a path Nomad refuses: %+v", tk.Templates)
			}
		}
	}
	a := h.nomad.live(dotted)[0]
	b, _ := json.Marshal(api.BarrierRequest{Alloc: a.ID, Instance: "i", Token: envToken})
	if rec := h.serve(request("POST", "/v1/barrier/my.job", string(b), nil, "")); rec.Code != 200 || !strings.Contains(rec.Body.String(), `"wait"`) {
		t.Errorf("the dotted job's report with its environment's token: %d %s", rec.Code, rec.Body)
	}

	reg := h.nomad.latest(unevenKey)
	if len(reg.TaskGroups) < 2 {
		t.Fatalf("the uneven gang was not split: %d groups", len(reg.TaskGroups))
	}
	for _, tg := range reg.TaskGroups {
		for _, tk := range tg.Tasks {
			if tk.Name == jobspec.BarrierTaskName && (tk.Env[jobspec.EnvBarrierToken] != "" || len(tk.Templates) != 1 || !strings.Contains(*tk.Templates[0].EmbeddedTmpl, `nomadVar "nomad/jobs/uneven"`)) {
				t.Errorf("group %s: barrier task env %v, templates %+v", *tg.Name, tk.Env, tk.Templates)
			}
		}
	}
	ns := deref(reg.Namespace)
	token := h.nomad.variable(ns, "nomad/jobs/uneven")[jobspec.BarrierTokenItem]
	ua := h.nomad.live(unevenKey)[0]
	b, _ = json.Marshal(api.BarrierRequest{Alloc: ua.ID, Instance: "i", Token: token})
	if rec := h.serve(request("POST", "/v1/barrier/uneven", string(b), nil, "")); rec.Code != 200 || !strings.Contains(rec.Body.String(), `"wait"`) {
		t.Errorf("a split group's report with the variable's token: %d %s", rec.Code, rec.Body)
	}
	if _, err := h.srv.Stop(unevenKey); err != nil {
		t.Fatal(err)
	}
	if v := h.nomad.variable(ns, "nomad/jobs/uneven"); v[jobspec.BarrierTokenItem] != "" || v["theirs"] != "kept" {
		t.Errorf("the job's variable after its run ended: %v", v)
	}
}

// TestLeasesAreTheNodes: with TLS, a node leases under its own name only.
func TestLeasesAreTheNodes(t *testing.T) {
	p := newTestPKI(t)
	h := newHarnessWith(t, func(c *Config) { c.TLS = p.server })
	lease := func(node string) string { return `{"Node":"` + node + `","Address":"192.168.50.11"}` }
	if rec := h.serve(request("POST", "/v1/network/lease", lease("name-n1"), nil, "")); rec.Code != 403 {
		t.Errorf("lease without a certificate: %d %s", rec.Code, rec.Body)
	}
	if rec := h.serve(request("POST", "/v1/network/lease", lease("name-n2"), p.n1, "")); rec.Code != 403 || !strings.Contains(rec.Body.String(), "not name-n2's") {
		t.Errorf("lease for another node: %d %s", rec.Code, rec.Body)
	}
	if rec := h.serve(request("POST", "/v1/network/lease", lease("name-n1"), p.n1, "")); rec.Code != 200 {
		t.Errorf("lease with the node's certificate: %d %s", rec.Code, rec.Body)
	}
	if rec := h.serve(request("GET", "/v1/network/leases", "", p.n1, "")); rec.Code != 200 || !strings.Contains(rec.Body.String(), "name-n1") {
		t.Errorf("the table for a node: %d %s", rec.Code, rec.Body)
	}
	if rec := h.serve(request("DELETE", "/v1/network/lease/name-n1", "", p.n1, "")); rec.Code != 200 {
		t.Errorf("a node giving its lease up: %d %s", rec.Code, rec.Body)
	}
}

// Once the group writes its log in the binary encoding, a server that
// reads only JSON is refused before it is added: it would skip every
// entry it cannot read and fall silently behind.
func TestJoinRefusesAServerThatReadsOnlyJSON(t *testing.T) {
	p := newTestPKI(t)
	h := newHarnessWith(t, func(c *Config) { c.TLS = p.server })
	if err := h.srv.registerSelf(); err != nil {
		t.Fatal(err)
	}
	if c := h.r.LogCodec(); c != state.CodecNewest {
		t.Fatalf("a group of one new server writes codec %d", c)
	}
	before := h.snapshotState()
	rec := h.serve(request("POST", "/v1/members/join", `{"ID":"old","RaftAddr":"127.0.0.1:9","HTTPAddr":"https://127.0.0.1:9"}`, p.serverLeaf, ""))
	if rec.Code != 400 || !strings.Contains(rec.Body.String(), "reads only the JSON log") {
		t.Fatalf("an old server's join: %d %s", rec.Code, rec.Body)
	}
	if h.snapshotState() != before {
		t.Error("the refused join changed the state")
	}
	if ms, _ := h.r.Members(); len(ms) != 1 {
		t.Errorf("members after the refused join: %+v", ms)
	}
	// Nor may a member's record say it reads only JSON: that would take
	// the group back to JSON with such a server already following.
	rec = h.serve(request("POST", "/v1/members/register", `{"ID":"s1","RaftAddr":"127.0.0.1:9","HTTPAddr":"https://127.0.0.1:9"}`, p.serverLeaf, ""))
	if rec.Code != 400 || !strings.Contains(rec.Body.String(), "reads only the JSON log") || h.snapshotState() != before {
		t.Fatalf("an old server's registration: %d %s", rec.Code, rec.Body)
	}
	// Nor one that reads an older binary version than the group writes.
	rec = h.serve(request("POST", "/v1/members/join", `{"ID":"v1","RaftAddr":"127.0.0.1:9","HTTPAddr":"https://127.0.0.1:9","Codec":1}`, p.serverLeaf, ""))
	if rec.Code != 400 || !strings.Contains(rec.Body.String(), "reads the binary log up to version 1") || h.snapshotState() != before {
		t.Fatalf("a server reading binary version 1 only: %d %s", rec.Code, rec.Body)
	}
	rec = h.serve(request("POST", "/v1/members/register", fmt.Sprintf(`{"ID":"s1","RaftAddr":"127.0.0.1:9","HTTPAddr":"https://127.0.0.1:9","Codec":%d}`, state.CodecNewest), p.serverLeaf, ""))
	if rec.Code != 200 {
		t.Fatalf("a new server's registration: %d %s", rec.Code, rec.Body)
	}
}

// TestOnlySignedMountsAreRegistered: cohort registers gangs with its own
// token, which may mount any volume, so it registers mounts only with
// admission's signature (made after the caller's mounts were checked). A
// gang stored by a server from before that check carries none and is not
// registered; one carrying another job's signature neither.
func TestOnlySignedMountsAreRegistered(t *testing.T) {
	h := newHarness(t)
	h.nomad.acl = map[string]fakeToken{"mgmt": {management: true}}
	withVolume := func(id string) *nomadapi.Job {
		j := gang(id, jobspec.DriverMicroVM, 1)
		j.TaskGroups[0].Volumes = map[string]*nomadapi.VolumeRequest{"data": {Name: "data", Type: "host", Source: "data", ReadOnly: true}}
		return j
	}
	signed := h.submit(withVolume("signed"))
	h.pass()
	if j := h.job("signed"); j.NomadIndex == 0 {
		t.Fatalf("an admitted gang with a volume was not registered: %+v", j)
	}
	var stored nomadapi.Job
	json.Unmarshal(signed.Nomad, &stored)
	mark := stored.Meta[jobspec.MetaMounts]
	if mark == "" {
		t.Fatalf("admission did not sign the gang's mounts: %v", stored.Meta)
	}

	// Stored as a server before the check stored it: without a mark, or
	// with the mark of the gang above.
	for id, meta := range map[string]string{"unsigned": "", "borrowed": mark} {
		nj, _, err := h.srv.Normalize(withVolume(id))
		if err != nil {
			t.Fatal(err)
		}
		if meta != "" {
			nj.Meta[jobspec.MetaMounts] = meta
		}
		g, err := jobspec.GangFromNomad(nj)
		if err != nil {
			t.Fatal(err)
		}
		raw, _ := json.Marshal(nj)
		if _, err := h.srv.apply(&state.Command{Op: state.OpSubmit, At: h.clock(), Job: gangSpec(nj, g), Nomad: raw}); err != nil {
			t.Fatal(err)
		}
	}
	h.runAll("signed")
	h.pass()
	h.pass()
	for _, id := range []string{"unsigned", "borrowed"} {
		if n := h.nomad.count("register default/" + id); n != 0 {
			t.Errorf("%s: registered %d times", id, n)
		}
		// Failed at once: the verdict is cohort's own, the same at every
		// attempt.
		if j := h.job(id); j.Status != state.Failed || j.NomadIndex != 0 || j.Attempts != 1 || !strings.Contains(j.Reason, "volume mounts were never checked") {
			t.Errorf("%s: %s (attempts %d), want it failed for its unchecked mounts", id, j, j.Attempts)
		}
	}

	// A gang registered with Nomad directly had its mounts checked by
	// Nomad, against whoever registered it: adopted, it is signed, so a
	// later attempt registers it.
	h.nomad.adopt(withVolume("direct"))
	h.pass()
	h.runAll("direct")
	h.bootAll("direct")
	h.pass()
	j := h.job("direct")
	var adopted nomadapi.Job
	json.Unmarshal(j.Nomad, &adopted)
	if !j.Adopted || !h.srv.signedMounts(&adopted, j.Key()) {
		t.Errorf("an adopted gang with a volume: %s, its mounts signed: %v", j, h.srv.signedMounts(&adopted, j.Key()))
	}

	// With Nomad's ACLs off no caller's mounts are checked, and none are
	// signed: a caller's own mark is dropped.
	off := newHarness(t)
	forged := withVolume("forged")
	forged.Meta[jobspec.MetaMounts] = mark
	var kept nomadapi.Job
	json.Unmarshal(off.submit(forged).Nomad, &kept)
	if m, ok := kept.Meta[jobspec.MetaMounts]; ok {
		t.Errorf("a gang admitted with ACLs off carries a mark %q", m)
	}
}
