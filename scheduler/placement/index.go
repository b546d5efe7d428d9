package placement

// The best-fit index: an inventory that places many jobs (the scheduler's
// long-lived one, a scheduling pass) keeps its nodes, per datacenter and
// pool, in a treap ordered by fit (free memory, then free CPU, then ID)
// where each subtree knows the most CPU free on any of its nodes. The
// tightest node that fits a worker is then the first in that order with
// enough memory and CPU: one descent, O(log n) expected, instead of a scan
// of every node. A taken or released worker moves its node in the order
// (remove, change, insert), also O(log n).
//
// Nodes are indexed apart by their task drivers too, so a group whose
// driver only some nodes have (microvm, on the hosts with KVM) descends
// only theirs. Device requests and per-node limits are checked on the
// nodes the descent reaches; a node that fails them costs one more
// branch, so a group whose devices only a few nodes have costs more than
// one that runs anywhere, bounded by the nodes with enough memory and CPU
// ahead of the first that fits.

const nilNode = int32(-1)

// part is the nodes of one datacenter and pool with one set of task
// drivers.
type part struct {
	dc, pool, drivers string
	root              int32
}

// treap is the index over an inventory's nodes; slices are by node.
type treap struct {
	parts  map[string]*part
	partOf []*part
	left   []int32
	right  []int32
	pri    []uint32
	maxCPU []int
	// seed draws the priorities of nodes added later.
	seed uint32
}

// nextPri draws a priority (xorshift): priorities need only be
// independent of the keys.
func (t *treap) nextPri() uint32 {
	t.seed ^= t.seed << 13
	t.seed ^= t.seed >> 17
	t.seed ^= t.seed << 5
	return t.seed
}

// part is the part of node n's datacenter, pool and drivers, made if new.
func (t *treap) part(n *Node) *part {
	k := n.Datacenter + "\x00" + n.Pool + "\x00" + n.Drivers
	p := t.parts[k]
	if p == nil {
		p = &part{dc: n.Datacenter, pool: n.Pool, drivers: n.Drivers, root: nilNode}
		t.parts[k] = p
	}
	return p
}

// grow makes room for one more node, not yet in any part.
func (t *treap) grow() {
	t.partOf = append(t.partOf, nil)
	t.left = append(t.left, nilNode)
	t.right = append(t.right, nilNode)
	t.pri = append(t.pri, t.nextPri())
	t.maxCPU = append(t.maxCPU, 0)
}

// tighter is the fit order: less free memory first, then less free CPU,
// then the lower ID, so ties are broken the same way by every
// implementation.
func tighter(a, b *Node) bool {
	if a.MemoryMB != b.MemoryMB {
		return a.MemoryMB < b.MemoryMB
	}
	if a.CPU != b.CPU {
		return a.CPU < b.CPU
	}
	return a.ID < b.ID
}

// buildIndex indexes the inventory's nodes.
func (inv *inventory) buildIndex() {
	n := len(inv.nodes)
	t := &treap{
		parts:  map[string]*part{},
		partOf: make([]*part, n),
		left:   make([]int32, n),
		right:  make([]int32, n),
		pri:    make([]uint32, n),
		maxCPU: make([]int, n),
	}
	t.seed = 2463534242
	for i := range inv.nodes {
		t.pri[i] = t.nextPri()
		t.left[i], t.right[i] = nilNode, nilNode
		if nd := &inv.nodes[i]; nd.ID != "" {
			t.partOf[i] = t.part(nd)
		}
	}
	inv.idx = t
	for i := range inv.nodes {
		if p := t.partOf[i]; p != nil {
			p.root = inv.insert(p.root, int32(i))
		}
	}
}

// clone copies the index for a copy of its inventory's nodes: O(n), where
// building one is O(n log n).
func (t *treap) clone() *treap {
	c := &treap{
		parts:  make(map[string]*part, len(t.parts)),
		partOf: make([]*part, len(t.partOf)),
		left:   append([]int32(nil), t.left...),
		right:  append([]int32(nil), t.right...),
		pri:    append([]uint32(nil), t.pri...),
		maxCPU: append([]int(nil), t.maxCPU...),
		seed:   t.seed,
	}
	same := make(map[*part]*part, len(t.parts))
	for k, p := range t.parts {
		cp := *p
		c.parts[k], same[p] = &cp, &cp
	}
	for i, p := range t.partOf {
		c.partOf[i] = same[p]
	}
	return c
}

func (inv *inventory) update(x int32) {
	t := inv.idx
	m := inv.nodes[x].CPU
	if l := t.left[x]; l != nilNode {
		m = max(m, t.maxCPU[l])
	}
	if r := t.right[x]; r != nilNode {
		m = max(m, t.maxCPU[r])
	}
	t.maxCPU[x] = m
}

// split cuts a subtree into the nodes tighter than x and the rest.
func (inv *inventory) split(root, x int32) (int32, int32) {
	if root == nilNode {
		return nilNode, nilNode
	}
	t := inv.idx
	if tighter(&inv.nodes[root], &inv.nodes[x]) {
		a, b := inv.split(t.right[root], x)
		t.right[root] = a
		inv.update(root)
		return root, b
	}
	a, b := inv.split(t.left[root], x)
	t.left[root] = b
	inv.update(root)
	return a, root
}

func (inv *inventory) merge(a, b int32) int32 {
	t := inv.idx
	if a == nilNode {
		return b
	}
	if b == nilNode {
		return a
	}
	if t.pri[a] > t.pri[b] {
		t.right[a] = inv.merge(t.right[a], b)
		inv.update(a)
		return a
	}
	t.left[b] = inv.merge(a, t.left[b])
	inv.update(b)
	return b
}

func (inv *inventory) insert(root, x int32) int32 {
	t := inv.idx
	if root == nilNode {
		t.left[x], t.right[x] = nilNode, nilNode
		inv.update(x)
		return x
	}
	if t.pri[x] > t.pri[root] {
		t.left[x], t.right[x] = inv.split(root, x)
		inv.update(x)
		return x
	}
	return inv.below(root, x, inv.insert)
}

// remove takes x out of the subtree; x's key must not have changed since
// it was inserted.
func (inv *inventory) remove(root, x int32) int32 {
	t := inv.idx
	if root == x {
		return inv.merge(t.left[x], t.right[x])
	}
	return inv.below(root, x, inv.remove)
}

// below applies op to the subtree of root on x's side and returns root.
func (inv *inventory) below(root, x int32, op func(root, x int32) int32) int32 {
	t := inv.idx
	if tighter(&inv.nodes[x], &inv.nodes[root]) {
		t.left[root] = op(t.left[root], x)
	} else {
		t.right[root] = op(t.right[root], x)
	}
	inv.update(root)
	return root
}

// first is the tightest node of the subtree with at least mem MiB and cpu
// MHz free that ok accepts, or nilNode.
func (inv *inventory) first(root int32, mem, cpu int, ok func(int) bool) int32 {
	t := inv.idx
	for root != nilNode && t.maxCPU[root] >= cpu {
		n := &inv.nodes[root]
		if n.MemoryMB < mem {
			// Everything to the left has even less memory.
			root = t.right[root]
			continue
		}
		if x := inv.first(t.left[root], mem, cpu, ok); x != nilNode {
			return x
		}
		if n.CPU >= cpu && ok(int(root)) {
			return root
		}
		root = t.right[root]
	}
	return nilNode
}

// bestIndexed is bestLinear through the index.
func (inv *inventory) bestIndexed(j *Job, g *Group, ok func(int) bool) int {
	best := nilNode
	for _, p := range inv.idx.parts {
		if key := (Node{Datacenter: p.dc, Pool: p.pool, Drivers: p.drivers}); !eligible(&key, j) || !hasDrivers(&key, g) {
			continue
		}
		x := inv.first(p.root, g.MemoryMB, g.CPU, ok)
		if x != nilNode && (best == nilNode || tighter(&inv.nodes[x], &inv.nodes[best])) {
			best = x
		}
	}
	return int(best)
}
