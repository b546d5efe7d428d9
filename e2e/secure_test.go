package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/cohort-dev/cohort/jobspec"
	nomadapi "github.com/hashicorp/nomad/api"
)

// secureGang is a microvm gang of two workers on one node that print
// their rank and exit.
func secureGang(name string) string {
	return fmt.Sprintf(`job %q {
  max_runtime  = "3m"
  gang_timeout = "90s"
  group "w" {
    count = 2
    resources {
      cpu    = 100
      memory = 128
    }
    program {
      path = %q
      args = ["env"]
    }
  }
}
`, name, workerBin)
}

// nomadToken makes an ACL policy from rules and a client token holding it.
func nomadToken(t *testing.T, c *devcluster.Cluster, name, rules string) string {
	t.Helper()
	tok, err := c.NomadPolicyToken(name, rules)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// TestSecureCluster: Nomad with TLS and ACLs bootstrapped, cohort's server
// with TLS and its own Nomad token (of the policy the install guide gives
// it), the microvm driver with its node's
// certificate. A token with submit-job on "default" runs a gang with
// `cohort run` and with `nomad job run` through the Nomad-compatible
// endpoint, and reads its logs with `nomad alloc logs` there; an
// anonymous caller and a read-only token are refused with 403 and a
// sentence naming the missing capability.
func TestSecureCluster(t *testing.T) {
	opts := clusterOpts{microvm: true, nomadSecure: true, servers: []int{freePort(t)}, hostVolumes: []string{"data"}}
	nomadListen := freeAddr(t)
	c := startCluster(t, opts)
	secure(t, c, "")
	api := cohortServerAt(t, c, opts.servers[0], "-nomad-listen", nomadListen)
	endpoint := "https://" + nomadListen

	// The server holds a client token of the install guide's policy
	// (deploy/nomad/cohort-server.policy.hcl), not the management token:
	// all this test runs is done with it, and Nomad refuses it the rest.
	nomadBin, _ := devcluster.FindBinary("nomad")
	asServer := exec.Command(nomadBin, "acl", "token", "list")
	asServer.Env = append(append(os.Environ(), c.NomadEnv()...), "NOMAD_TOKEN="+c.ServerNomadToken())
	if out, err := asServer.CombinedOutput(); err == nil || !strings.Contains(string(out), "403") {
		t.Errorf("nomad acl token list with cohort's server token: %v\n%s", err, out)
	}
	// The event stream the servers' inventory follows is allowed to it: a
	// refusal would leave them on whole reads of the lists, with nothing
	// failing but a warning in their log.
	nc, err := nomadapi.NewClient(&nomadapi.Config{Address: c.NomadAddr(), SecretID: c.ServerNomadToken(), TLSConfig: &nomadapi.TLSConfig{CACert: c.TLS().CA}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	events, err := nc.EventStream().Stream(ctx, map[nomadapi.Topic][]string{nomadapi.TopicNode: {"*"}, nomadapi.TopicAllocation: {"*"}}, 0, &nomadapi.QueryOptions{Namespace: "*"})
	if err == nil {
		select {
		case ev := <-events:
			if ev != nil {
				err = ev.Err
			}
		case <-ctx.Done():
		}
	}
	cancel()
	if err != nil {
		t.Errorf("the event stream with cohort's server token: %v", err)
	}

	submit := nomadToken(t, c, "submit", `
namespace "default" {
  capabilities = ["submit-job", "read-job", "list-jobs", "read-logs"]
}
node_pool "default" {
  policy = "read"
}`)
	reader := nomadToken(t, c, "reader", `
namespace "default" {
  policy = "read"
}`)
	dir := t.TempDir()
	spec := filepath.Join(dir, "gang.hcl")
	writeFile(t, spec, secureGang("secure"))
	cohortAs := func(token string, args ...string) (string, error) {
		sec.token = token
		defer func() { sec.token = "" }()
		out, err := cohortCmd(args...).CombinedOutput()
		return string(out), err
	}

	// Refused: no token, and a token that may only read.
	for name, tok := range map[string]string{"anonymous": "", "read-only": reader} {
		out, err := cohortAs(tok, "run", "-detach", "-address", api, spec)
		if err == nil || !strings.Contains(out, "403") && !strings.Contains(out, "submit-job") {
			t.Errorf("cohort run with the %s token: %v\n%s", name, err, out)
		}
		t.Logf("cohort run, %s: %s", name, strings.TrimSpace(out))
	}
	if out, err := cohortAs("", "status", "-address", api, "secure"); err == nil || !strings.Contains(out, "read-job") {
		t.Errorf("cohort status without a token: %v\n%s", err, out)
	}

	// Membership takes a management token.
	if out, err := cohortAs(submit, "server", "members", "-address", api); err == nil || !strings.Contains(out, "management token") {
		t.Errorf("cohort server members with a submit token: %v\n%s", err, out)
	}
	if out, err := cohortAs(c.NomadToken(), "server", "members", "-address", api); err != nil {
		t.Errorf("cohort server members with the management token: %v\n%s", err, out)
	}

	// Allowed: submit-job runs the gang, microvm workers whose node's
	// driver reports them with its certificate.
	if out, err := cohortAs(submit, "run", "-detach", "-address", api, spec); err != nil {
		t.Fatalf("cohort run with the submit token: %v\n%s", err, out)
	}
	// finished waits, reading with token, until gang id ends, and fails
	// the test unless every worker exited.
	finished := func(token, id, what string) {
		t.Helper()
		sec.token = token
		v := waitStatus(t, api, id, "finished", "failed")
		sec.token = ""
		if v.Status != "finished" || v.Reason != "every worker exited" {
			t.Fatalf("%s: %+v", what, v)
		}
	}
	finished(submit, "secure", "the gang run with the submit token")

	// The same through the Nomad-compatible endpoint with Nomad's CLI.
	nomad, _ := devcluster.FindBinary("nomad")
	planned, err := exec.Command(cohortBin, "plan", writeTemp(t, dir, "viaendpoint.hcl", secureGang("viaendpoint"))).Output()
	if err != nil {
		t.Fatal(err)
	}
	nomadSpec := writeTemp(t, dir, "viaendpoint.nomad.hcl", string(planned))
	nomadAs := func(token string, args ...string) (string, error) {
		cmd := exec.Command(nomad, args...)
		cmd.Env = append(os.Environ(), "NOMAD_ADDR="+endpoint, "NOMAD_CACERT="+c.TLS().CA, "NOMAD_TOKEN="+token)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for name, tok := range map[string]string{"anonymous": "", "read-only": reader} {
		out, err := nomadAs(tok, "job", "run", nomadSpec)
		if err == nil || !strings.Contains(out, "403") {
			t.Errorf("nomad job run through the endpoint with the %s token: %v\n%s", name, err, out)
		}
		t.Logf("nomad job run, %s: %s", name, strings.TrimSpace(out))
	}
	out, err := nomadAs(submit, "job", "run", nomadSpec)
	if err != nil || !strings.Contains(out, "admitted for gang scheduling") {
		t.Fatalf("nomad job run through the endpoint with the submit token: %v\n%s", err, out)
	}
	finished(submit, "viaendpoint", "the gang run through the endpoint")

	// Its logs, through the endpoint, with the token.
	out, err = nomadAs(submit, "job", "allocs", "-json", "viaendpoint")
	if err != nil {
		t.Fatalf("nomad job allocs: %v\n%s", err, out)
	}
	var allocs []struct{ ID string }
	if err := json.Unmarshal([]byte(out), &allocs); err != nil || len(allocs) != 2 {
		t.Fatalf("allocations of viaendpoint: %v %s", err, out)
	}
	logs, err := nomadAs(submit, "alloc", "logs", allocs[0].ID, "worker")
	if err != nil || !strings.Contains(logs, "COHORT_RANK=") {
		t.Errorf("nomad alloc logs through the endpoint: %v\n%s", err, logs)
	}
	if out, err := nomadAs("", "alloc", "logs", allocs[0].ID, "worker"); err == nil {
		t.Errorf("nomad alloc logs without a token: %s", out)
	}

	// A raw_exec gang, held by cohort's barrier task: the task reads its
	// run's barrier token from the job's Nomad variable, which its
	// workload identity may read, so the job, which a read-only token
	// reads, does not hold the token, and that token may not read the
	// variable. The job's own items in the variable stay.
	nomadDirect := func(token string, args ...string) (string, error) {
		cmd := exec.Command(nomad, args...)
		cmd.Env = append(append(os.Environ(), c.NomadEnv()...), "NOMAD_TOKEN="+token)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	const tokenVar = "nomad/jobs/rawsecure"
	if out, err := nomadDirect(c.NomadToken(), "var", "put", tokenVar, "theirs=kept"); err != nil {
		t.Fatalf("nomad var put: %v\n%s", err, out)
	}
	rawSpec := writeTemp(t, dir, "raw.hcl", rawGang("rawsecure", 2, "90s", "/bin/sh", "-c", "sleep 5"))
	if out, err := cohortAs(submit, "run", "-detach", "-address", api, rawSpec); err != nil {
		t.Fatalf("cohort run of a raw_exec gang: %v\n%s", err, out)
	}
	waitFor(t, "the raw_exec gang's barrier token in its variable", func() bool {
		out, err := nomadDirect(c.NomadToken(), "var", "get", "-item", jobspec.BarrierTokenItem, tokenVar)
		return err == nil && strings.TrimSpace(out) != ""
	})
	// Nomad answers a token that may not read a variable as if it did not
	// exist; the operator's read just after shows that it does.
	if out, err := nomadDirect(reader, "var", "get", tokenVar); err == nil {
		t.Errorf("nomad var get of the barrier token with a read-only token:\n%s", out)
	}
	if out, err := nomadDirect(c.NomadToken(), "var", "get", tokenVar); err != nil {
		t.Errorf("the token variable went before the gang ended: %v\n%s", err, out)
	}
	out, err = nomadDirect(reader, "job", "inspect", "rawsecure")
	if err != nil || strings.Contains(out, `"`+jobspec.EnvBarrierToken+`"`) || !strings.Contains(out, "nomadVar") {
		t.Errorf("the raw_exec gang's job, read with a read-only token, should read its token from a variable: %v\n%s", err, out)
	}
	finished(submit, "rawsecure", "the raw_exec gang")
	waitFor(t, "the ended gang's token out of the job's variable, its own item kept", func() bool {
		out, err := nomadDirect(c.NomadToken(), "var", "get", "-out", "json", tokenVar)
		return err == nil && !strings.Contains(out, jobspec.BarrierTokenItem) && strings.Contains(out, `"theirs": "kept"`)
	})

	// A gang that mounts the nodes' host volume "data", through the
	// endpoint. Nomad checks mounts only when a job is registered, and
	// cohort registers with its own token, which may mount any volume; so
	// cohort judges the caller's: the submit token, without a host_volume
	// grant, is refused; a token whose role grants mount-readonly runs
	// it read-only, and is refused it read-write.
	if _, err := c.NomadPolicyToken("data-read", `host_volume "data" { policy = "read" }`); err != nil {
		t.Fatal(err)
	}
	if out, err := nomadDirect(c.NomadToken(), "acl", "role", "create", "-name", "mounters", "-policy", "data-read"); err != nil {
		t.Fatalf("nomad acl role create: %v\n%s", err, out)
	}
	out, err = nomadDirect(c.NomadToken(), "acl", "token", "create", "-name", "mounter", "-policy", "submit", "-role-name", "mounters", "-json")
	var mounterTok struct{ SecretID string }
	if err != nil || json.Unmarshal([]byte(out), &mounterTok) != nil || mounterTok.SecretID == "" {
		t.Fatalf("nomad acl token create with the mounters role: %v\n%s", err, out)
	}
	mounter := mounterTok.SecretID
	planned, err = exec.Command(cohortBin, "plan", writeTemp(t, dir, "mounts.hcl", rawGang("mounts", 2, "90s", "/bin/sh", "-c", "sleep 1"))).Output()
	if err != nil {
		t.Fatal(err)
	}
	withVolume := func(readOnly bool) string {
		spec := strings.Replace(string(planned), "    count = 2\n", fmt.Sprintf("    count = 2\n    volume \"data\" {\n      type      = \"host\"\n      source    = \"data\"\n      read_only = %t\n    }\n", readOnly), 1)
		if !strings.Contains(spec, `source    = "data"`) {
			t.Fatalf("no place for the volume in the planned job:\n%s", planned)
		}
		return writeTemp(t, dir, fmt.Sprintf("mounts-%t.nomad.hcl", readOnly), spec)
	}
	ro, rw := withVolume(true), withVolume(false)
	for _, c := range []struct {
		name, token, spec, want string
	}{
		{"submit token, read-only", submit, ro, `needs host_volume "data" with mount-readonly`},
		{"mounter token, read-write", mounter, rw, `needs host_volume "data" with mount-readwrite`},
	} {
		out, err := nomadAs(c.token, "job", "run", c.spec)
		if err == nil || !strings.Contains(out, "403") || !strings.Contains(out, c.want) {
			t.Errorf("nomad job run of a gang mounting a host volume, %s: %v\n%s", c.name, err, out)
		}
		t.Logf("nomad job run, mounting, %s: %s", c.name, strings.TrimSpace(out))
	}
	if out, err := nomadAs(mounter, "job", "run", ro); err != nil || !strings.Contains(out, "admitted for gang scheduling") {
		t.Fatalf("nomad job run of a gang mounting a host volume read-only, with the mounter token: %v\n%s", err, out)
	}
	finished(mounter, "mounts", "the gang mounting a host volume (registered with the servers' token)")
}

func writeTemp(t *testing.T, dir, name, content string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	writeFile(t, p, content)
	return p
}
