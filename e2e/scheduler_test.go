package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	cohortapi "github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/devcluster"
)

// cohortServer starts `cohort server -dev` against the cluster and returns
// its API address.
func cohortServer(t *testing.T, c *devcluster.Cluster) string {
	t.Helper()
	return cohortServerAt(t, c, freePort(t))
}

// freeAddr is a free 127.0.0.1 TCP address.
func freeAddr(t *testing.T) string {
	t.Helper()
	return fmt.Sprintf("127.0.0.1:%d", freePort(t))
}

// freePort is a TCP port free on every address, outside the kernel's
// range for outgoing connections (see devcluster.FreePort).
func freePort(t *testing.T) int {
	t.Helper()
	p, err := devcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// cohortServerAt starts `cohort server -dev` with its API on port, on
// every address, advertised at the cluster's server address so the nodes
// (each in its own network namespace) reach it.
func cohortServerAt(t *testing.T, c *devcluster.Cluster, port int, args ...string) string {
	t.Helper()
	addr := fmt.Sprintf("%s%s:%d", scheme(), c.ServerIP(), port)
	args = append(append([]string{"server", "-dev", "-http-addr", fmt.Sprintf("0.0.0.0:%d", port), "-advertise", addr,
		"-raft-addr", fmt.Sprintf("%s:%d", c.ServerIP(), freePort(t)), "-nomad-addr", c.NomadAddr(), "-log-level", "debug"}, serverTLSArgs(c)...), args...)
	cmd := exec.Command(cohortBin, args...)
	logf, _ := os.Create(filepath.Join(t.TempDir(), "server.log"))
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("cohort server log:\n%s", b)
		}
	})
	waitFor(t, "cohort server health", func() bool {
		return client(addr).Health() == nil
	})
	return addr
}

// client is the typed API client for the cohort server at addr.
func client(addr string) *cohortapi.Client {
	cfg := cohortapi.Config{Address: addr, Token: sec.token}
	if isHTTPS(addr) {
		cfg.TLS = sec.tls
	}
	return cohortapi.NewClient(cfg)
}

// waitStatus waits until the cohort job id is in one of statuses and
// returns it.
func waitStatus(t *testing.T, addr, id string, statuses ...string) jobView {
	t.Helper()
	var v jobView
	waitFor(t, fmt.Sprintf("job %s %s", id, strings.Join(statuses, " or ")), func() bool {
		var err error
		v, err = client(addr).Job("", id, false)
		if cohortapi.IsStatus(err, http.StatusNotFound) {
			return false // not adopted yet
		}
		if err != nil {
			t.Fatalf("reading job %s: %v", id, err)
		}
		return slices.Contains(statuses, v.Status)
	})
	return v
}

// waitWorkersStopped waits until no allocation of the Nomad job runs.
func waitWorkersStopped(t *testing.T, c *devcluster.Cluster, job string) {
	t.Helper()
	waitFor(t, "workers of "+job+" stopped", func() bool {
		var as []alloc
		getJSON(t, c.NomadAddr()+"/v1/job/"+job+"/allocations", &as)
		for _, a := range as {
			if a.ClientStatus == "running" {
				return false
			}
		}
		return true
	})
}

// nodeFreeMemory is the memory (MiB) the dev cluster's node offers jobs.
func nodeFreeMemory(t *testing.T, c *devcluster.Cluster) int {
	t.Helper()
	var nodes []struct{ ID string }
	getJSON(t, c.NomadAddr()+"/v1/nodes", &nodes)
	var node struct {
		NodeResources     struct{ Memory struct{ MemoryMB int } }
		ReservedResources struct{ Memory struct{ MemoryMB int } }
	}
	getJSON(t, c.NomadAddr()+"/v1/node/"+nodes[0].ID, &node)
	free := node.NodeResources.Memory.MemoryMB - node.ReservedResources.Memory.MemoryMB
	return free
}

type jobView = cohortapi.JobView

func sleepGang(name string, count, memMB int, maxRuntime string, secs int) string {
	return fmt.Sprintf(`job %q {
  max_runtime  = %q
  gang_timeout = "30s"
  group "w" {
    count  = %d
    driver = "raw_exec"
    resources {
      cpu    = 20
      memory = %d
    }
    program {
      path = "/bin/sleep"
      args = ["%d"]
    }
  }
}
`, name, maxRuntime, count, memMB, secs)
}

func cohortRun(t *testing.T, addr, spec string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "job.hcl")
	os.WriteFile(path, []byte(spec), 0o644)
	out, err := cohortCmd("run", "-detach", "-address", addr, path).CombinedOutput()
	if err != nil {
		t.Fatalf("cohort run: %v\n%s", err, out)
	}
}

// TestGangQueuesUntilWhole: on a node that has room for 10 workers while
// another gang runs, a 12-worker gang queues and starts no worker; when
// the other gang ends, it starts whole.
func TestGangQueuesUntilWhole(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)

	free := nodeFreeMemory(t, c)
	mem := free * 2 / 33 // 16 workers fit, 17 do not
	t.Logf("node memory %d MiB: workers of %d MiB, 16 fit", free, mem)

	cohortRun(t, addr, sleepGang("first", 6, mem, "1m", 4))
	waitStatus(t, addr, "first", "running")
	cohortRun(t, addr, sleepGang("second", 12, mem, "1m", 2))

	// While first runs, second waits whole: no Nomad job, no allocation.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		var v jobView
		getJSON(t, addr+"/v1/job/second", &v)
		if v.Status != "queued" {
			t.Fatalf("second is %s while first holds the room it needs", v.Status)
		}
		resp, err := http.Get(c.NomadAddr() + "/v1/job/second")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 404 {
			t.Fatalf("second was registered with Nomad while queued (%s)", resp.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The nodes view shows what first holds.
	var nv []struct {
		ID             string
		Capacity, Free struct{ MemoryMB int }
	}
	getJSON(t, addr+"/v1/nodes", &nv)
	if len(nv) != 1 || nv[0].Capacity.MemoryMB != free || nv[0].Free.MemoryMB != free-6*mem {
		t.Errorf("GET /v1/nodes while first holds 6 x %d MiB of %d: %+v", mem, free, nv)
	}

	// The queue shows it, and so do the metrics.
	if out, err := exec.Command(cohortBin, "queue", "-address", addr).CombinedOutput(); err != nil || !strings.Contains(string(out), "second") {
		t.Errorf("cohort queue: %v\n%s", err, out)
	}
	resp, err := http.Get(addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(metrics), `cohort_jobs{status="queued"} 1`) || !strings.Contains(string(metrics), "cohort_leader 1") {
		t.Errorf("metrics:\n%s", metrics)
	}

	// First's workers exit; second starts with all 12.
	waitStatus(t, addr, "second", "running", "finished")
	allocs := waitAllocs(t, c, "second", 12, func(as []alloc) bool { return true })
	if len(allocs) != 12 {
		t.Fatalf("second has %d allocations, want 12", len(allocs))
	}
	waitFor(t, "second finished", func() bool {
		var v jobView
		getJSON(t, addr+"/v1/job/second", &v)
		return v.Status == "finished" && v.Reason == "every worker exited"
	})
}

// TestConcurrentAdmissions: 16 gangs submitted at once to a node with room
// for 10: admissions placed concurrently never hold more than fits, the
// rest queue, and all 16 end up running to completion.
func TestConcurrentAdmissions(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	mem := nodeFreeMemory(t, c) * 2 / 21 // 10 fit, 11 do not
	dir := t.TempDir()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		path := filepath.Join(dir, fmt.Sprintf("c%d.hcl", i))
		writeFile(t, path, sleepGang(fmt.Sprintf("c%02d", i), 1, mem, "1m", 2))
		wg.Add(1)
		go func() {
			defer wg.Done()
			if out, err := exec.Command(cohortBin, "run", "-detach", "-address", addr, path).CombinedOutput(); err != nil {
				t.Errorf("cohort run: %v\n%s", err, out)
			}
		}()
	}
	wg.Wait()
	maxHeld := 0
	waitFor(t, "all 16 finished", func() bool {
		var vs []jobView
		getJSON(t, addr+"/v1/jobs", &vs)
		held, done := 0, 0
		for _, v := range vs {
			switch v.Status {
			case "reserved", "running":
				held++
			case "finished":
				if v.Reason != "every worker exited" {
					t.Errorf("%s ended: %s", v.ID, v.Reason)
				}
				done++
			}
		}
		maxHeld = max(maxHeld, held)
		if held > 10 {
			t.Fatalf("%d gangs of %d MiB hold room at once; only 10 fit", held, mem)
		}
		return done == 16
	})
	t.Logf("at most %d gangs held room at once", maxHeld)
	if maxHeld < 10 {
		t.Errorf("at most %d gangs ran at once; 10 fit", maxHeld)
	}
}

// TestQueuedGangTimesOut: a gang that would fit the empty cluster but
// not beside what runs now fails once it has waited its gang timeout,
// saying what it needs and what the most free node had.
func TestQueuedGangTimesOut(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	mem := nodeFreeMemory(t, c) / 4
	cohortRun(t, addr, sleepGang("holder", 3, mem, "1m", 30))
	waitStatus(t, addr, "holder", "running")
	spec := strings.Replace(sleepGang("waiter", 2, mem, "1m", 1), `gang_timeout = "30s"`, `gang_timeout = "2s"`, 1)
	cohortRun(t, addr, spec)
	v := waitStatus(t, addr, "waiter", "failed")
	t.Logf("waiter: %s", v.Reason)
	if !strings.Contains(v.Reason, "not placed within its gang timeout of 2s") || !strings.Contains(v.Reason, "the most free of 1 eligible nodes") {
		t.Errorf("reason: %q", v.Reason)
	}
	if waited := v.EndedAt.Sub(v.SubmittedAt); waited < 2*time.Second || waited > 10*time.Second {
		t.Errorf("failed %s after submission, want its gang timeout of 2s", waited)
	}
}

// TestGangFailsWhenWorkersFail: a raw_exec gang whose program does not
// exist passes its start barrier whole and then fails; its run ends at
// once, failed, with the workers named, and it never runs again.
func TestGangFailsWhenWorkersFail(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, strings.Replace(sleepGang("broken", 2, 64, "1m", 1), "/bin/sleep", "/nonexistent/program", 1))
	v := waitStatus(t, addr, "broken", "failed")
	t.Logf("broken: %s", v.Reason)
	if v.Attempts != 1 || !strings.Contains(v.Reason, "w[") || !strings.Contains(v.Reason, "failed") {
		t.Errorf("broken gang ended after %d attempts: %q", v.Attempts, v.Reason)
	}
	time.Sleep(2 * time.Second)
	if allocs := waitAllocs(t, c, "broken", 2, func([]alloc) bool { return true }); len(allocs) != 2 {
		t.Errorf("the failed gang ran again: %d allocations", len(allocs))
	}
}

// TestMaxRuntimeStopsGang: a gang with max_runtime = "3s" is stopped 3 s
// after it started; the test reports how late.
func TestMaxRuntimeStopsGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, sleepGang("bounded", 2, 64, "3s", 600))
	v := waitStatus(t, addr, "bounded", "finished")
	if !strings.Contains(v.Reason, "max_runtime reached") {
		t.Fatalf("bounded ended with %q", v.Reason)
	}
	ran, late := v.EndedAt.Sub(v.StartedAt), v.EndedAt.Sub(v.Deadline)
	t.Logf("max_runtime 3s: ran %v, stopped %v after the deadline", ran, late)
	if late < 0 || late > time.Second {
		t.Errorf("stopped %v after the deadline", late)
	}
	// Billed per worker from the start of the gang to its stop.
	out, err := exec.Command(cohortBin, "bill", "-json", "-address", addr, "bounded").Output()
	if err != nil {
		t.Fatal(err)
	}
	var bill struct {
		Lines []struct{ StartMs, EndMs int64 }
		Total float64
	}
	json.Unmarshal(out, &bill)
	if len(bill.Lines) != 2 || bill.Total <= 0 {
		t.Fatalf("bill = %s", out)
	}
	for _, l := range bill.Lines {
		if l.StartMs != v.StartedAt.UnixMilli() || l.EndMs != v.EndedAt.UnixMilli() {
			t.Errorf("bill line %+v does not span the run %v..%v", l, v.StartedAt, v.EndedAt)
		}
	}
	waitWorkersStopped(t, c, "bounded")
}

// TestStopGang: cohort stop ends a running gang and its Nomad job.
func TestStopGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, sleepGang("stoppable", 2, 64, "10m", 600))
	waitStatus(t, addr, "stoppable", "running")
	if out, err := exec.Command(cohortBin, "stop", "-address", addr, "stoppable").CombinedOutput(); err != nil {
		t.Fatalf("cohort stop: %v\n%s", err, out)
	}
	var v jobView
	getJSON(t, addr+"/v1/job/stoppable", &v)
	if v.Status != "finished" || v.Reason != "stopped by request" {
		t.Errorf("after stop: %+v", v)
	}
	waitWorkersStopped(t, c, "stoppable")
}

// TestRejectsImpossibleGang: a gang that cannot fit even on the empty
// cluster is refused at submission with the reason.
func TestRejectsImpossibleGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	path := filepath.Join(t.TempDir(), "huge.hcl")
	os.WriteFile(path, []byte(sleepGang("huge", 4, 10_000_000, "1m", 1)), 0o644)
	out, err := exec.Command(cohortBin, "run", "-address", addr, path).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "cannot fit even on the empty cluster") || !strings.Contains(string(out), "the most free of 1 eligible nodes") {
		t.Fatalf("cohort run of an impossible gang: %v\n%s", err, out)
	}
}
