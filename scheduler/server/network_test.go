package server

import (
	"context"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
)

// Nodes lease distinct subnets through the API, concurrently; a blocked
// read of the table wakes when a subnet is granted; renewals keep a node
// active and its subnet its own.
func TestLeasesThroughTheAPI(t *testing.T) {
	h := newHarness(t)
	srv := httptest.NewServer(h.srv.Handler())
	defer srv.Close()
	c := api.NewClient(api.Config{Address: srv.URL})

	first, err := c.Lease(api.LeaseRequest{Node: "n0", Address: "192.168.1.10"})
	if err != nil || first.Subnet != "10.213.0.0/24" || first.Range != "10.213.0.0/16" {
		t.Fatalf("first lease: %v %+v", err, first)
	}
	table, _ := c.Leases(context.Background(), 0, 0)
	woke := make(chan api.LeaseTable, 1)
	go func() {
		t, _ := c.Leases(context.Background(), table.Index, 10*time.Second)
		woke <- t
	}()
	var wg sync.WaitGroup
	subnets := make([]string, 20)
	for i := range subnets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := c.Lease(api.LeaseRequest{Node: "n" + string(rune('a'+i)), Address: "192.168.1.20"})
			if err != nil {
				t.Error(err)
			}
			subnets[i] = l.Subnet
		}()
	}
	wg.Wait()
	seen := map[string]bool{first.Subnet: true}
	for _, s := range subnets {
		if seen[s] {
			t.Errorf("subnet %s leased twice", s)
		}
		seen[s] = true
	}
	select {
	case got := <-woke:
		if got.Index <= table.Index || len(got.Leases) < 2 {
			t.Errorf("the blocked read woke with %+v", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a blocked read of the table did not wake for a new lease")
	}
	again, _ := c.Lease(api.LeaseRequest{Node: "n0", Address: "192.168.1.10"})
	if again.Subnet != first.Subnet {
		t.Errorf("a renewal moved n0 from %s to %s", first.Subnet, again.Subnet)
	}
	h.advance(2 * time.Minute)
	table, _ = c.Leases(context.Background(), 0, 0)
	for _, l := range table.Leases {
		if l.Active {
			t.Errorf("%s is active two minutes after its last renewal", l.Node)
		}
	}
	for _, bad := range []string{`{"Node":"","Address":"1.2.3.4"}`, `{"Node":"x","Address":"::1"}`} {
		if rec := h.do("POST", "/v1/network/lease", bad); rec.Code != 400 {
			t.Errorf("lease %s: %d", bad, rec.Code)
		}
	}
}
