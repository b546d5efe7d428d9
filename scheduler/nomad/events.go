package nomad

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
)

// The watcher follows Nomad's nodes and allocations through the event
// stream (topics Node and Allocation) and applies each change to its copy,
// instead of reading both lists again whenever anything changes: at
// 50,000 nodes a change costs decoding one object, not the whole cluster
// (BenchmarkChange). The copy is read whole once the subscription is up,
// so no change falls between the two; an event older than the copy is
// dropped by its modify index. Allocations garbage collected by Nomad
// raise no event: the copy is read whole again every resyncEvery, and
// after any stream error.

// resyncEvery bounds how long a garbage-collected allocation stays in the
// copy (it is terminal there, so it holds nothing).
const resyncEvery = 5 * time.Minute

// streamTopics are what the watcher subscribes to.
var streamTopics = map[api.Topic][]string{api.TopicNode: {"*"}, api.TopicAllocation: {"*"}}

// cluster is the watcher's copy of Nomad's nodes and allocations, by ID.
// Lists for FreeNodes are built from it when a change made them stale.
type cluster struct {
	nodes  map[string]*api.NodeListStub
	allocs map[string]*api.AllocationListStub
	// jobIndex is, per job key, the highest ModifyIndex of its
	// allocations.
	jobIndex map[string]uint64

	// onNode is every allocation of the copy by node and ID, and jobNodes
	// counts each job's allocations by node: one node's free capacity is
	// computed from its own allocations, and a job's by where it has any.
	onNode   map[string]map[string]*api.AllocationListStub
	jobNodes map[string]map[string]int

	// gen names this copy, and changed lists the nodes changed in it
	// (their node or one of their allocations), in order, for Changed.
	gen     uint64
	changed []string

	nodeList  []*api.NodeListStub
	allocList []*api.AllocationListStub
	stale     bool
	// unsure is set when an event could not be applied in full (an
	// allocation first seen without its resources): the lists are read
	// whole again.
	unsure bool
}

// gens numbers copies and their restarted change logs, so that a cursor
// into one is never taken for a cursor into another.
var gens atomic.Uint64

func newCluster(nodes []*api.NodeListStub, allocs []*api.AllocationListStub) *cluster {
	c := &cluster{nodes: make(map[string]*api.NodeListStub, len(nodes)), allocs: make(map[string]*api.AllocationListStub, len(allocs)),
		jobIndex: map[string]uint64{}, onNode: make(map[string]map[string]*api.AllocationListStub, len(nodes)),
		jobNodes: map[string]map[string]int{}, gen: gens.Add(1), nodeList: nodes, allocList: allocs}
	for _, n := range nodes {
		c.nodes[n.ID] = n
	}
	for _, a := range allocs {
		c.allocs[a.ID] = a
		c.file(a)
		k := placement.Key(a.Namespace, a.JobID)
		c.jobIndex[k] = max(c.jobIndex[k], a.ModifyIndex)
	}
	return c
}

// file adds a new allocation to the by-node indexes.
func (c *cluster) file(a *api.AllocationListStub) {
	m := c.onNode[a.NodeID]
	if m == nil {
		m = map[string]*api.AllocationListStub{}
		c.onNode[a.NodeID] = m
	}
	m[a.ID] = a
	k := placement.Key(a.Namespace, a.JobID)
	jn := c.jobNodes[k]
	if jn == nil {
		jn = map[string]int{}
		c.jobNodes[k] = jn
	}
	jn[a.NodeID]++
}

// unfile takes an allocation out of the by-node indexes.
func (c *cluster) unfile(a *api.AllocationListStub) {
	if m := c.onNode[a.NodeID]; m != nil {
		delete(m, a.ID)
		if len(m) == 0 {
			delete(c.onNode, a.NodeID)
		}
	}
	k := placement.Key(a.Namespace, a.JobID)
	if jn := c.jobNodes[k]; jn != nil {
		if jn[a.NodeID]--; jn[a.NodeID] <= 0 {
			delete(jn, a.NodeID)
		}
		if len(jn) == 0 {
			delete(c.jobNodes, k)
		}
	}
}

// touch logs a node as changed. A log grown past the cluster's size is
// restarted under a new generation: a reader that far behind reads the
// whole inventory again, which costs what reading the log would.
func (c *cluster) touch(node string) {
	if len(c.changed) >= 1024+len(c.nodes) {
		c.gen, c.changed = gens.Add(1), c.changed[:0]
	}
	c.changed = append(c.changed, node)
}

// Cursor is a reader's place in the copy's change log (see Changed); the
// zero Cursor is before any copy.
type Cursor struct{ Gen, Seq uint64 }

// changes lists the nodes changed since the cursor, with duplicates; all
// says the cursor is not into this copy's current log.
func (c *cluster) changes(since Cursor) ([]string, Cursor, bool) {
	now := Cursor{Gen: c.gen, Seq: uint64(len(c.changed))}
	if since.Gen != c.gen || since.Seq > now.Seq {
		return nil, now, true
	}
	return c.changed[since.Seq:], now, false
}

// changedFree is Client.Changed on this copy.
func (c *cluster) changedFree(since Cursor, nodes, jobs []string, skip func(key string) bool) (map[string]placement.Node, Cursor, bool) {
	changed, next, all := c.changes(since)
	if all {
		return nil, next, true
	}
	free := map[string]placement.Node{}
	add := func(id string) {
		if _, done := free[id]; done {
			return
		}
		pn, _ := c.free(id, skip) // the zero Node when unusable
		free[id] = pn
	}
	for _, l := range [][]string{changed, nodes} {
		for _, id := range l {
			add(id)
		}
	}
	for _, k := range jobs {
		for id := range c.jobNodes[k] {
			add(id)
		}
	}
	return free, next, false
}

// Copy is a copy of Nomad's nodes and allocations kept by their events, as
// the watcher keeps one, for replaying events without a Nomad (the
// scheduler bench does).
type Copy struct {
	mu sync.Mutex
	c  *cluster
}

// NewCopy starts a copy from the node and allocation lists.
func NewCopy(nodes []*api.NodeListStub, allocs []*api.AllocationListStub) *Copy {
	return &Copy{c: newCluster(nodes, allocs)}
}

// Apply applies one event of the Node or Allocation topic.
func (c *Copy) Apply(e *api.Event) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, err := c.c.apply(e)
	return err
}

// Inventory is Client.Inventory on the copy.
func (c *Copy) Inventory(skip map[string]bool) ([]placement.Node, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	n, a := c.c.lists()
	return FreeNodes(n, a, skip), nil
}

// Changed is Client.Changed on the copy.
func (c *Copy) Changed(since Cursor, nodes, jobs []string, skip func(key string) bool) (map[string]placement.Node, Cursor, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.c.changedFree(since, nodes, jobs, skip)
}

// free is one node's free capacity, as FreeNodes computes it, without the
// allocations of the jobs skip names; false if the node is gone or
// placement may not use it.
func (c *cluster) free(id string, skip func(key string) bool) (placement.Node, bool) {
	n := c.nodes[id]
	if n == nil {
		return placement.Node{}, false
	}
	pn, ok := nodeCapacity(n)
	if !ok {
		return pn, false
	}
	for _, a := range c.onNode[id] {
		if skip == nil || !skip(placement.Key(a.Namespace, a.JobID)) {
			takeAlloc(&pn, a)
		}
	}
	return pn, true
}

// lists are the node and allocation lists as Nomad's list endpoints would
// give them now (in no particular order).
func (c *cluster) lists() ([]*api.NodeListStub, []*api.AllocationListStub) {
	if c.stale {
		c.nodeList = make([]*api.NodeListStub, 0, len(c.nodes))
		for _, n := range c.nodes {
			c.nodeList = append(c.nodeList, n)
		}
		c.allocList = make([]*api.AllocationListStub, 0, len(c.allocs))
		for _, a := range c.allocs {
			c.allocList = append(c.allocList, a)
		}
		c.stale = false
	}
	return c.nodeList, c.allocList
}

// apply applies one event; it says whether it changed the copy.
func (c *cluster) apply(e *api.Event) (bool, error) {
	switch e.Topic {
	case api.TopicNode:
		var n *api.Node
		if err := payload(e, "Node", &n); err != nil || n == nil {
			return false, fmt.Errorf("decoding a node event: %v", err)
		}
		old, ok := c.nodes[n.ID]
		if ok && old.ModifyIndex > n.ModifyIndex {
			return false, nil // the copy is newer
		}
		if e.Type == "NodeDeregistration" {
			if !ok {
				return false, nil
			}
			delete(c.nodes, n.ID)
		} else {
			c.nodes[n.ID] = nodeStub(n)
		}
		c.touch(n.ID)
	case api.TopicAllocation:
		var a *api.Allocation
		if err := payload(e, "Allocation", &a); err != nil || a == nil {
			return false, fmt.Errorf("decoding an allocation event: %v", err)
		}
		old, ok := c.allocs[a.ID]
		if ok && old.ModifyIndex > a.ModifyIndex {
			return false, nil
		}
		s := allocStub(a)
		if ok {
			// An allocation's resources never change, and events
			// carry no job (so no version): keep what the list said.
			if s.AllocatedResources == nil {
				s.AllocatedResources = old.AllocatedResources
			}
			if a.Job == nil {
				s.JobVersion = old.JobVersion
			}
		} else if s.AllocatedResources == nil && !terminal(s) {
			c.unsure = true
		}
		if ok {
			c.unfile(old)
			if old.NodeID != s.NodeID {
				c.touch(old.NodeID)
			}
		}
		c.allocs[a.ID] = s
		c.file(s)
		c.touch(s.NodeID)
		k := placement.Key(a.Namespace, a.JobID)
		c.jobIndex[k] = max(c.jobIndex[k], a.ModifyIndex)
	default:
		return false, nil
	}
	c.stale = true
	return true, nil
}

// payload decodes an event's object by its JSON names. (The API client's
// own decoding goes by Go field names, and so loses every field whose JSON
// name differs: a device attribute's value, for one.)
func payload(e *api.Event, key string, v any) error {
	b, err := json.Marshal(e.Payload[key])
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// nodeStub is what the node list gives for n, with resources.
func nodeStub(n *api.Node) *api.NodeListStub {
	return &api.NodeListStub{
		ID: n.ID, Name: n.Name, Datacenter: n.Datacenter, NodePool: n.NodePool, NodeClass: n.NodeClass,
		Status: n.Status, StatusDescription: n.StatusDescription, Drain: n.Drain,
		SchedulingEligibility: n.SchedulingEligibility, NodeResources: n.NodeResources, Drivers: n.Drivers,
		ReservedResources: n.ReservedResources, CreateIndex: n.CreateIndex, ModifyIndex: n.ModifyIndex,
	}
}

// allocStub is what the allocation list gives for a, with resources.
func allocStub(a *api.Allocation) *api.AllocationListStub {
	s := &api.AllocationListStub{
		ID: a.ID, EvalID: a.EvalID, Name: a.Name, Namespace: a.Namespace, NodeID: a.NodeID, NodeName: a.NodeName,
		JobID: a.JobID, TaskGroup: a.TaskGroup, AllocatedResources: a.AllocatedResources,
		DesiredStatus: a.DesiredStatus, DesiredDescription: a.DesiredDescription,
		ClientStatus: a.ClientStatus, ClientDescription: a.ClientDescription,
		CreateIndex: a.CreateIndex, ModifyIndex: a.ModifyIndex, CreateTime: a.CreateTime, ModifyTime: a.ModifyTime,
	}
	if a.Job != nil && a.Job.Version != nil {
		s.JobVersion = *a.Job.Version
	}
	return s
}

// followCluster keeps c's copy current until ctx ends: subscribe, read
// the lists whole, then apply events; on a stream error, start over. A
// Nomad that refuses the subscription (its event broker off, or a token
// without node:read or read-job in every namespace) is followed with
// blocking queries on the two lists instead.
func (c *Client) followCluster(ctx context.Context, log hclog.Logger) {
	var b backoff
	for ctx.Err() == nil {
		err := c.followOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		var re *RefusedError
		if errors.As(err, &re) {
			log.Warn("nomad refused the event stream; following nodes and allocations with blocking queries, which read both lists whole on every change", "error", err)
			c.followLists(ctx, log)
			return
		}
		log.Warn("following nomad's event stream failed; starting over", "error", err, "in", b.next())
		b.wait(ctx)
	}
}

func (c *Client) followOnce(ctx context.Context) error {
	// Until the stream is up, Inventory asks Nomad itself.
	c.setCluster(nil)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// Subscribed from the oldest event Nomad still buffers (index 1;
	// index 0 would wait for the next change or the heartbeat, 30 s
	// away), in all namespaces (the stream sends only the namespace asked
	// for otherwise). Stream returns once Nomad sends its first event:
	// the subscription exists then, so every change after the lists are
	// read below arrives on it, and what the lists already hold (the
	// replayed past included) is dropped by its modify index.
	events, err := c.api.EventStream().Stream(sctx, streamTopics, 1, &api.QueryOptions{Namespace: "*"})
	if err != nil {
		return fmt.Errorf("subscribing to nodes and allocations: %w", refused(err))
	}
	cl, err := c.readCluster(sctx)
	if err != nil {
		return err
	}
	c.setCluster(cl)
	// The lists are read whole again now and then, in this goroutine so
	// that no event is applied to a copy the new read then replaces:
	// Nomad raises no event when it garbage-collects an allocation.
	resync := time.NewTicker(resyncEvery)
	defer resync.Stop()
	for {
		select {
		case batch, ok := <-events:
			if !ok {
				return errors.New("the event stream closed")
			}
			if batch.Err != nil {
				return fmt.Errorf("reading the event stream: %w", batch.Err)
			}
			c.mu.Lock()
			for i := range batch.Events {
				if _, err := cl.apply(&batch.Events[i]); err != nil {
					c.mu.Unlock()
					return err
				}
			}
			c.mu.Unlock()
			if !cl.unsure {
				continue
			}
		case <-resync.C:
		}
		if cl, err = c.readCluster(sctx); err != nil {
			return err
		}
		c.setCluster(cl)
	}
}

func (c *Client) setCluster(cl *cluster) {
	c.mu.Lock()
	c.cluster = cl
	c.mu.Unlock()
}

// readCluster reads the node and allocation lists whole.
func (c *Client) readCluster(ctx context.Context) (*cluster, error) {
	nodes, allocs, err := c.readLists(ctx)
	if err != nil {
		return nil, err
	}
	return newCluster(nodes, allocs), nil
}

// followLists follows both lists with blocking queries, each change read
// whole: the way without the event stream.
func (c *Client) followLists(ctx context.Context, log hclog.Logger) {
	var (
		mu     sync.Mutex
		nodes  []*api.NodeListStub
		allocs []*api.AllocationListStub
	)
	publish := func() {
		if nodes != nil && allocs != nil {
			c.setCluster(newCluster(nodes, allocs))
		}
	}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		follow(ctx, log.Named("nodes"), func(q *api.QueryOptions) (uint64, error) {
			q.Params = resources
			ns, meta, err := c.api.Nodes().List(q.WithContext(ctx))
			if err != nil {
				return 0, err
			}
			mu.Lock()
			nodes = ns
			publish()
			mu.Unlock()
			return meta.LastIndex, nil
		})
	}()
	go func() {
		defer wg.Done()
		follow(ctx, log.Named("allocations"), func(q *api.QueryOptions) (uint64, error) {
			q.Params, q.Namespace = resources, "*"
			as, meta, err := c.api.Allocations().List(q.WithContext(ctx))
			if err != nil {
				return 0, err
			}
			mu.Lock()
			allocs = as
			publish()
			mu.Unlock()
			return meta.LastIndex, nil
		})
	}()
	wg.Wait()
}
