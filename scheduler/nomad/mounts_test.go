package nomad

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/nomad/acl"
	"github.com/hashicorp/nomad/api"
)

// mountJob is a job whose group "w" has the volumes given, and a task
// mounting the first of them with propagation (if any).
func mountJob(propagation string, vols ...*api.VolumeRequest) *api.Job {
	tg := &api.TaskGroup{Name: ptr("w"), Volumes: map[string]*api.VolumeRequest{}}
	task := &api.Task{Name: "worker"}
	for _, v := range vols {
		tg.Volumes[v.Name] = v
	}
	if propagation != "" && len(vols) > 0 {
		task.VolumeMounts = []*api.VolumeMount{{Volume: ptr(vols[0].Name), PropagationMode: ptr(propagation)}}
	}
	tg.Tasks = []*api.Task{task}
	return &api.Job{ID: ptr("j"), Namespace: ptr("default"), TaskGroups: []*api.TaskGroup{tg}}
}

func hostVol(name string, readOnly bool) *api.VolumeRequest {
	return &api.VolumeRequest{Name: name, Type: "host", Source: name, ReadOnly: readOnly}
}

func mustACL(t *testing.T, rules ...string) *acl.ACL {
	t.Helper()
	var ps []*acl.Policy
	for _, r := range rules {
		p, err := acl.Parse(r)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p)
	}
	a, err := acl.NewACL(false, ps)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestMountsAllowed: the checks Nomad makes at registration, on policies
// parsed by Nomad's own ACL package.
func TestMountsAllowed(t *testing.T) {
	submit := `namespace "default" { capabilities = ["submit-job"] }`
	readData := `host_volume "data" { policy = "read" }`
	writeData := `host_volume "data*" { policy = "write" }`
	csi := `namespace "default" { capabilities = ["csi-mount-volume"] }
plugin { policy = "read" }`
	plugin := `namespace "default" { capabilities = ["csi-register-plugin"] }`
	pluginJob := mountJob("")
	pluginJob.TaskGroups[0].Tasks[0].CSIPluginConfig = &api.TaskCSIPluginConfig{ID: "p", Type: "node"}
	for _, c := range []struct {
		name  string
		job   *api.Job
		rules []string
		deny  string // what the refusal says; "" allows
	}{
		{"no volumes", mountJob(""), []string{submit}, ""},
		{"read-only mount, read grant", mountJob("", hostVol("data", true)), []string{submit, readData}, ""},
		{"read-only mount, write grant", mountJob("", hostVol("data", true)), []string{writeData}, ""},
		{"read-write mount, read grant", mountJob("", hostVol("data", false)), []string{readData}, `host_volume "data" with mount-readwrite`},
		{"read-write mount, glob write grant", mountJob("", hostVol("data", false)), []string{writeData}, ""},
		{"no grant", mountJob("", hostVol("data", true)), []string{submit}, `group w mounts host volume "data" read-only`},
		{"another volume", mountJob("", hostVol("logs", true)), []string{readData}, `host_volume "logs"`},
		{"deny wins", mountJob("", hostVol("data", true)), []string{readData, `host_volume "data" { policy = "deny" }`}, `host_volume "data"`},
		{"bidirectional needs write", mountJob("bidirectional", hostVol("data", true)), []string{readData}, "bidirectional propagation in task worker"},
		{"private propagation", mountJob("private", hostVol("data", true)), []string{readData}, ""},
		{"csi", mountJob("", &api.VolumeRequest{Name: "v", Type: "csi", Source: "vol1"}), []string{csi}, ""},
		{"csi without plugin read", mountJob("", &api.VolumeRequest{Name: "v", Type: "csi", Source: "vol1"}), []string{`namespace "default" { capabilities = ["csi-mount-volume"] }`}, "csi-mount-volume"},
		{"csi plugin task", pluginJob, []string{plugin}, ""},
		{"csi plugin task refused", pluginJob, []string{submit}, "csi-register-plugin"},
		// Nomad's HTTP API drops a volume of a type it does not know: it
		// mounts nothing, and Nomad checks nothing of it.
		{"unknown type", mountJob("bidirectional", &api.VolumeRequest{Name: "v", Type: "nfs", Source: "x"}), []string{submit}, ""},
	} {
		err := mountsAllowed(mustACL(t, c.rules...), "default", mountNeeds(c.job))
		switch {
		case c.deny == "" && err != nil:
			t.Errorf("%s: refused: %v", c.name, err)
		case c.deny != "" && (!errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), c.deny)):
			t.Errorf("%s: got %v, want a refusal saying %q", c.name, err, c.deny)
		}
	}
}

// fakeACLNomad serves Nomad's token, role and policy reads as Nomad
// does for a non-management token: only what the token holds, and the
// anonymous policy to anyone. A policy named "broken" fails as Nomad
// failing.
func fakeACLNomad(t *testing.T, tokens map[string]*api.ACLToken, roles map[string]*api.ACLRole, policies map[string]string) *Client {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		secret := r.Header.Get("X-Nomad-Token")
		tok := tokens[secret]
		if secret == "" {
			tok = &api.ACLToken{Policies: []string{"anonymous"}}
		}
		if tok == nil {
			http.Error(w, "ACL token not found", http.StatusNotFound)
			return
		}
		holds := map[string]bool{}
		for _, p := range tok.Policies {
			holds[p] = true
		}
		held := map[string]bool{}
		for _, l := range tok.Roles {
			held[l.ID] = true
			if role := roles[l.ID]; role != nil {
				for _, p := range role.Policies {
					holds[p.Name] = true
				}
			}
		}
		switch {
		case r.URL.Path == "/v1/acl/token/self" && secret != "":
			json.NewEncoder(w).Encode(tok)
		case strings.HasPrefix(r.URL.Path, "/v1/acl/role/"):
			id := strings.TrimPrefix(r.URL.Path, "/v1/acl/role/")
			switch {
			case !held[id]:
				http.Error(w, "Permission denied", http.StatusForbidden)
			case roles[id] == nil:
				http.Error(w, "ACL role not found", http.StatusNotFound)
			default:
				json.NewEncoder(w).Encode(roles[id])
			}
		case strings.HasPrefix(r.URL.Path, "/v1/acl/policy/"):
			name := strings.TrimPrefix(r.URL.Path, "/v1/acl/policy/")
			rules, ok := policies[name]
			switch {
			case !holds[name]:
				http.Error(w, "Permission denied", http.StatusForbidden)
			case name == "broken":
				http.Error(w, "rpc error: no leader", http.StatusInternalServerError)
			case !ok:
				http.Error(w, "ACL policy not found", http.StatusNotFound)
			default:
				json.NewEncoder(w).Encode(api.ACLPolicy{Name: name, Rules: rules})
			}
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	c, err := New(Config{Address: srv.URL, Token: "cohort's own"})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestCanMount reads the caller's policies with the caller's token, its
// roles' included, and judges the job's mounts by them.
func TestCanMount(t *testing.T) {
	past := time.Now().Add(-time.Minute)
	tokens := map[string]*api.ACLToken{
		"direct": {Type: "client", Policies: []string{"submit", "data", "gone"}},
		"by-role": {Type: "client", Policies: []string{"submit"},
			Roles: []*api.ACLTokenRoleLink{{ID: "r1", Name: "mounters"}, {ID: "r-gone", Name: "deleted since"}}},
		"plain":        {Type: "client", Policies: []string{"submit"}},
		"admin":        {Type: "management"},
		"expired":      {Type: "client", Policies: []string{"data"}, ExpirationTime: &past},
		"admin-before": {Type: "management", ExpirationTime: &past},
		"broken":       {Type: "client", Policies: []string{"broken"}},
	}
	roles := map[string]*api.ACLRole{"r1": {ID: "r1", Name: "mounters", Policies: []*api.ACLRolePolicyLink{{Name: "data"}}}}
	policies := map[string]string{
		"submit": `namespace "default" { capabilities = ["submit-job"] }`,
		"data":   `host_volume "data" { policy = "read" }`,
	}
	c := fakeACLNomad(t, tokens, roles, policies)
	ro := mountJob("", hostVol("data", true))
	for token, want := range map[string]string{
		"direct": "", "by-role": "", "admin": "",
		"plain":        `host_volume "data"`,
		"unknown":      "nomad knows no ACL token",
		"expired":      "expired",
		"admin-before": "expired",
		"":             `host_volume "data"`, // no anonymous policy: nothing allowed
	} {
		err := c.CanMount(token, ro)
		switch {
		case want == "" && err != nil:
			t.Errorf("token %q: refused: %v", token, err)
		case want != "" && (!errors.Is(err, ErrDenied) || !strings.Contains(err.Error(), want)):
			t.Errorf("token %q: got %v, want a refusal saying %q", token, err, want)
		}
	}
	if err := c.CanMount("direct", mountJob("", hostVol("data", false))); !errors.Is(err, ErrDenied) {
		t.Errorf("a read-write mount with a read grant: %v", err)
	}
	// Nomad failing is not a refusal: the caller gets a 502, not a 403.
	if err := c.CanMount("broken", ro); err == nil || errors.Is(err, ErrDenied) {
		t.Errorf("a policy Nomad failed to read: %v, want an error that is not a refusal", err)
	}
	// No volumes: Nomad is not asked, so even no token passes.
	if err := c.CanMount("", mountJob("")); err != nil {
		t.Errorf("a job without volumes: %v", err)
	}
	// No token is judged by the anonymous policy, as Nomad judges it.
	policies["anonymous"] = `host_volume "data" { policy = "read" }`
	if err := c.CanMount("", ro); err != nil {
		t.Errorf("no token, with an anonymous policy that grants the mount: %v", err)
	}
}
