// Package inventory keeps the leader's free inventory current for
// admission: what Nomad reports free on each node, without the
// allocations of cohort's own gangs, less what those gangs hold by
// reservation, indexed for best fit.
//
// Rebuilding that for each admission costs O(nodes + allocations): about
// 180 ms at 50,000 nodes with four allocations each. A View instead
// applies what changed since it was last read: the nodes Nomad changed
// (a node, or an allocation on it), and the gangs that came to hold room
// or stopped holding it. An admission then costs what changed and the
// placement itself, O(log n) per worker. The View is rebuilt whole when
// the source says its change log does not reach back far enough (a new
// copy of Nomad's lists, a log restarted), which also bounds how long any
// drift could last.
package inventory

import (
	"fmt"
	"sync/atomic"

	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
)

// Source is the Nomad side; *nomad.Client is one.
type Source interface {
	// Inventory is every node placement may use with its free capacity,
	// without the allocations of the jobs in skip.
	Inventory(skip map[string]bool) ([]placement.Node, error)
	// Changed is the free capacity, computed the same way, of each node
	// changed since the cursor, of the nodes named, and of the nodes
	// where the jobs named have allocations; the zero Node for one gone
	// or unusable. all asks for a whole Inventory instead, after which
	// the cursor returned is current.
	Changed(since nomad.Cursor, nodes, jobs []string, skip func(key string) bool) (free map[string]placement.Node, next nomad.Cursor, all bool)
}

// Held is what a gang holds by reservation. The state replaces a gang's
// Decision with each new reservation and never edits one, so the pointer
// says whether the holding changed; a nil Decision says the gang holds
// nothing now. Job may be nil where the View Knows the holding already:
// only a new one needs its spec.
type Held struct {
	Key      string
	Job      *placement.Job
	Decision *placement.Decision
}

// View is the inventory kept current; it is not safe for concurrent use
// (the server calls it under its scheduling lock).
type View struct {
	src  Source
	inv  *placement.Inventory
	cur  nomad.Cursor
	held map[string]*held
	// byNode lists, per node, each held gang's workers there (indexes
	// into its decision): a changed node's free capacity is Nomad's less
	// exactly these, found without walking every worker of the gang.
	byNode map[string]map[string][]int
	mark   uint64
	// pendingNodes and pendingJobs are what Placed leaves for the next
	// Sync to read again.
	pendingNodes, pendingJobs []string
	// reads counts whole reads of the inventory (read by metrics,
	// without the caller's lock).
	reads atomic.Int64
}

// FullReads is how many times the inventory was read whole.
func (v *View) FullReads() int64 { return v.reads.Load() }

type held struct {
	job  placement.Job
	d    *placement.Decision
	mark uint64
}

// New is a View of src; its first Sync reads the inventory whole.
func New(src Source) *View {
	return &View{src: src, held: map[string]*held{}, byNode: map[string]map[string][]int{}}
}

// Knows says whether the View holds key's reservation d already.
func (v *View) Knows(key string, d *placement.Decision) bool {
	h := v.held[key]
	return h != nil && h.d == d
}

// Reset makes the next Sync read the inventory whole.
func (v *View) Reset() { v.inv = nil }

// Sync brings the inventory up to date with Nomad and with what gangs
// hold, and returns it. With complete, hs is every gang that holds room
// now, each once, and any other the View knows holds nothing; without,
// hs is only the gangs whose holding may have changed since the last
// Sync. The caller may place into the inventory: a gang it places must
// be recorded with Placed, or released from the inventory.
func (v *View) Sync(hs []Held, complete bool) (*placement.Inventory, error) {
	v.mark++
	nodes, jobs := v.pendingNodes, v.pendingJobs
	v.pendingNodes, v.pendingJobs = nil, nil
	for _, h := range hs {
		old := v.held[h.Key]
		if h.Decision == nil {
			if old != nil {
				nodes, jobs = v.letGo(h.Key, old, nodes, jobs)
			}
			continue
		}
		if old != nil && old.d == h.Decision {
			old.mark = v.mark
			continue
		}
		if h.Job == nil {
			v.inv = nil // what it holds is unknown now
			return nil, fmt.Errorf("inventory: gang %s holds a new reservation but came without its spec", h.Key)
		}
		if old != nil {
			nodes = v.unplace(h.Key, old, nodes)
		} else {
			// Its allocations in Nomad are left out from now on.
			jobs = append(jobs, h.Key)
		}
		nh := &held{job: *h.Job, d: h.Decision, mark: v.mark}
		v.held[h.Key] = nh
		nodes = v.place(h.Key, nh, nodes)
	}
	if complete {
		for key, old := range v.held {
			if old.mark != v.mark {
				nodes, jobs = v.letGo(key, old, nodes, jobs)
			}
		}
	}
	if v.inv == nil {
		return v.rebuild()
	}
	free, next, all := v.src.Changed(v.cur, nodes, jobs, v.holds)
	if all {
		return v.rebuild()
	}
	v.cur = next
	for id, pn := range free {
		if pn.ID == "" {
			v.inv.RemoveNode(id)
			continue
		}
		v.subtract(&pn)
		v.inv.SetNode(pn)
	}
	return v.inv, nil
}

// Placed records that the caller placed key's gang into the inventory
// with d: it holds that room now, as if a Sync had brought the holding,
// so that a later Sync that says it holds nothing gives the room back.
// Allocations the gang's ID still has in Nomad (an earlier run's) stop
// counting at the next Sync.
func (v *View) Placed(key string, job *placement.Job, d *placement.Decision) {
	if old := v.held[key]; old != nil {
		v.pendingNodes = v.unplace(key, old, v.pendingNodes)
	}
	h := &held{job: *job, d: d, mark: v.mark}
	v.held[key] = h
	v.place(key, h, nil)
	v.pendingJobs = append(v.pendingJobs, key)
}

// letGo forgets a gang's holding: its nodes are read again, and its
// allocations in Nomad count again.
func (v *View) letGo(key string, old *held, nodes, jobs []string) ([]string, []string) {
	nodes = v.unplace(key, old, nodes)
	delete(v.held, key)
	return nodes, append(jobs, key)
}

// holds says whether a gang holds room by reservation: its allocations
// in Nomad are then not counted, as its reservation is.
func (v *View) holds(key string) bool { return v.held[key] != nil }

// rebuild reads the inventory whole. The cursor is taken before the read,
// so a change made during it is applied again at the next Sync, which is
// harmless: a node's free capacity is always computed afresh.
func (v *View) rebuild() (*placement.Inventory, error) {
	v.inv = nil
	_, cur, _ := v.src.Changed(nomad.Cursor{}, nil, nil, nil)
	skip := make(map[string]bool, len(v.held))
	run := make([]placement.Running, 0, len(v.held))
	for key, h := range v.held {
		skip[key] = true
		run = append(run, placement.Running{Job: &h.job, Decision: *h.d})
	}
	nodes, err := v.src.Inventory(skip)
	if err != nil {
		return nil, err
	}
	v.inv, v.cur = placement.NewInventory(placement.Subtract(nodes, run)), cur
	v.reads.Add(1)
	return v.inv, nil
}

// subtract takes what held gangs' workers occupy on the node from its
// free capacity, as placement.Subtract does.
func (v *View) subtract(pn *placement.Node) {
	for key, workers := range v.byNode[pn.ID] {
		h := v.held[key]
		for _, i := range workers {
			w := &h.d.Workers[i]
			g := h.job.Group(w.Group)
			if g == nil {
				continue
			}
			pn.CPU -= g.CPU
			pn.MemoryMB -= g.MemoryMB
			for d, c := range w.Devices {
				if pn.Devices == nil {
					pn.Devices = map[string]int{}
				}
				pn.Devices[d] -= c
			}
		}
	}
}

// place files a holding's workers by node and adds their nodes to dirty.
func (v *View) place(key string, h *held, dirty []string) []string {
	for i, w := range h.d.Workers {
		m := v.byNode[w.Node]
		if m == nil {
			m = map[string][]int{}
			v.byNode[w.Node] = m
		}
		m[key] = append(m[key], i)
		dirty = append(dirty, w.Node)
	}
	return dirty
}

// unplace undoes place.
func (v *View) unplace(key string, h *held, dirty []string) []string {
	for _, w := range h.d.Workers {
		if m := v.byNode[w.Node]; m != nil {
			delete(m, key)
			if len(m) == 0 {
				delete(v.byNode, w.Node)
			}
		}
		dirty = append(dirty, w.Node)
	}
	return dirty
}
