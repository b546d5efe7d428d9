package driver

import (
	"context"
	"net"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/vishvananda/netlink"
)

func tapExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// A tap is deleted only by the lease that holds it: a start that failed
// after its address was taken back and handed to another VM must not
// delete that VM's tap; the collector takes only taps no lease holds.
func TestReleaseOnlyWhatIsHeld(t *testing.T) {
	inNetNS(t, func() {
		if err := netlink.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "cohort0"}}); err != nil {
			t.Fatal(err)
		}
		_, subnet, _ := net.ParseCIDR("10.213.7.0/24")
		n := newNetwork(NetworkConfig{Bridge: "cohort0"}, nil, t.TempDir(), hclog.NewNullLogger())
		n.subnet, n.gw, n.mtu = subnet, net.ParseIP("10.213.7.1"), 1500
		close(n.ready)

		first, err := n.allocate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		// A start in flight holds its lease: the collector leaves it.
		n.releaseOrphans()
		if !tapExists(first.Tap) {
			t.Fatal("the collector took the tap of a start in flight")
		}
		n.release(first)
		if tapExists(first.Tap) {
			t.Fatal("release left the tap")
		}
		second, err := n.allocate(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if second.Tap != first.Tap {
			t.Fatalf("the freed address was not reused (%s, %s): the test needs it to be", first.Tap, second.Tap)
		}
		n.release(first) // the first start's late cleanup
		if !tapExists(second.Tap) {
			t.Fatal("a stale lease deleted the tap another VM holds")
		}
		// A tap no lease holds (left by a VM that is gone) is collected.
		stray := n.leaseFor(9)
		if err := netlink.LinkAdd(&netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: stray.Tap}, Mode: netlink.TUNTAP_MODE_TAP}); err != nil {
			t.Fatal(err)
		}
		n.releaseOrphans()
		if tapExists(stray.Tap) || !tapExists(second.Tap) {
			t.Errorf("after collecting: stray tap there %v, held tap there %v", tapExists(stray.Tap), tapExists(second.Tap))
		}
	})
}
