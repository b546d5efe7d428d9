package e2e

// Gangs right on every path: each test here is a defect found by running
// cohort as a user would, now fixed, against real Nomad, Consul and QEMU.

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/cohort-dev/cohort/jobspec"
	nomadapi "github.com/hashicorp/nomad/api"
)

func rawGang(name string, count int, gangTimeout string, program string, args ...string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = fmt.Sprintf("%q", a)
	}
	return fmt.Sprintf(`job %q {
  max_runtime  = "2m"
  gang_timeout = %q
  group "w" {
    count  = %d
    driver = "raw_exec"
    resources {
      cpu    = 20
      memory = 32
    }
    program {
      path = %q
      args = [%s]
    }
  }
}
`, name, gangTimeout, count, program, strings.Join(quoted, ", "))
}

// Regression: a 16-worker raw_exec gang whose program exits at once
// completed in Nomad within a second, yet cohort never saw all 16 running
// at one moment and ran it again at every gang timeout (48 allocations
// with gang_timeout = "5s"), billing nothing. Now every worker waits in
// its barrier task until the gang is whole: it runs once and is billed.
func TestFastExitRawExecGangRunsOnce(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, rawGang("fast", 16, "5s", "/bin/true"))
	v := waitStatus(t, addr, "fast", "finished", "failed")
	if v.Status != "finished" || v.Reason != "every worker exited" || v.Attempts != 1 {
		t.Fatalf("fast gang: %+v", v)
	}
	// Three gang timeouts later it has still run once.
	time.Sleep(15 * time.Second)
	var allocs []alloc
	getJSON(t, c.NomadAddr()+"/v1/job/fast/allocations", &allocs)
	if len(allocs) != 16 {
		t.Errorf("%d allocations, want 16: the gang ran more than once", len(allocs))
	}
	if v, _ := client(addr).Job("", "fast", false); v.Run != 1 || v.Status != "finished" {
		t.Errorf("after 15 s: %+v", v)
	}
	b, err := client(addr).Bill("", "fast", 0)
	if err != nil || len(b.Lines) != 16 || b.Total <= 0 {
		t.Errorf("bill: %v %+v", err, b)
	}
	var job nomadapi.Job
	getJSON(t, c.NomadAddr()+"/v1/job/fast", &job)
	if job.Stop == nil || !*job.Stop {
		t.Error("the ended run's Nomad job is still registered")
	}
	t.Logf("16 fast workers: ran %s, billed %.9f %s", v.EndedAt.Sub(v.StartedAt), b.Total, b.Currency)
}

// A raw_exec gang whose last worker Nomad cannot place (a constraint only
// Nomad checks) never starts a main task: its placed workers wait in their
// barrier tasks, the gang is requeued at each gang timeout, and fails after
// three attempts.
func TestRawExecGangUnplaceableWorkerNeverStarts(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	spec, err := jobspec.Parse("stuck.hcl", []byte(`job "stuck" {
  max_runtime  = "1m"
  gang_timeout = "3s"
  group "ok" {
    count  = 2
    driver = "raw_exec"
    resources {
      cpu    = 20
      memory = 32
    }
    program {
      path = "/bin/echo"
      args = ["the main task ran"]
    }
  }
  group "nowhere" {
    driver = "raw_exec"
    resources {
      cpu    = 20
      memory = 32
    }
    program {
      path = "/bin/echo"
      args = ["the main task ran"]
    }
  }
}
`))
	if err != nil {
		t.Fatal(err)
	}
	job := jobspec.ToNomad(spec)
	job.TaskGroups[1].Constraints = append(job.TaskGroups[1].Constraints, &nomadapi.Constraint{LTarget: "${attr.kernel.name}", Operand: "=", RTarget: "plan9"})
	if _, err := client(addr).Submit(job); err != nil {
		t.Fatal(err)
	}
	v := waitStatus(t, addr, "stuck", "failed")
	t.Logf("stuck: %s", v.Reason)
	if v.Attempts != 3 || !strings.Contains(v.Reason, "did not start in 3 attempts") || !strings.Contains(v.Reason, "only 2 of 3 workers booted") {
		t.Errorf("stuck gang: %+v", v)
	}
	var allocs []alloc
	getJSON(t, c.NomadAddr()+"/v1/job/stuck/allocations", &allocs)
	if len(allocs) != 6 {
		t.Errorf("%d allocations, want 2 per attempt", len(allocs))
	}
	nomad, _ := devcluster.FindBinary("nomad")
	for _, a := range allocs {
		if st := a.TaskStates["worker"]; st.State == "running" {
			t.Errorf("alloc %s main task state %+v", a.ID, st)
		}
		for _, e := range a.TaskStates["worker"].Events {
			if e.Type == "Started" {
				t.Errorf("alloc %s started its main task", a.ID)
			}
		}
		// A task that never started has no log to read at all.
		logs, _ := exec.Command(nomad, "alloc", "logs", "-address", c.NomadAddr(), a.ID, "worker").CombinedOutput()
		if strings.Contains(string(logs), "the main task ran") {
			t.Errorf("alloc %s ran its main task", a.ID)
		}
	}
}

// Regression: a hand-written Nomad jobspec with only the gang meta ran as
// a gang through the Nomad-compatible endpoint, but its workers saw empty
// COHORT_RANK, COHORT_SIZE and COHORT_ADDRESS, and it kept Nomad's batch
// restarts and reschedules. Admission now normalizes it: ranks 0..2 of 3,
// no per-worker restarts in the registered job.
func TestHandWrittenJobspecIsAGang(t *testing.T) {
	c, _, endpoint := microvmServerCluster(t)
	path := filepath.Join(t.TempDir(), "hand.nomad.hcl")
	writeFile(t, path, fmt.Sprintf(`job "hand" {
  datacenters = ["*"]
  meta = {
    "cohort.gang"        = "1"
    "cohort.max_runtime" = "1m"
  }
  group "w" {
    count = 3
    task "main" {
      driver = "microvm"
      config {
        program = %q
        args    = ["env"]
      }
      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
`, workerBin))
	nomad, _ := devcluster.FindBinary("nomad")
	cmd := exec.Command(nomad, "job", "run", path)
	cmd.Env = append(os.Environ(), "NOMAD_ADDR="+endpoint)
	out, err := cmd.CombinedOutput()
	t.Logf("nomad job run through the endpoint:\n%s", out)
	if err != nil || !strings.Contains(string(out), "restarts turned off") {
		t.Fatalf("nomad job run: %v", err)
	}
	allocs := waitAllocs(t, c, "hand", 3, allStatus("complete"))
	var ranks []string
	for _, a := range allocs {
		env := run(t, c, nomad, "alloc", "logs", a.ID, "main")
		vars := map[string]string{}
		for _, line := range strings.Split(env, "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				vars[k] = v
			}
		}
		ranks = append(ranks, vars["COHORT_RANK"])
		if vars["COHORT_SIZE"] != "3" || vars["COHORT_ADDRESS"] != "hand-w" || vars["COHORT_JOB"] != "hand" {
			t.Errorf("alloc %s: COHORT_SIZE=%q COHORT_ADDRESS=%q COHORT_JOB=%q", a.ID, vars["COHORT_SIZE"], vars["COHORT_ADDRESS"], vars["COHORT_JOB"])
		}
	}
	sort.Strings(ranks)
	if strings.Join(ranks, ",") != "0,1,2" {
		t.Errorf("ranks %v, want 0,1,2", ranks)
	}
	// The registered job: no per-worker restarts or reschedules. (The
	// version cohort registered; the latest is the stop at the end.)
	var versions struct{ Versions []nomadapi.Job }
	getJSON(t, c.NomadAddr()+"/v1/job/hand/versions", &versions)
	for _, j := range versions.Versions {
		tg := j.TaskGroups[0]
		if *tg.RestartPolicy.Attempts != 0 || *tg.ReschedulePolicy.Attempts != 0 || *tg.ReschedulePolicy.Unlimited {
			t.Errorf("version %d restarts %d reschedules %d unlimited %v", *j.Version, *tg.RestartPolicy.Attempts, *tg.ReschedulePolicy.Attempts, *tg.ReschedulePolicy.Unlimited)
		}
	}
}

// countingProxy stands between cohort and Nomad and counts the requests
// for Nomad's lists (nodes, allocations, jobs).
func countingProxy(t *testing.T, nomadAddr string, paths ...string) (string, *atomic.Int64) {
	u, _ := url.Parse(nomadAddr)
	if len(paths) == 0 {
		paths = []string{"/v1/nodes", "/v1/allocations", "/v1/jobs"}
	}
	var lists atomic.Int64
	p := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if slices.Contains(paths, r.URL.Path) {
			lists.Add(1)
		}
		p.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL, &lists
}

// Regression: right after start, with no job ever run, the allocation
// watcher asked Nomad with WaitIndex 0, which never blocks: Nomad counted
// about 1,800 allocation-list queries a second and burned 118% CPU. Idle,
// cohort now asks only when something changes.
func TestIdleClusterDoesNotPollNomad(t *testing.T) {
	c, _ := cluster(t)
	proxy, lists := countingProxy(t, c.NomadAddr())
	addr := freeAddr(t)
	cmd := exec.Command(cohortBin, "server", "-dev", "-http-addr", addr, "-raft-addr", freeAddr(t), "-nomad-addr", proxy)
	logf, _ := os.Create(filepath.Join(t.TempDir(), "server.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Signal(os.Interrupt); cmd.Wait() })
	waitFor(t, "cohort leader", func() bool { return client("http://"+addr).Health() == nil })
	time.Sleep(time.Second) // the watchers' first queries
	start := lists.Load()
	time.Sleep(10 * time.Second)
	n := lists.Load() - start
	t.Logf("an idle cluster: %d list queries to Nomad in 10 s", n)
	if n > 20 {
		t.Errorf("%d list queries in 10 s on an idle cluster; blocking queries should wait for a change", n)
	}
}

// Regression: `nomad job stop` of a running gang, straight to Nomad, was
// ignored: cohort kept it running and billed until max_runtime. Now the
// gang ends, "stopped through Nomad", and its bill closes.
func TestStopThroughNomadEndsGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, rawGang("stopme", 2, "30s", "/bin/sleep", "600"))
	waitStatus(t, addr, "stopme", "running")
	nomad, _ := devcluster.FindBinary("nomad")
	stopped := time.Now()
	run(t, c, nomad, "job", "stop", "-detach", "stopme")
	v := waitStatus(t, addr, "stopme", "finished", "failed")
	if v.Status != "finished" || v.Reason != "stopped through Nomad" {
		t.Fatalf("after nomad job stop: %+v", v)
	}
	t.Logf("noticed %s after nomad job stop", v.EndedAt.Sub(stopped).Round(time.Millisecond))
	if late := v.EndedAt.Sub(stopped); late > 5*time.Second {
		t.Errorf("the gang ended %s after the stop", late)
	}
	b, _ := client(addr).Bill("", "stopme", 0)
	if b.Open || len(b.Lines) != 2 {
		t.Errorf("bill still open: %+v", b)
	}
	time.Sleep(2 * time.Second)
	if v, _ := client(addr).Job("", "stopme", false); v.Run != 1 || v.Attempts != 1 {
		t.Errorf("the stopped gang was run again: %+v", v)
	}
}

// Regression: a gang that lost a worker after release ran on, and was
// billed, until max_runtime. Now cohort stops the others at once.
func TestLostWorkerStopsGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, rawGang("lossy", 3, "30s", "/bin/sh", "-c", `if [ "$COHORT_RANK" = 1 ]; then sleep 1; exit 4; fi; sleep 600`))
	v := waitStatus(t, addr, "lossy", "failed", "finished")
	t.Logf("lossy: %s (ran %s)", v.Reason, v.EndedAt.Sub(v.StartedAt).Round(time.Millisecond))
	if v.Status != "failed" || !strings.Contains(v.Reason, "w[1] (exit 4) failed while the gang ran") {
		t.Fatalf("%+v", v)
	}
	if ran := v.EndedAt.Sub(v.StartedAt); ran > 10*time.Second {
		t.Errorf("the gang ran %s after losing a worker at 1 s", ran)
	}
	waitWorkersStopped(t, c, "lossy")
	b, _ := client(addr).Bill("", "lossy", 0)
	for _, l := range b.Lines {
		if l.EndMs > v.EndedAt.UnixMilli() {
			t.Errorf("worker %d billed past the stop: %+v", l.Index, l)
		}
	}
}

// Regression: Register used the job's namespace but Job, Allocations and
// Deregister the default one, so a namespaced gang never appeared to start
// and its stop was a no-op. The same ID in two namespaces is two gangs.
func TestNamespacedGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	nomad, _ := devcluster.FindBinary("nomad")
	run(t, c, nomad, "namespace", "apply", "-description", "a team", "team")
	path := filepath.Join(t.TempDir(), "ns.hcl")
	writeFile(t, path, rawGang("twice", 1, "30s", "/bin/sleep", "600"))
	for _, ns := range []string{"team", "default"} {
		if out, err := exec.Command(cohortBin, "run", "-detach", "-namespace", ns, "-address", addr, path).CombinedOutput(); err != nil {
			t.Fatalf("cohort run -namespace %s: %v\n%s", ns, err, out)
		}
	}
	api := client(addr)
	waitFor(t, "both running", func() bool {
		a, _ := api.Job("team", "twice", false)
		b, _ := api.Job("", "twice", false)
		return a.Status == "running" && b.Status == "running"
	})
	var allocs []alloc
	getJSON(t, c.NomadAddr()+"/v1/job/twice/allocations?namespace=team", &allocs)
	if len(allocs) != 1 {
		t.Errorf("%d allocations in namespace team", len(allocs))
	}
	if out, err := exec.Command(cohortBin, "stop", "-namespace", "team", "-address", addr, "twice").CombinedOutput(); err != nil {
		t.Fatalf("cohort stop: %v\n%s", err, out)
	}
	var job nomadapi.Job
	getJSON(t, c.NomadAddr()+"/v1/job/twice?namespace=team", &job)
	if job.Stop == nil || !*job.Stop {
		t.Error("the namespaced Nomad job was not stopped")
	}
	if b, _ := api.Job("", "twice", false); b.Status != "running" {
		t.Errorf("stopping team/twice stopped default/twice: %+v", b)
	}
	api.Stop("", "twice")
	if vs, _ := api.Jobs(); len(vs) != 2 {
		t.Errorf("jobs: %+v", vs)
	}
}
