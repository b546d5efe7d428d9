// Package placement decides where gangs run. It is a pure function of an
// inventory snapshot and a queue: no Raft, no Nomad, no clock of its own,
// so every rule (all-or-nothing, best fit, priority, EASY backfill) is
// tested directly.
package placement

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	psstructs "github.com/hashicorp/nomad/plugins/shared/structs"
)

// Node is one client's capacity as the scheduler sees it: what is free
// after every allocation on it, cohort's or not.
type Node struct {
	ID         string
	Datacenter string
	Pool       string
	CPU        int // MHz free
	MemoryMB   int // MiB free
	// Devices maps each kind of device on the node, named
	// "vendor/type/model", to how many are free.
	Devices map[string]int
	// DeviceAttrs are each device kind's attributes, typed and with
	// units as Nomad has them, for device constraints.
	DeviceAttrs map[string]map[string]*psstructs.Attribute `json:",omitempty"`
	// Drivers are the task drivers healthy on the node, as DriverSet
	// writes them; "" when not known (an inventory made by hand), which
	// any group may use.
	Drivers string `json:",omitempty"`
}

// DriverSet writes a node's healthy task drivers as Node.Drivers holds
// them: sorted, each between commas (",exec,raw_exec,"), and "," for
// none, which no group with a driver may use.
func DriverSet(names []string) string {
	sorted := append([]string(nil), names...)
	sort.Strings(sorted)
	return "," + strings.Join(sorted, ",") + strings.Repeat(",", min(len(sorted), 1))
}

// hasDrivers says whether n has every task driver g's workers use.
func hasDrivers(n *Node, g *Group) bool {
	if n.Drivers == "" {
		return true
	}
	for _, d := range g.Drivers {
		if !containsDriver(n.Drivers, d) {
			return false
		}
	}
	return true
}

// DriversAnywhere says whether every group of j has a node in its
// datacenters and pool with all its task drivers, whatever room it has.
func (inv *inventory) DriversAnywhere(j *Job) bool {
	for gi := range j.Groups {
		if g := &j.Groups[gi]; len(g.Drivers) > 0 && !inv.driversFor(j, g) {
			return false
		}
	}
	return true
}

// driversFor says whether some node j may use has g's drivers: one look
// per part of the index, where there is one.
func (inv *inventory) driversFor(j *Job, g *Group) bool {
	if inv.idx != nil {
		for _, p := range inv.idx.parts {
			key := Node{Datacenter: p.dc, Pool: p.pool, Drivers: p.drivers}
			if p.root != nilNode && eligible(&key, j) && hasDrivers(&key, g) {
				return true
			}
		}
		return false
	}
	_, with := driverCounts(inv.nodes, j, g)
	return with > 0
}

// driverCounts counts the nodes j may use, and those of them with g's
// task drivers.
func driverCounts(nodes []Node, j *Job, g *Group) (inPlace, with int) {
	for i := range nodes {
		if n := &nodes[i]; n.ID != "" && eligible(n, j) {
			inPlace++
			if hasDrivers(n, g) {
				with++
			}
		}
	}
	return inPlace, with
}

// containsDriver says whether set holds driver d, without building
// anything.
func containsDriver(set, d string) bool {
	for rest := set; rest != "" && d != ""; {
		var f string
		f, rest, _ = strings.Cut(rest, ",")
		if f == d {
			return true
		}
	}
	return false
}

// Group is a set of identical workers of a gang.
type Group struct {
	Name     string
	Count    int
	CPU      int
	MemoryMB int
	Devices  map[string]int
	// DeviceConstraints narrow the device requests of the same name.
	DeviceConstraints map[string][]DeviceConstraint `json:",omitempty"`
	DistinctHosts     bool
	// MaxPerNode, when set, is the most workers of the group on one node.
	MaxPerNode int `json:",omitempty"`
	// Drivers are the task drivers its workers' tasks use: a worker goes
	// only to a node where each is healthy, as Nomad places it.
	Drivers []string `json:",omitempty"`
}

// perNode is the most workers of g one node may hold (0: no limit).
func (g *Group) perNode() int {
	if g.DistinctHosts {
		return 1
	}
	return g.MaxPerNode
}

// Job is a gang waiting in the queue.
type Job struct {
	// ID is the Nomad job ID; Namespace its Nomad namespace ("" is the
	// default one). Key() joins them: jobs are known by both.
	ID          string
	Namespace   string `json:",omitempty"`
	Priority    int
	Seq         uint64 // submission order; FIFO within a priority
	Datacenters []string
	Pool        string
	MaxRuntime  time.Duration
	// GangTimeout bounds how long a reserved gang may take to have every
	// worker running; placement itself does not use it.
	GangTimeout time.Duration
	Groups      []Group
}

// Running is a gang holding resources until its deadline.
type Running struct {
	Job      *Job
	Decision Decision
	Ends     time.Time // start + max runtime: the latest it can hold them
}

// Worker is one placed worker.
type Worker struct {
	Group string
	Index int
	Node  string
	// Devices are the node's device kinds the worker's requests were
	// served from, so releasing it gives back exactly what it took.
	Devices map[string]int `json:",omitempty"`
}

// Decision places every worker of one job.
type Decision struct {
	Job     string // the job's Key
	Workers []Worker
}

// Key names a job uniquely across Nomad namespaces: the ID alone in the
// default namespace, "<namespace>/<id>" in any other. Namespaces cannot
// contain a slash and cohort refuses gang IDs that do, so keys never
// collide.
func (j *Job) Key() string { return Key(j.Namespace, j.ID) }

// Key is the key of the job id in namespace ns.
func Key(ns, id string) string {
	if ns == "" || ns == "default" {
		return id
	}
	return ns + "/" + id
}

// Size is the number of workers a job needs.
func (j *Job) Size() int {
	n := 0
	for _, g := range j.Groups {
		n += g.Count
	}
	return n
}

// Inventory is a mutable copy of the nodes, indexed for placement. A
// long-lived scheduler keeps one and places into it job by job; Schedule
// makes its own.
type Inventory = inventory

// NewInventory copies nodes into an inventory indexed for best fit (see
// index.go): building it costs O(n log n), and each worker placed or
// released then O(log n).
func NewInventory(nodes []Node) *Inventory {
	inv := newInventory(nodes)
	inv.buildIndex()
	return inv
}

// Place puts a whole job on nodes or nothing of it, for a single decision:
// it scans the nodes instead of indexing them first, and decides as an
// Inventory does.
func Place(nodes []Node, j *Job) (Decision, bool) { return newInventory(nodes).place(j) }

// Place puts a whole job on the inventory or nothing of it.
func (inv *inventory) Place(j *Job) (Decision, bool) { return inv.place(j) }

// Nodes is a copy of what is free on each node now.
func (inv *inventory) Nodes() []Node {
	out := make([]Node, 0, len(inv.nodes)-len(inv.holes))
	for i := range inv.nodes {
		if inv.nodes[i].ID != "" {
			out = append(out, copyNode(&inv.nodes[i]))
		}
	}
	return out
}

// SetNode puts n into the inventory, or replaces the node of its ID, and
// indexes it: an inventory kept current by deltas re-indexes the nodes
// that changed, O(log n) each, instead of being built again.
func (inv *inventory) SetNode(n Node) {
	if n.ID == "" {
		return
	}
	i, ok := inv.index[n.ID]
	switch {
	case ok:
		inv.unindex(i)
	case len(inv.holes) > 0:
		i = inv.holes[len(inv.holes)-1]
		inv.holes = inv.holes[:len(inv.holes)-1]
	default:
		i = len(inv.nodes)
		inv.nodes = append(inv.nodes, Node{})
		if inv.idx != nil {
			inv.idx.grow()
		}
	}
	inv.nodes[i] = copyNode(&n)
	inv.index[n.ID] = i
	if inv.idx != nil {
		p := inv.idx.part(&n)
		inv.idx.partOf[i] = p
		p.root = inv.insert(p.root, int32(i))
	}
}

// RemoveNode takes the node of that ID out of the inventory, if it is
// there. Its slot is reused by the next node set.
func (inv *inventory) RemoveNode(id string) {
	i, ok := inv.index[id]
	if !ok {
		return
	}
	inv.unindex(i)
	delete(inv.index, id)
	inv.nodes[i] = Node{}
	inv.holes = append(inv.holes, i)
}

// unindex takes node i out of the index, before its key changes.
func (inv *inventory) unindex(i int) {
	if inv.idx == nil {
		return
	}
	if p := inv.idx.partOf[i]; p != nil {
		p.root = inv.remove(p.root, int32(i))
		inv.idx.partOf[i] = nil
	}
}

// Release gives a placed job's resources back.
func (inv *inventory) Release(j *Job, d Decision) { inv.release(&Running{Job: j, Decision: d}) }

// inventory is a mutable copy of the nodes, indexed for placement. Without
// idx, placement scans every node; with it, it descends the index. Both
// decide the same (the property tests compare them).
type inventory struct {
	nodes []Node
	index map[string]int
	idx   *treap
	// holes are the slots of removed nodes (ID ""), for reuse.
	holes []int
}

func newInventory(nodes []Node) *inventory {
	inv := &inventory{nodes: make([]Node, len(nodes)), index: make(map[string]int, len(nodes))}
	for i := range nodes {
		inv.nodes[i] = copyNode(&nodes[i])
		if nodes[i].ID != "" {
			inv.index[nodes[i].ID] = i
		}
	}
	return inv
}

// copyNode copies a node with its own device counts (attributes are never
// changed, so they are shared).
func copyNode(n *Node) Node {
	c := *n
	c.Devices = make(map[string]int, len(n.Devices))
	for k, v := range n.Devices {
		c.Devices[k] = v
	}
	return c
}

func (inv *inventory) clone() *inventory {
	c := newInventory(inv.nodes)
	c.holes = append([]int(nil), inv.holes...)
	if inv.idx != nil {
		c.idx = inv.idx.clone()
	}
	return c
}

func eligible(n *Node, j *Job) bool {
	if j.Pool != "" && n.Pool != j.Pool {
		return false
	}
	if len(j.Datacenters) == 0 {
		return true
	}
	for _, dc := range j.Datacenters {
		if dc == "*" || dc == n.Datacenter {
			return true
		}
	}
	return false
}

// deviceMatches says whether a device request names a node's device kind:
// "gpu" names every GPU, "nvidia/gpu" every NVIDIA GPU, and
// "nvidia/gpu/A100" that model only, as Nomad's device requests do.
func deviceMatches(request, kind string) bool {
	if request == kind {
		return true
	}
	k := strings.Split(kind, "/")
	if len(k) != 3 {
		return false
	}
	switch r := strings.Split(request, "/"); len(r) {
	case 1:
		return r[0] == k[1]
	case 2:
		return r[0] == k[0] && r[1] == k[1]
	}
	return false
}

// pickDevices serves device requests from the free device kinds and says
// which kinds it took. The most specific requests go first: as names nest
// (a model is within its vendor/type, which is within its type), serving
// them before the general ones never strands a request that could be met.
func pickDevices(n *Node, g *Group) (map[string]int, bool) {
	free, requests := n.Devices, g.Devices
	if len(requests) == 0 {
		return nil, true
	}
	reqs := make([]string, 0, len(requests))
	for r := range requests {
		reqs = append(reqs, r)
	}
	sort.Slice(reqs, func(a, b int) bool {
		sa, sb := strings.Count(reqs[a], "/"), strings.Count(reqs[b], "/")
		if sa != sb {
			return sa > sb
		}
		return reqs[a] < reqs[b]
	})
	kinds := make([]string, 0, len(free))
	for k := range free {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	taken := map[string]int{}
	for _, r := range reqs {
		need := requests[r]
		for _, k := range kinds {
			if need == 0 {
				break
			}
			if !deviceMatches(r, k) || !satisfies(k, n.DeviceAttrs[k], g.DeviceConstraints[r]) {
				continue
			}
			if n := min(free[k]-taken[k], need); n > 0 {
				taken[k] += n
				need -= n
			}
		}
		if need > 0 {
			return nil, false
		}
	}
	return taken, true
}

// take places one worker of g on node i and returns the device kinds it
// took; best must have chosen the node.
func (inv *inventory) take(i int, g *Group) map[string]int {
	devs, _ := pickDevices(&inv.nodes[i], g)
	inv.apply(i, g, devs, 1)
	return devs
}

// apply takes (sign 1) or gives back (sign -1) one worker's resources,
// moving the node in the index.
func (inv *inventory) apply(i int, g *Group, devs map[string]int, sign int) {
	var p *part
	if inv.idx != nil {
		p = inv.idx.partOf[i]
		p.root = inv.remove(p.root, int32(i))
	}
	n := &inv.nodes[i]
	n.CPU -= sign * g.CPU
	n.MemoryMB -= sign * g.MemoryMB
	for d, c := range devs {
		n.Devices[d] -= sign * c
	}
	if p != nil {
		p.root = inv.insert(p.root, int32(i))
	}
}

// best is the tightest node (see tighter) that j may use with room for a
// worker of g that ok accepts, or -1.
func (inv *inventory) best(j *Job, g *Group, ok func(int) bool) int {
	if inv.idx != nil {
		return inv.bestIndexed(j, g, ok)
	}
	return inv.bestLinear(j, g, ok)
}

// bestLinear scans every node.
func (inv *inventory) bestLinear(j *Job, g *Group, ok func(int) bool) int {
	best := -1
	for i := range inv.nodes {
		n := &inv.nodes[i]
		if n.ID == "" || n.CPU < g.CPU || n.MemoryMB < g.MemoryMB || !eligible(n, j) {
			continue
		}
		if (best < 0 || tighter(n, &inv.nodes[best])) && ok(i) {
			best = i
		}
	}
	return best
}

// place puts every worker of j on inv (best fit, biggest groups first) and
// returns the decision; on failure inv is left unchanged.
func (inv *inventory) place(j *Job) (Decision, bool) {
	order := make([]int, len(j.Groups))
	for i := range order {
		order[i] = i
	}
	sort.SliceStable(order, func(a, b int) bool {
		ga, gb := &j.Groups[order[a]], &j.Groups[order[b]]
		return ga.MemoryMB*ga.CPU > gb.MemoryMB*gb.CPU
	})
	d := Decision{Job: j.Key()}
	type undo struct {
		node int
		g    *Group
		devs map[string]int
	}
	var taken []undo
	rollback := func() {
		for _, u := range taken {
			inv.apply(u.node, u.g, u.devs, -1)
		}
	}
	for _, gi := range order {
		g := &j.Groups[gi]
		limit := g.perNode()
		used := map[int]int{} // workers of g on each node
		ok := func(i int) bool {
			if limit > 0 && used[i] >= limit {
				return false
			}
			if !hasDrivers(&inv.nodes[i], g) {
				return false
			}
			_, ok := pickDevices(&inv.nodes[i], g)
			return ok
		}
		// Each worker goes to the tightest node that fits it then: a
		// node that just took one may no longer be the tightest.
		for w := 0; w < g.Count; w++ {
			best := inv.best(j, g, ok)
			if best < 0 {
				rollback()
				return Decision{}, false
			}
			devs := inv.take(best, g)
			taken = append(taken, undo{best, g, devs})
			d.Workers = append(d.Workers, Worker{Group: g.Name, Index: w, Node: inv.nodes[best].ID, Devices: devs})
			used[best]++
		}
	}
	return d, true
}

// release gives a running job's resources back.
func (inv *inventory) release(r *Running) { inv.applyDecision(r.Job, r.Decision, -1) }

// Group finds a job's group by name; nil if it has none.
func (j *Job) Group(name string) *Group {
	for i := range j.Groups {
		if j.Groups[i].Name == name {
			return &j.Groups[i]
		}
	}
	return nil
}

// Subtract takes what the holding gangs' workers occupy from nodes (the
// free capacity without them) and returns the result; nodes is not
// changed.
func Subtract(nodes []Node, holding []Running) []Node {
	inv := newInventory(nodes)
	for _, h := range holding {
		inv.applyDecision(h.Job, h.Decision, 1)
	}
	return inv.nodes
}

// Order sorts a queue: higher priority first, then submission order.
func Order(queue []*Job) {
	sort.SliceStable(queue, func(a, b int) bool {
		if queue[a].Priority != queue[b].Priority {
			return queue[a].Priority > queue[b].Priority
		}
		return queue[a].Seq < queue[b].Seq
	})
}

// Plan is the outcome of one scheduling pass.
type Plan struct {
	Decisions []Decision
	// Head is the first job that could not start, and HeadStart the time
	// by which it is guaranteed to fit (zero if it cannot be known, for
	// example while something without a deadline holds what it needs).
	Head      string
	HeadStart time.Time
}

// Schedule starts jobs from the queue in order while they fit. At the
// first that does not (the head), it computes when the head will fit as
// running jobs reach their deadlines, reserves that future placement, and
// backfills later jobs only where they cannot delay it: they end before the
// head's start, or they leave the head's future placement intact.
func Schedule(now time.Time, nodes []Node, running []Running, queue []*Job) Plan {
	// One gang is one decision (and, when it waits, one trial per
	// running gang): a scan costs less than building the index.
	return schedule(now, nodes, running, queue, len(queue) > 1)
}

// schedule is Schedule on an indexed inventory or on one that scans; the
// tests run both and compare.
func schedule(now time.Time, nodes []Node, running []Running, queue []*Job, indexed bool) Plan {
	q := append([]*Job(nil), queue...)
	Order(q)
	inv := newInventory(nodes)
	if indexed {
		inv.buildIndex()
	}
	// A gang with a group no node could take for its drivers starts no
	// matter what is released: it is not the head whose start backfill
	// protects (it waits out its gang timeout), and it places nothing.
	q = slices.DeleteFunc(q, func(j *Job) bool { return !inv.DriversAnywhere(j) })
	run := append([]Running(nil), running...)
	var plan Plan
	i := 0
	for ; i < len(q); i++ {
		d, ok := inv.place(q[i])
		if !ok {
			break
		}
		plan.Decisions = append(plan.Decisions, d)
		run = append(run, Running{Job: q[i], Decision: d, Ends: now.Add(q[i].MaxRuntime)})
	}
	if i == len(q) {
		return plan
	}
	head := q[i]
	plan.Head = head.Key()
	shadow, future, reserved := reserve(inv, run, head)
	if reserved {
		plan.HeadStart = shadow
	}
	for _, j := range q[i+1:] {
		// Placed for a trial, given back if it would delay the head.
		d, ok := inv.place(j)
		if !ok {
			continue
		}
		ends := now.Add(j.MaxRuntime)
		if !reserved {
			// Even with every cohort job ended the head would not fit:
			// what blocks it has no deadline (allocations cohort did not
			// make), so no start time can be promised or delayed. Its
			// gang timeout bounds its wait; meanwhile the rest may run.
		} else if !ends.After(shadow) {
			// Gone (at the latest) before the head starts.
		} else {
			// Holds resources past the head's start: allowed only if the
			// head still fits in the future inventory without them.
			future.applyDecision(j, d, 1)
			if !future.fits(head) {
				future.applyDecision(j, d, -1)
				inv.applyDecision(j, d, -1)
				continue
			}
		}
		plan.Decisions = append(plan.Decisions, d)
	}
	return plan
}

// applyDecision takes (sign 1) or gives back (sign -1) a decision's
// resources.
func (inv *inventory) applyDecision(j *Job, d Decision, sign int) {
	for _, w := range d.Workers {
		i, ok := inv.index[w.Node]
		g := j.Group(w.Group)
		if !ok || g == nil {
			continue
		}
		inv.apply(i, g, w.Devices, sign)
	}
}

// reserve finds the earliest deadline by which the head fits, releasing
// running jobs in deadline order, and returns that time and the inventory
// then (with nothing of the head taken from it).
func reserve(inv *inventory, running []Running, head *Job) (time.Time, *inventory, bool) {
	rs := append([]Running(nil), running...)
	sort.SliceStable(rs, func(a, b int) bool { return rs[a].Ends.Before(rs[b].Ends) })
	f := inv.clone()
	for _, r := range rs {
		f.release(&r)
		if f.fits(head) {
			return r.Ends, f, true
		}
	}
	return time.Time{}, nil, false
}

// fits says whether j could be placed now, leaving inv as it was.
func (inv *inventory) fits(j *Job) bool {
	d, ok := inv.place(j)
	if ok {
		inv.applyDecision(j, d, -1)
	}
	return ok
}

// Feasible says whether a job could ever run on these nodes at full
// capacity; if not, the reason names what it needs and the most there is.
func Feasible(capacity []Node, j *Job) (bool, string) {
	// Decisions name groups, and are given back by name.
	seen := map[string]bool{}
	for _, g := range j.Groups {
		if seen[g.Name] {
			return false, fmt.Sprintf("group %q appears twice", g.Name)
		}
		seen[g.Name] = true
	}
	// Task drivers are left out: a node's driver may turn healthy, or a
	// node with it join, at any moment, and Nomad too keeps such a job
	// waiting rather than refusing it. The queue says why it waits.
	nodes := make([]Node, len(capacity))
	copy(nodes, capacity)
	for i := range nodes {
		nodes[i].Drivers = ""
	}
	inv := newInventory(nodes)
	if _, ok := inv.place(j); ok {
		return true, ""
	}
	return false, Shortfall(nodes, j)
}

// Shortfall explains why a job does not fit: its largest group's need and
// the most free single node among those it may use.
func Shortfall(nodes []Node, j *Job) string {
	var g *Group
	for i := range j.Groups {
		if g == nil || j.Groups[i].MemoryMB*j.Groups[i].CPU > g.MemoryMB*g.CPU {
			g = &j.Groups[i]
		}
	}
	if g == nil {
		return "job has no groups"
	}
	// A group whose drivers no node has cannot run at all, whatever the
	// room.
	for i := range j.Groups {
		gi := &j.Groups[i]
		if inPlace, with := driverCounts(nodes, j, gi); inPlace > 0 && with == 0 {
			return fmt.Sprintf("group %s needs %s, which no node in its datacenters and pool has (of %d node%s there)",
				gi.Name, missingDrivers(nodes, j, gi), inPlace, plural(inPlace))
		}
	}
	var best *Node
	eligibleNodes := 0
	for i := range nodes {
		n := &nodes[i]
		if !eligible(n, j) || !hasDrivers(n, g) {
			continue
		}
		eligibleNodes++
		// Ties go to the lower ID, so the message does not depend on the
		// nodes' order.
		if best == nil || n.MemoryMB+n.CPU > best.MemoryMB+best.CPU || (n.MemoryMB+n.CPU == best.MemoryMB+best.CPU && n.ID < best.ID) {
			best = n
		}
	}
	need := fmt.Sprintf("needs %d workers of %d MHz, %d MiB%s%s (%d in all)", g.Count, g.CPU, g.MemoryMB, devices(g.Devices), constraints(g.DeviceConstraints), j.Size())
	if best == nil {
		return need + ", but no node is in its datacenters and pool"
	}
	return fmt.Sprintf("%s; the most free of %d eligible nodes was %s with %d MHz, %d MiB%s",
		need, eligibleNodes, best.ID, best.CPU, best.MemoryMB, devices(best.Devices))
}

// missingDrivers says which of g's drivers no node j may use has
// healthy, or, where each is on some node, that none has them all.
func missingDrivers(nodes []Node, j *Job, g *Group) string {
	var missing []string
	for _, d := range g.Drivers {
		if _, with := driverCounts(nodes, j, &Group{Drivers: []string{d}}); with == 0 {
			missing = append(missing, d)
		}
	}
	if len(missing) == 0 {
		return "the " + strings.Join(g.Drivers, " and ") + " drivers healthy on one node"
	}
	s := "a healthy " + strings.Join(missing, " and ") + " driver"
	for _, d := range missing {
		if (d == "raw_exec" || d == "exec") && len(g.Drivers) > 1 {
			// The worker's own driver is there; cohort's barrier task,
			// added to groups on drivers without a start barrier, is not.
			s += " (for cohort's barrier task)"
			break
		}
	}
	return s
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

func constraints(cs map[string][]DeviceConstraint) string {
	var parts []string
	for d, list := range cs {
		for _, c := range list {
			parts = append(parts, strings.TrimSpace(fmt.Sprintf("%s %s %s %s", d, strings.TrimSuffix(strings.TrimPrefix(c.Attribute, "${"), "}"), c.Operator, c.Value)))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	sort.Strings(parts)
	return " where " + strings.Join(parts, " and ")
}

func devices(ds map[string]int) string {
	if len(ds) == 0 {
		return ""
	}
	var parts []string
	for d, c := range ds {
		parts = append(parts, fmt.Sprintf("%d× %s", c, d))
	}
	sort.Strings(parts)
	return ", " + strings.Join(parts, ", ")
}
