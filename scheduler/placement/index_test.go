package placement

import (
	"fmt"
	"math/rand"
	"reflect"
	"testing"
	"time"
)

// TestIndexDecidesAsScan places and releases random gangs, one after
// another, on an indexed inventory and on one that scans every node: every
// decision and every node's free capacity must be the same, and the index
// must stay ordered with its subtree maxima right. Capacities come from a
// few values, so ties (broken by ID) are common.
func TestIndexDecidesAsScan(t *testing.T) {
	r := rand.New(rand.NewSource(3))
	for iter := 0; iter < 200; iter++ {
		var nodes []Node
		for i := 0; i < 1+r.Intn(300); i++ {
			n := node(fmt.Sprintf("n%03d", i), 1000*(1+r.Intn(4)), 1024*(1+r.Intn(4)))
			n.Datacenter = []string{"dc1", "dc1", "dc2"}[r.Intn(3)]
			n.Pool = []string{"default", "default", "gpu"}[r.Intn(3)]
			if r.Intn(8) == 0 {
				n.Devices["nvidia/gpu/H100"] = 1 + r.Intn(8)
			}
			nodes = append(nodes, n)
		}
		indexed, scanned := NewInventory(nodes), newInventory(nodes)
		type placed struct {
			j *Job
			d Decision
		}
		var live []placed
		for step := 0; step < 150; step++ {
			if len(live) > 0 && r.Intn(3) == 0 {
				k := r.Intn(len(live))
				indexed.Release(live[k].j, live[k].d)
				scanned.Release(live[k].j, live[k].d)
				live = append(live[:k], live[k+1:]...)
			} else {
				j := &Job{ID: fmt.Sprintf("j%d", step), Pool: []string{"", "default", "gpu"}[r.Intn(3)]}
				switch r.Intn(4) {
				case 0:
					j.Datacenters = []string{"dc2"}
				case 1:
					j.Datacenters = []string{"*"}
				case 2:
					j.Datacenters = []string{"dc1", "dc2"}
				}
				for g := 0; g < 1+r.Intn(2); g++ {
					grp := Group{Name: fmt.Sprint("g", g), Count: 1 + r.Intn(10), CPU: 250 * (1 + r.Intn(4)), MemoryMB: 256 * (1 + r.Intn(8)),
						DistinctHosts: r.Intn(5) == 0}
					if r.Intn(6) == 0 {
						grp.Devices = map[string]int{"gpu": 1 + r.Intn(3)}
					}
					if r.Intn(6) == 0 {
						grp.MaxPerNode = 2
					}
					j.Groups = append(j.Groups, grp)
				}
				di, oki := indexed.Place(j)
				ds, oks := scanned.Place(j)
				if oki != oks || !reflect.DeepEqual(di, ds) {
					t.Fatalf("iter %d step %d: index placed %v %+v, scan %v %+v", iter, step, oki, di, oks, ds)
				}
				if oki {
					live = append(live, placed{j, di})
				}
			}
			if !reflect.DeepEqual(indexed.nodes, scanned.nodes) {
				t.Fatalf("iter %d step %d: free capacity differs", iter, step)
			}
		}
		checkIndex(t, indexed)
	}
}

// checkIndex walks every part of the index: each holds its own nodes, in
// fit order, heap-ordered by priority, with subtree maxima right, and
// together they hold every node once.
func checkIndex(t *testing.T, inv *inventory) {
	t.Helper()
	seen := 0
	for _, p := range inv.idx.parts {
		var prev int32 = nilNode
		var walk func(x int32) int
		walk = func(x int32) int {
			if x == nilNode {
				return -1
			}
			tr := inv.idx
			for _, c := range []int32{tr.left[x], tr.right[x]} {
				if c != nilNode && tr.pri[c] > tr.pri[x] {
					t.Fatalf("node %s: child above its parent", inv.nodes[x].ID)
				}
			}
			m := max(walk(tr.left[x]), inv.nodes[x].CPU)
			if prev != nilNode && !tighter(&inv.nodes[prev], &inv.nodes[x]) {
				t.Fatalf("%s before %s out of fit order", inv.nodes[prev].ID, inv.nodes[x].ID)
			}
			if n := &inv.nodes[x]; n.Datacenter != p.dc || n.Pool != p.pool {
				t.Fatalf("node %s in the part of %s/%s", n.ID, p.dc, p.pool)
			}
			prev = x
			seen++
			m = max(m, walk(tr.right[x]))
			if tr.maxCPU[x] != m {
				t.Fatalf("node %s: subtree max %d, want %d", inv.nodes[x].ID, tr.maxCPU[x], m)
			}
			return m
		}
		walk(p.root)
	}
	if seen != len(inv.index) {
		t.Fatalf("index holds %d of %d nodes", seen, len(inv.index))
	}
}

// TestSetNodeDecidesAsRebuilt keeps an indexed inventory by deltas (nodes
// added, changed, moved between datacenters and pools, removed, gangs
// placed and released) and checks it against inventories built afresh
// from the same nodes, indexed and scanned: every decision the same, and
// the index in order after every step.
func TestSetNodeDecidesAsRebuilt(t *testing.T) {
	r := rand.New(rand.NewSource(7))
	randomNode := func(id string) Node {
		n := node(id, 1000*(1+r.Intn(4)), 1024*(1+r.Intn(4)))
		n.Datacenter = []string{"dc1", "dc1", "dc2"}[r.Intn(3)]
		n.Pool = []string{"default", "gpu"}[r.Intn(2)]
		if r.Intn(6) == 0 {
			n.Devices["nvidia/gpu/H100"] = 1 + r.Intn(4)
		}
		return n
	}
	for iter := 0; iter < 100; iter++ {
		var nodes []Node
		for i := 0; i < r.Intn(40); i++ {
			nodes = append(nodes, randomNode(fmt.Sprintf("n%03d", i)))
		}
		kept := NewInventory(nodes)
		type placed struct {
			j *Job
			d Decision
		}
		var live []placed
		for step := 0; step < 200; step++ {
			switch op := r.Intn(10); {
			case op < 3:
				kept.SetNode(randomNode(fmt.Sprintf("n%03d", r.Intn(60))))
			case op < 5:
				kept.RemoveNode(fmt.Sprintf("n%03d", r.Intn(60)))
			case op < 6 && len(live) > 0:
				k := r.Intn(len(live))
				kept.Release(live[k].j, live[k].d)
				live = append(live[:k], live[k+1:]...)
			default:
				j := &Job{ID: fmt.Sprintf("j%d", step), Pool: []string{"", "gpu"}[r.Intn(2)]}
				if r.Intn(2) == 0 {
					j.Datacenters = []string{"dc2"}
				}
				grp := Group{Name: "w", Count: 1 + r.Intn(6), CPU: 250 * (1 + r.Intn(4)), MemoryMB: 256 * (1 + r.Intn(8)), DistinctHosts: r.Intn(4) == 0}
				if r.Intn(5) == 0 {
					grp.Devices = map[string]int{"gpu": 1}
				}
				j.Groups = []Group{grp}
				now := kept.Nodes()
				dk, okk := kept.Place(j)
				di, oki := NewInventory(now).Place(j)
				ds, oks := newInventory(now).place(j)
				if okk != oki || okk != oks || !reflect.DeepEqual(dk, di) || !reflect.DeepEqual(dk, ds) {
					t.Fatalf("iter %d step %d: kept placed %v %+v, rebuilt %v %+v, scanned %v %+v", iter, step, okk, dk, oki, di, oks, ds)
				}
				if okk {
					live = append(live, placed{j, dk})
				}
			}
			checkIndex(t, kept)
			if len(kept.index) != len(kept.Nodes()) {
				t.Fatalf("iter %d step %d: %d indexed, %d nodes", iter, step, len(kept.index), len(kept.Nodes()))
			}
		}
	}
}

// BenchmarkSetNode re-indexes one changed node of an inventory of 50,000.
func BenchmarkSetNode(b *testing.B) {
	nodes := make([]Node, 50000)
	for i := range nodes {
		nodes[i] = node(fmt.Sprintf("n%05d", i), 32000, 131072)
	}
	inv := NewInventory(nodes)
	i := 0
	for b.Loop() {
		n := nodes[i%len(nodes)]
		n.MemoryMB -= 1024 * (i % 7)
		inv.SetNode(n)
		i++
	}
}

// BenchmarkPlace8 places 8-worker gangs on inventories of growing size,
// indexed and scanned, releasing each so the inventory stays as it was.
func BenchmarkPlace8(b *testing.B) {
	for _, n := range []int{1000, 10000, 50000} {
		nodes := make([]Node, n)
		for i := range nodes {
			nodes[i] = node(fmt.Sprintf("n%05d", i), 32000, 131072)
		}
		j := &Job{ID: "j", Groups: []Group{{Name: "w", Count: 8, CPU: 1000, MemoryMB: 2048}}}
		for _, mode := range []string{"indexed", "scan"} {
			inv := newInventory(nodes)
			if mode == "indexed" {
				inv.buildIndex()
			}
			b.Run(fmt.Sprintf("%s/nodes=%d", mode, n), func(b *testing.B) {
				for b.Loop() {
					d, ok := inv.Place(j)
					if !ok {
						b.Fatal("did not fit")
					}
					inv.Release(j, d)
				}
			})
		}
	}
}

// TestCloneIsIndependent: a clone of an indexed inventory decides as the
// original did, and placing on one leaves the other's index intact.
func TestCloneIsIndependent(t *testing.T) {
	var nodes []Node
	for i := 0; i < 64; i++ {
		n := node(fmt.Sprintf("n%02d", i), 1000*(1+i%4), 1024*(1+i%3))
		n.Datacenter = []string{"dc1", "dc2"}[i%2]
		nodes = append(nodes, n)
	}
	orig := NewInventory(nodes)
	j := &Job{ID: "j", Datacenters: []string{"*"}, Groups: []Group{{Name: "w", Count: 20, CPU: 500, MemoryMB: 512}}}
	c := orig.clone()
	dc, ok := c.Place(j)
	if !ok {
		t.Fatal("did not place on the clone")
	}
	checkIndex(t, c)
	checkIndex(t, orig)
	if !reflect.DeepEqual(orig.nodes, NewInventory(nodes).nodes) {
		t.Fatal("placing on a clone changed the original")
	}
	do, _ := orig.Place(j)
	if !reflect.DeepEqual(dc, do) {
		t.Fatalf("clone placed %+v, original %+v", dc, do)
	}
}

// BenchmarkSchedule50k is one leader pass at 50,000 nodes with a blocked
// head: 90 running gangs fill 45,000 nodes; the head needs 6,000, so it
// waits for the first two deadlines; 19 small gangs behind it backfill.
func BenchmarkSchedule50k(b *testing.B) {
	nodes := make([]Node, 50000)
	for i := range nodes {
		nodes[i] = node(fmt.Sprintf("n%05d", i), 1000, 2048)
	}
	var running []Running
	inv := newInventory(nodes)
	for i := 0; i < 90; i++ {
		j := job(fmt.Sprintf("r%d", i), 50, uint64(i), time.Duration(i+1)*time.Minute, Group{Name: "w", Count: 500, CPU: 1000, MemoryMB: 2048})
		d, ok := inv.place(j)
		if !ok {
			b.Fatal("running gang did not fit")
		}
		running = append(running, Running{Job: j, Decision: d, Ends: t0.Add(j.MaxRuntime)})
	}
	queue := []*Job{job("head", 90, 1, time.Hour, Group{Name: "w", Count: 6000, CPU: 1000, MemoryMB: 2048})}
	for i := 0; i < 19; i++ {
		queue = append(queue, job(fmt.Sprintf("q%d", i), 50, uint64(10+i), time.Minute, Group{Name: "w", Count: 8, CPU: 500, MemoryMB: 1024}))
	}
	free := inv.nodes
	for _, mode := range []bool{true, false} {
		b.Run(fmt.Sprintf("indexed=%v", mode), func(b *testing.B) {
			for b.Loop() {
				schedule(t0, free, running, queue, mode)
			}
		})
	}
}
