package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestPooledGangAcrossHosts: with a warm pool on each of two hosts, a
// gang whose workers resolve each other's names and greet each other
// runs twice. The first run's starts make each node's pool want the
// shape; the second run's workers are taken from the pools, and still
// resolve, greet and exit as the first run's did.
func TestPooledGangAcrossHosts(t *testing.T) {
	c, addr, _ := microvmClusterOpts(t, clusterOpts{nodes: 2, pool: 2})
	for i, job := range []string{"peers-a", "peers-b"} {
		if i > 0 {
			// Each pool refills in the background, one VM at a
			// time: a restore and a warm-up, well under a second
			// each on an idle host.
			time.Sleep(20 * time.Second)
		}
		cohortRun(t, addr, peersJob(job, 2, "peers", "7400"))
		v := waitStatus(t, addr, job, "finished", "failed")
		logs := logsOf(t, c, job)
		if v.Status != "finished" || v.Reason != "every worker exited" || len(logs) != 2 {
			t.Fatalf("%s: %+v on %d hosts\n%v", job, v, len(logs), logs)
		}
		for node, l := range logs {
			if strings.Count(l, "resolved w") != 2 || strings.Count(l, `got "hello from w`) != 1 {
				t.Errorf("%s: the worker on %s:\n%s", job, node, l)
			}
		}
		pooled := 0
		var events []string
		for _, m := range taskMessages(t, c, job) {
			events = append(events, m)
			if strings.HasPrefix(m, "Worker VM taken from the pool") {
				pooled++
			}
		}
		switch {
		case i == 0 && pooled != 0:
			t.Errorf("%s: %d workers came from pools no task had asked for yet: %q", job, pooled, events)
		case i == 1 && pooled != 2:
			t.Errorf("%s: %d of 2 workers came from the pools: %q", job, pooled, events)
		}
	}
}

// taskMessages is every driver event message of a job's worker tasks.
func taskMessages(t *testing.T, c interface{ NomadAddr() string }, job string) []string {
	t.Helper()
	var allocs []struct {
		TaskStates map[string]struct {
			Events []struct{ Type, DisplayMessage string }
		}
	}
	getJSON(t, c.NomadAddr()+"/v1/job/"+job+"/allocations", &allocs)
	var out []string
	for _, a := range allocs {
		for _, e := range a.TaskStates["worker"].Events {
			if e.Type == "Driver" {
				out = append(out, e.DisplayMessage)
			}
		}
	}
	return out
}
