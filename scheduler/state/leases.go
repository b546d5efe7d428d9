package state

// Worker subnets. Every node running microvm workers routes its own
// subnet, carved from the cluster's worker range; the subnets must never
// overlap, and a node that restarts must get its own back (its workers'
// addresses are in Consul and in its peers' routes). The servers hand them
// out through Raft, so two nodes can never be given the same one, and
// every server answers the same table.

import (
	"encoding/binary"
	"fmt"
	"net"
	"sort"
	"time"
)

// Lease is one node's worker subnet.
type Lease struct {
	// Node is the node's own stable identity (the microvm driver keeps it
	// in its state directory), Address the host address its peers route
	// the subnet through.
	Node, Address string
	// Subnet is the CIDR; in a request, the one the node routes already.
	Subnet    string
	GrantedAt time.Time
	RenewedAt time.Time
}

// Leases is the cluster's worker range and the subnets carved from it.
type Leases struct {
	Range  string // CIDR, e.g. 10.213.0.0/16
	Prefix int    // each node's subnet, e.g. 24
	ByNode map[string]*Lease
	// Index moves whenever a subnet is granted, moved or given up (not on
	// renewals), so watchers wake only for changes that move routes.
	Index uint64
}

// LeaseTerms are how long leases live, by the servers' clock.
type LeaseTerms struct {
	// Active is how long a lease counts as its node being there without a
	// renewal: peers route to it while it is active.
	Active time.Duration
	// Reclaim is how long an idle lease keeps its subnet before another
	// node may be given it; a node back within it gets its own.
	Reclaim time.Duration
}

// DefaultLeaseTerms: nodes renew every 15 s.
var DefaultLeaseTerms = LeaseTerms{Active: time.Minute, Reclaim: 24 * time.Hour}

// DefaultWorkerRange and DefaultWorkerPrefix: up to 256 nodes of 253
// workers each.
const (
	DefaultWorkerRange  = "10.213.0.0/16"
	DefaultWorkerPrefix = 24
)

// ActiveAt says whether a lease's node counts as present at now.
func (l *Lease) ActiveAt(now time.Time, t LeaseTerms) bool { return now.Sub(l.RenewedAt) <= t.Active }

// lease grants, renews or moves a node's lease (OpLease).
func (s *State) lease(c *Command) Result {
	req := c.Lease
	if req == nil || req.Node == "" || net.ParseIP(req.Address).To4() == nil {
		return Result{Err: "a lease needs a node and the IPv4 address it is reached at"}
	}
	if s.Leases == nil || s.Leases.Range == "" {
		s.Leases = &Leases{Range: DefaultWorkerRange, Prefix: DefaultWorkerPrefix}
	}
	ls := s.Leases
	if ls.ByNode == nil {
		ls.ByNode = map[string]*Lease{}
	}
	terms := DefaultLeaseTerms
	if old, ok := ls.ByNode[req.Node]; ok {
		if req.Subnet != "" && req.Subnet != old.Subnet {
			return Result{Err: fmt.Sprintf("node %s holds %s, not the %s it routes: restart it without its saved lease", req.Node, old.Subnet, req.Subnet)}
		}
		if old.Address != req.Address {
			old.Address = req.Address
			ls.Index++
		}
		old.RenewedAt = c.At
		return Result{Lease: copyLease(old)}
	}
	_, rng, err := net.ParseCIDR(ls.Range)
	if err != nil {
		return Result{Err: fmt.Sprintf("worker range %q: %v", ls.Range, err)}
	}
	ones, bits := rng.Mask.Size()
	if ls.Prefix < ones || ls.Prefix > bits-2 {
		return Result{Err: fmt.Sprintf("worker subnets /%d do not fit the range %s", ls.Prefix, ls.Range)}
	}
	taken := map[string]*Lease{}
	for _, l := range ls.ByNode {
		taken[l.Subnet] = l
	}
	// A node that already routes a subnet (the servers lost their state,
	// or the lease was given up) asks for it back: it gets it if no other
	// node holds it, and is refused otherwise, never handed another while
	// its workers live on the old one.
	if req.Subnet != "" {
		_, want, err := net.ParseCIDR(req.Subnet)
		wantOnes, _ := want.Mask.Size()
		if err != nil || want.String() != req.Subnet || wantOnes != ls.Prefix || !rng.Contains(want.IP) {
			return Result{Err: fmt.Sprintf("subnet %q is not a /%d of the worker range %s", req.Subnet, ls.Prefix, ls.Range)}
		}
		if held, ok := taken[req.Subnet]; ok {
			return Result{Err: fmt.Sprintf("subnet %s, which node %s routes, is leased to node %s: restart node %s without its saved lease", req.Subnet, req.Node, held.Node, req.Node)}
		}
		l := &Lease{Node: req.Node, Address: req.Address, Subnet: req.Subnet, GrantedAt: c.At, RenewedAt: c.At}
		ls.ByNode[req.Node] = l
		ls.Index++
		return Result{Lease: copyLease(l)}
	}
	n := uint32(1) << uint(ls.Prefix-ones)
	base := binary.BigEndian.Uint32(rng.IP.To4())
	step := uint32(1) << uint(bits-ls.Prefix)
	subnet := ""
	var reclaim *Lease
	for i := uint32(0); i < n; i++ {
		ip := make(net.IP, 4)
		binary.BigEndian.PutUint32(ip, base+i*step)
		cidr := fmt.Sprintf("%s/%d", ip, ls.Prefix)
		held, ok := taken[cidr]
		if !ok {
			subnet = cidr
			break
		}
		// The longest idle lease past its reclaim time gives way.
		if c.At.Sub(held.RenewedAt) > terms.Reclaim && (reclaim == nil || held.RenewedAt.Before(reclaim.RenewedAt)) {
			reclaim = held
		}
	}
	if subnet == "" && reclaim != nil {
		subnet = reclaim.Subnet
		delete(ls.ByNode, reclaim.Node)
	}
	if subnet == "" {
		return Result{Err: fmt.Sprintf("the worker range %s has no free /%d subnet for another node", ls.Range, ls.Prefix)}
	}
	l := &Lease{Node: req.Node, Address: req.Address, Subnet: subnet, GrantedAt: c.At, RenewedAt: c.At}
	ls.ByNode[req.Node] = l
	ls.Index++
	return Result{Lease: copyLease(l)}
}

// release gives a node's subnet up (OpRelease): the node left for good.
func (s *State) release(c *Command) Result {
	if s.Leases == nil || c.Lease == nil {
		return Result{}
	}
	if _, ok := s.Leases.ByNode[c.Lease.Node]; ok {
		delete(s.Leases.ByNode, c.Lease.Node)
		s.Leases.Index++
	}
	return Result{}
}

// LeaseList lists the leases, by subnet.
func (s *State) LeaseList() []Lease {
	if s.Leases == nil {
		return nil
	}
	out := make([]Lease, 0, len(s.Leases.ByNode))
	for _, l := range s.Leases.ByNode {
		out = append(out, *l)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Subnet < out[b].Subnet })
	return out
}

func copyLease(l *Lease) *Lease {
	c := *l
	return &c
}
