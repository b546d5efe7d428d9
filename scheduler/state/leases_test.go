package state

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func leaseCmd(node, addr string, at time.Time) *Command {
	return &Command{Op: OpLease, At: at, Lease: &Lease{Node: node, Address: addr}, Range: "10.213.0.0/22", Prefix: 24}
}

// Nodes get distinct subnets; a node that comes back gets its own, even
// from another address; an idle node's subnet goes to another only after
// the reclaim time, and a full range says so.
func TestLeases(t *testing.T) {
	s := New()
	got := map[string]string{}
	for i, n := range []string{"a", "b", "c", "d"} {
		r := s.Apply(leaseCmd(n, fmt.Sprintf("192.168.0.%d", i+1), t0))
		if r.Err != "" {
			t.Fatal(r.Err)
		}
		got[n] = r.Lease.Subnet
	}
	if got["a"] != "10.213.0.0/24" || got["d"] != "10.213.3.0/24" || len(map[string]bool{got["a"]: true, got["b"]: true, got["c"]: true, got["d"]: true}) != 4 {
		t.Fatalf("subnets %v", got)
	}
	idx := s.Leases.Index
	r := s.Apply(leaseCmd("b", "192.168.0.2", t0.Add(time.Hour)))
	if r.Lease.Subnet != got["b"] || s.Leases.Index != idx {
		t.Errorf("a renewal moved the lease or the index: %+v", r.Lease)
	}
	r = s.Apply(leaseCmd("b", "192.168.7.7", t0.Add(2*time.Hour)))
	if r.Lease.Subnet != got["b"] || s.Leases.Index == idx {
		t.Errorf("a node back from another address: %+v (index %d)", r.Lease, s.Leases.Index)
	}
	if r := s.Apply(leaseCmd("e", "192.168.0.5", t0.Add(time.Hour))); !strings.Contains(r.Err, "no free /24") {
		t.Errorf("a full range: %+v", r)
	}
	// a, c and d idle since t0; past the reclaim time the longest idle
	// gives way.
	r = s.Apply(leaseCmd("e", "192.168.0.5", t0.Add(25*time.Hour)))
	if r.Err != "" || r.Lease.Subnet != got["a"] {
		t.Errorf("reclaim: %+v", r)
	}
	if _, ok := s.Leases.ByNode["a"]; ok {
		t.Error("the reclaimed lease is still there")
	}
	if !s.Leases.ByNode["b"].ActiveAt(t0.Add(2*time.Hour+30*time.Second), DefaultLeaseTerms) || s.Leases.ByNode["c"].ActiveAt(t0.Add(2*time.Hour), DefaultLeaseTerms) {
		t.Error("activity")
	}
	s.Apply(&Command{Op: OpRelease, Lease: &Lease{Node: "b"}})
	if _, ok := s.Leases.ByNode["b"]; ok {
		t.Error("release")
	}
	if r := s.Apply(&Command{Op: OpLease, At: t0, Lease: &Lease{Node: "x", Address: "not-an-ip"}}); r.Err == "" {
		t.Error("a lease for a bad address")
	}
	c := s.Clone()
	s.Apply(leaseCmd("z", "192.168.0.9", t0.Add(48*time.Hour)))
	if _, ok := c.Leases.ByNode["z"]; ok {
		t.Error("the clone shares its leases")
	}
}

// A node that routes a subnet already gets it back when it is free, and
// is refused (never handed another) when another node holds it.
func TestLeaseAsksForItsSubnet(t *testing.T) {
	s := New()
	c := leaseCmd("back", "192.168.0.9", t0)
	c.Lease.Subnet = "10.213.2.0/24"
	if r := s.Apply(c); r.Err != "" || r.Lease.Subnet != "10.213.2.0/24" {
		t.Fatalf("asking for a free subnet: %+v", r)
	}
	other := leaseCmd("other", "192.168.0.8", t0)
	other.Lease.Subnet = "10.213.2.0/24"
	if r := s.Apply(other); !strings.Contains(r.Err, "is leased to node back") {
		t.Errorf("asking for a held subnet: %+v", r)
	}
	moved := leaseCmd("back", "192.168.0.9", t0)
	moved.Lease.Subnet = "10.213.3.0/24"
	if r := s.Apply(moved); !strings.Contains(r.Err, "holds 10.213.2.0/24") {
		t.Errorf("a node asking for another subnet than it holds: %+v", r)
	}
	for _, bad := range []string{"10.214.0.0/24", "10.213.2.0/23", "10.213.2.7/24"} {
		c := leaseCmd("x-"+bad, "192.168.0.7", t0)
		c.Lease.Subnet = bad
		if r := s.Apply(c); !strings.Contains(r.Err, "is not a /24") {
			t.Errorf("asking for %s: %+v", bad, r)
		}
	}
}
