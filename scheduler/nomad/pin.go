package nomad

import (
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
)

// Pin returns a copy of a (normalized) gang job whose groups Nomad can
// place only where the decision reserved them, with exactly the reserved
// number of workers on each node, so Nomad never takes room cohort holds
// for another gang.
//
// Nomad has no per-node count for a group, so a group is pinned in one of
// two ways:
//
//   - every node of the group gets the same number c of its workers (one
//     node; or one worker per node; or any even spread): the group keeps
//     its name and count, constrained to the node set with at most c
//     allocations per node (distinct_property on the node ID), which with
//     count = c x nodes is exactly c on each;
//   - otherwise the group is split into one Nomad group per worker, named
//     "<group>[<rank>]", each of count 1 on its own node. ${NOMAD_ALLOC_INDEX}
//     in the group (COHORT_RANK, the w<rank> service tag, arguments) is
//     replaced by the worker's rank, so every worker still sees its rank.
func Pin(job *api.Job, d *placement.Decision) (*api.Job, error) {
	out, err := jobspec.CopyJob(job)
	if err != nil {
		return nil, err
	}
	byGroup := map[string][]placement.Worker{}
	for _, w := range d.Workers {
		byGroup[w.Group] = append(byGroup[w.Group], w)
	}
	var groups []*api.TaskGroup
	names := map[string]bool{}
	for _, tg := range out.TaskGroups {
		names[deref(tg.Name)] = true
	}
	for _, tg := range out.TaskGroups {
		name := deref(tg.Name)
		ws := byGroup[name]
		if len(ws) == 0 {
			return nil, fmt.Errorf("group %s has no reserved workers", name)
		}
		if len(ws) != deref(tg.Count) {
			return nil, fmt.Errorf("group %s has %d workers reserved for a count of %d", name, len(ws), deref(tg.Count))
		}
		perNode := map[string]int{}
		for _, w := range ws {
			perNode[w.Node]++
		}
		if even(perNode) {
			tg.Constraints = append(tg.Constraints, nodeConstraints(perNode)...)
			groups = append(groups, tg)
			continue
		}
		sort.Slice(ws, func(a, b int) bool { return ws[a].Index < ws[b].Index })
		for _, w := range ws {
			split, err := workerGroup(tg, w)
			if err != nil {
				return nil, err
			}
			if names[deref(split.Name)] {
				return nil, fmt.Errorf("cannot split group %s per worker: the job already has a group named %s", name, deref(split.Name))
			}
			groups = append(groups, split)
		}
	}
	out.TaskGroups = groups
	return out, nil
}

// even says whether every node holds the same number of workers.
func even(perNode map[string]int) bool {
	c := -1
	for _, n := range perNode {
		if c >= 0 && n != c {
			return false
		}
		c = n
	}
	return true
}

// nodeConstraints pins a group to its nodes with at most the per-node
// count on each.
func nodeConstraints(perNode map[string]int) []*api.Constraint {
	ids := make([]string, 0, len(perNode))
	per := 0
	for id, n := range perNode {
		ids = append(ids, id)
		per = n
	}
	sort.Strings(ids)
	if len(ids) == 1 {
		return []*api.Constraint{{LTarget: "${node.unique.id}", Operand: "=", RTarget: ids[0]}}
	}
	return []*api.Constraint{
		{LTarget: "${node.unique.id}", Operand: api.ConstraintSetContainsAny, RTarget: strings.Join(ids, ",")},
		{Operand: api.ConstraintDistinctProperty, LTarget: "${node.unique.id}", RTarget: strconv.Itoa(per)},
	}
}

// WorkerGroupName is the Nomad group of one worker of a split group.
func WorkerGroupName(group string, rank int) string { return fmt.Sprintf("%s[%d]", group, rank) }

// workerGroup is the one-worker Nomad group for worker w of tg.
func workerGroup(tg *api.TaskGroup, w placement.Worker) (*api.TaskGroup, error) {
	b, err := json.Marshal(tg)
	if err != nil {
		return nil, err
	}
	rank := strconv.Itoa(w.Index)
	b = []byte(strings.ReplaceAll(string(b), "${NOMAD_ALLOC_INDEX}", rank))
	var g api.TaskGroup
	if err := json.Unmarshal(b, &g); err != nil {
		return nil, err
	}
	g.Name = ptr(WorkerGroupName(w.Group, w.Index))
	g.Count = ptr(1)
	if g.Meta == nil {
		g.Meta = map[string]string{}
	}
	g.Meta[jobspec.MetaGroup] = w.Group
	g.Meta[jobspec.MetaRank] = rank
	g.Constraints = append(g.Constraints, &api.Constraint{LTarget: "${node.unique.id}", Operand: "=", RTarget: w.Node})
	return &g, nil
}

// WorkerName is the gang worker ("group[rank]") an allocation runs: its
// group and index, or the split group's name.
func WorkerName(jobID string, w Worker) string {
	if strings.HasSuffix(w.TaskGroup, "]") && strings.Contains(w.TaskGroup, "[") {
		return w.TaskGroup
	}
	return strings.TrimPrefix(w.Name, jobID+".")
}

// ParseWorkerName splits "group[rank]".
func ParseWorkerName(name string) (group string, rank int, ok bool) {
	i := strings.LastIndex(name, "[")
	if i < 0 || !strings.HasSuffix(name, "]") {
		return "", 0, false
	}
	r, err := strconv.Atoi(name[i+1 : len(name)-1])
	if err != nil || r < 0 {
		return "", 0, false
	}
	return name[:i], r, true
}

func ptr[T any](v T) *T { return &v }
