package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
)

// eventTimes is an alloc's worker task events with their times.
func eventTimes(t *testing.T, c *devcluster.Cluster, allocID string) map[string]time.Time {
	t.Helper()
	var ev struct {
		TaskStates map[string]struct {
			Events []struct {
				DisplayMessage string
				Time           int64
			}
		}
	}
	getJSON(t, c.NomadAddr()+"/v1/allocation/"+allocID, &ev)
	out := map[string]time.Time{}
	for _, e := range ev.TaskStates["worker"].Events {
		for _, prefix := range []string{"Waiting at the start barrier", "Released by the start barrier", "Aborted at the start barrier"} {
			if strings.HasPrefix(e.DisplayMessage, prefix) {
				out[prefix] = time.Unix(0, e.Time)
			}
		}
	}
	return out
}

func gangJob(name string, count, memMB int, gangTimeout string, args ...string) string {
	spec := microvmJob(name, count, args...)
	spec = strings.Replace(spec, `max_runtime = "5m"`, fmt.Sprintf("max_runtime = \"5m\"\n  gang_timeout = %q", gangTimeout), 1)
	return strings.Replace(spec, "memory = 128", fmt.Sprintf("memory = %d", memMB), 1)
}

// TestBarrierDirectGangStartsTogether: a gang registered with Nomad
// directly (nomad job run, bypassing cohort) is adopted by the server from
// its first worker's boot report; no worker runs its program until every
// worker has booted, and then all are released.
func TestBarrierDirectGangStartsTogether(t *testing.T) {
	c, api, _ := microvmServerCluster(t)
	submit(t, c, gangJob("together", 3, 128, "60s", "exit", "0"))

	allocs := waitAllocs(t, c, "together", 3, allStatus("complete"))
	var lastWait, firstRelease time.Time
	for _, a := range allocs {
		ev := eventTimes(t, c, a.ID)
		w, r := ev["Waiting at the start barrier"], ev["Released by the start barrier"]
		if w.IsZero() || r.IsZero() {
			t.Fatalf("alloc %s did not pass the barrier:\n%s", a.ID, taskEvents(t, c, a.ID))
		}
		if w.After(lastWait) {
			lastWait = w
		}
		if firstRelease.IsZero() || r.Before(firstRelease) {
			firstRelease = r
		}
	}
	if firstRelease.Before(lastWait) {
		t.Errorf("a worker was released at %s, before the last worker booted at %s", firstRelease, lastWait)
	}
	t.Logf("last worker booted %s; first release %s later", lastWait.Format(time.StampMilli), firstRelease.Sub(lastWait))

	v := waitStatus(t, api, "together", "finished")
	if v.Reason != "every worker exited" || v.StartedAt.IsZero() {
		t.Errorf("adopted gang: %+v", v)
	}
	// It is billed per worker from its release, like a submitted gang.
	var bill struct {
		Lines []struct{ StartMs, EndMs int64 }
		Total float64
	}
	getJSON(t, api+"/v1/job/together/bill", &bill)
	if len(bill.Lines) != 3 || bill.Total <= 0 || bill.Lines[0].StartMs != v.StartedAt.UnixMilli() {
		t.Errorf("bill of the adopted gang: %+v (started %d)", bill, v.StartedAt.UnixMilli())
	}

	// Registered again (changed, so Nomad runs it again), it is the job's
	// second run; the first run's bill stays.
	submit(t, c, gangJob("together", 3, 128, "60s", "env"))
	waitFor(t, "second run finished", func() bool {
		getJSON(t, api+"/v1/job/together", &v)
		return v.Run == 2 && v.Status == "finished"
	})
	getJSON(t, api+"/v1/job/together/bill?run=1", &bill)
	if len(bill.Lines) != 3 {
		t.Errorf("bill of the first run after the second: %+v", bill)
	}
}

// TestBarrierPartialGangStoppedAndRequeued: a gang registered with Nomad
// directly on a node with room for only 2 of its 3 workers: the 2 placed
// workers boot and wait, never running their program; at the gang timeout
// cohort stops the Nomad job and requeues the gang; once room frees up it
// runs whole.
func TestBarrierPartialGangStoppedAndRequeued(t *testing.T) {
	c, api, _ := microvmServerCluster(t)
	free := nodeFreeMemory(t, c)
	const workerMB = 256
	hog := free - 2*workerMB - workerMB/2 // 2 workers fit beside it, 3 do not
	nomad, _ := devcluster.FindBinary("nomad")
	hogSpec := fmt.Sprintf(`job "hog" {
  type = "batch"
  group "h" {
    task "h" {
      driver = "raw_exec"
      config {
        command = "/bin/sleep"
        args    = ["600"]
      }
      resources {
        cpu    = 20
        memory = %d
      }
    }
  }
}
`, hog)
	hogFile := t.TempDir() + "/hog.nomad.hcl"
	writeFile(t, hogFile, hogSpec)
	run(t, c, nomad, "job", "run", "-detach", hogFile)
	waitAllocs(t, c, "hog", 1, allStatus("running"))

	submit(t, c, gangJob("partial", 3, workerMB, "8s", "exit", "0"))
	// Nomad places 2 workers; they boot and wait at the barrier.
	waitFor(t, "2 workers waiting at the barrier", func() bool {
		var allocs []alloc
		getJSON(t, c.NomadAddr()+"/v1/job/partial/allocations", &allocs)
		waiting := 0
		for _, a := range allocs {
			if !eventTimes(t, c, a.ID)["Waiting at the start barrier"].IsZero() {
				waiting++
			}
		}
		return waiting == 2
	})
	var v jobView
	getJSON(t, api+"/v1/job/partial", &v)
	if v.Status != "reserved" {
		t.Fatalf("the adopted partial gang is %s, want reserved: %+v", v.Status, v)
	}

	// At the gang timeout it is stopped and requeued, and no worker ever
	// ran its program.
	v = waitStatus(t, api, "partial", "queued")
	t.Logf("requeued: %s", v.Reason)
	if !strings.Contains(v.Reason, "only 2 of 3 workers booted") {
		t.Errorf("requeue reason: %q", v.Reason)
	}
	var allocs []alloc
	getJSON(t, c.NomadAddr()+"/v1/job/partial/allocations", &allocs)
	for _, a := range allocs {
		ev := eventTimes(t, c, a.ID)
		if !ev["Released by the start barrier"].IsZero() {
			t.Errorf("alloc %s of the partial gang was released:\n%s", a.ID, taskEvents(t, c, a.ID))
		}
		if logs := run(t, c, nomad, "alloc", "logs", a.ID, "worker"); strings.TrimSpace(logs) != "" {
			t.Errorf("alloc %s of the partial gang ran its program: %q", a.ID, logs)
		}
	}

	// Room frees up: cohort places the gang whole and it runs to the end.
	run(t, c, nomad, "job", "stop", "-purge", "hog")
	v = waitStatus(t, api, "partial", "finished", "failed")
	if v.Reason != "every worker exited" || v.Attempts != 2 {
		t.Errorf("requeued gang ended: %+v", v)
	}
	getJSON(t, c.NomadAddr()+"/v1/job/partial/allocations", &allocs)
	released := 0
	for _, a := range allocs {
		if !eventTimes(t, c, a.ID)["Released by the start barrier"].IsZero() {
			released++
		}
	}
	if released != 3 {
		t.Errorf("%d workers were released in the second attempt, want 3", released)
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestRunShowsWorkerProgress: `cohort run` follows every worker of a
// microvm gang from its reservation to its exit code, and exits 1 when
// the workers failed. The first worker to fail ends the gang: the other
// is stopped if it has not exited yet.
func TestRunShowsWorkerProgress(t *testing.T) {
	_, api, _ := microvmServerCluster(t)
	path := filepath.Join(t.TempDir(), "progress.hcl")
	writeFile(t, path, gangJob("progress", 2, 128, "60s", "exit", "3"))
	out, err := exec.Command(cohortBin, "run", "-address", api, path).CombinedOutput()
	t.Logf("cohort run:\n%s", out)
	if code := exitStatus(err); code != 1 {
		t.Errorf("cohort run of a gang whose workers exit 3: exit status %d, want 1", code)
	}
	rank := map[string]int{"queued": 0, "reserved": 1, "booted": 2, "running": 3, "exit": 4, "stopping": 4, "failed": 4, "complete": 4}
	exit3 := 0
	for _, w := range []string{"w[0]", "w[1]"} {
		var states []string
		for _, line := range strings.Split(string(out), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != w {
				continue
			}
			st := f[1]
			if st == "exit" {
				st += " " + f[2]
			}
			if n := len(states); n > 0 && rank[strings.Fields(st)[0]] < rank[strings.Fields(states[n-1])[0]] {
				t.Errorf("worker %s went back from %s to %s", w, states[n-1], st)
			}
			states = append(states, st)
		}
		// A gang that fits is reserved on arrival: it may skip queued.
		if len(states) < 2 || !slices.Contains(states, "reserved") || rank[strings.Fields(states[len(states)-1])[0]] != 4 {
			t.Errorf("worker %s went through %v; want [queued] reserved ... an end", w, states)
		}
		if states[len(states)-1] == "exit 3" {
			exit3++
		}
	}
	if exit3 == 0 || !strings.Contains(string(out), "failed: ") || !strings.Contains(string(out), "(exit 3)") {
		t.Errorf("the gang's end is not reported")
	}
}

func exitStatus(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}
