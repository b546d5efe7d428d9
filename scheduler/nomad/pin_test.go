package nomad

import (
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

func pinJob(count int) *api.Job {
	id, name := "j", "w"
	return &api.Job{ID: &id, TaskGroups: []*api.TaskGroup{{
		Name: &name, Count: &count,
		Tasks: []*api.Task{{Name: "worker", Env: map[string]string{"COHORT_RANK": "${NOMAD_ALLOC_INDEX}"},
			Config:   map[string]any{"args": []string{"--rank", "${NOMAD_ALLOC_INDEX}"}},
			Services: []*api.Service{{Name: "j-w", Tags: []string{"w${NOMAD_ALLOC_INDEX}"}}}}},
	}}}
}

func decision(nodes ...string) *placement.Decision {
	d := &placement.Decision{Job: "j"}
	for i, n := range nodes {
		d.Workers = append(d.Workers, placement.Worker{Group: "w", Index: i, Node: n})
	}
	return d
}

// Regression: each group was pinned to a set of nodes, not to a count per
// node, so Nomad could put two workers where cohort reserved one and take
// room cohort held for another gang. Even reservations keep the group,
// limited per node; uneven ones become one group per worker.
func TestPinExactPerNodeCounts(t *testing.T) {
	// One node: pinned to it.
	out, err := Pin(pinJob(3), decision("a", "a", "a"))
	if err != nil {
		t.Fatal(err)
	}
	if c := out.TaskGroups[0].Constraints; len(c) != 1 || c[0].Operand != "=" || c[0].RTarget != "a" {
		t.Errorf("one node: %+v", c)
	}
	// Two per node on two nodes: the set, at most two per node.
	out, _ = Pin(pinJob(4), decision("b", "a", "a", "b"))
	c := out.TaskGroups[0].Constraints
	if len(out.TaskGroups) != 1 || len(c) != 2 || c[0].RTarget != "a,b" || c[1].Operand != api.ConstraintDistinctProperty || c[1].RTarget != "2" {
		t.Errorf("even spread: %d groups, constraints %+v", len(out.TaskGroups), c)
	}
	// Three on a, one on b: one group per worker, ranks written in.
	out, err = Pin(pinJob(4), decision("a", "a", "b", "a"))
	if err != nil {
		t.Fatal(err)
	}
	if len(out.TaskGroups) != 4 {
		t.Fatalf("uneven spread: %d groups", len(out.TaskGroups))
	}
	for i, tg := range out.TaskGroups {
		rank := string(rune('0' + i))
		task := tg.Tasks[0]
		last := tg.Constraints[len(tg.Constraints)-1]
		want := []string{"a", "a", "b", "a"}[i]
		if *tg.Name != "w["+rank+"]" || *tg.Count != 1 || last.RTarget != want || task.Env["COHORT_RANK"] != rank ||
			task.Services[0].Tags[0] != "w"+rank || tg.Meta["cohort.rank"] != rank {
			t.Errorf("worker %d: group %s count %d on %s env %v tags %v", i, *tg.Name, *tg.Count, last.RTarget, task.Env, task.Services[0].Tags)
		}
		if args := task.Config["args"].([]any); args[1] != rank {
			t.Errorf("worker %d args %v", i, args)
		}
		if name := WorkerName("j", Worker{Name: "j." + *tg.Name + "[0]", TaskGroup: *tg.Name}); name != "w["+rank+"]" {
			t.Errorf("worker name %q", name)
		}
	}
	// The input is not changed.
	in := pinJob(2)
	Pin(in, decision("a", "b"))
	if len(in.TaskGroups[0].Constraints) != 0 {
		t.Error("Pin changed its input")
	}
	if _, err := Pin(pinJob(2), decision("a")); err == nil || !strings.Contains(err.Error(), "1 workers reserved for a count of 2") {
		t.Errorf("short decision: %v", err)
	}
}

// Regression: until a cluster had its first allocation, the watcher asked
// with WaitIndex 0, which Nomad answers at once: about 1,800 queries a
// second from an idle cluster. The next wait index is never 0.
func TestNextIndexNeverZero(t *testing.T) {
	for _, c := range []struct{ prev, got, want uint64 }{
		{0, 0, 1}, {1, 0, 1}, {0, 7, 7}, {7, 7, 7}, {7, 9, 9}, {9, 3, 1},
	} {
		if got := nextIndex(c.prev, c.got); got != c.want {
			t.Errorf("nextIndex(%d, %d) = %d, want %d", c.prev, c.got, got, c.want)
		}
	}
}
