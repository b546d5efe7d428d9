package driver

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/hashicorp/go-hclog"
	"github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// inNetNS runs f on a locked thread inside a new network namespace, and
// skips the test when it cannot (not root).
func inNetNS(t testing.TB, f func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Skipf("cannot create a network namespace: %v", err)
	}
	defer func() {
		netns.Set(orig)
		ns.Close()
	}()
	f()
}

// Routes follow the lease table: one to every other active node's subnet
// via its address; a node that goes inactive or leaves loses its route;
// routes the driver does not own are left alone.
func TestRoutesFollowLeases(t *testing.T) {
	inNetNS(t, func() {
		lo, _ := netlink.LinkByName("lo")
		netlink.LinkSetUp(lo)
		// A veth pair stands for the host's link to its peers.
		uplink := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "uplink"}, PeerName: "peer"}
		if err := netlink.LinkAdd(uplink); err != nil {
			t.Fatal(err)
		}
		peer, _ := netlink.LinkByName("peer")
		netlink.LinkSetUp(peer)
		netlink.LinkSetUp(uplink)
		netlink.AddrAdd(uplink, &netlink.Addr{IPNet: &net.IPNet{IP: net.ParseIP("192.168.5.10"), Mask: net.CIDRMask(24, 32)}})
		_, foreign, _ := net.ParseCIDR("172.16.0.0/16")
		netlink.RouteAdd(&netlink.Route{Dst: foreign, Gw: net.ParseIP("192.168.5.1")})

		_, subnet, _ := net.ParseCIDR("10.213.1.0/24")
		_, rng, _ := net.ParseCIDR("10.213.0.0/16")
		n := &network{cfg: NetworkConfig{Bridge: "cohort0"}, subnet: subnet, rng: rng, gw: net.ParseIP("10.213.1.1"), log: hclog.NewNullLogger()}
		if _, err := exec.LookPath("nft"); err != nil {
			t.Skip("nft is not installed")
		}
		table := api.LeaseTable{Index: 1, Leases: []api.Lease{
			{Node: "self", Address: "192.168.5.10", Subnet: "10.213.1.0/24", Active: true},
			{Node: "b", Address: "192.168.5.11", Subnet: "10.213.2.0/24", Active: true},
			{Node: "c", Address: "192.168.5.12", Subnet: "10.213.3.0/24", Active: true},
			{Node: "d", Address: "192.168.5.13", Subnet: "10.213.4.0/24", Active: false},
		}}
		if err := n.sync(table); err != nil {
			t.Fatal(err)
		}
		if got := ours(t); got != "10.213.2.0/24 via 192.168.5.11,10.213.3.0/24 via 192.168.5.12" {
			t.Errorf("routes: %s", got)
		}
		// c leaves; b moves to another address.
		table.Leases = table.Leases[:2]
		table.Leases[1].Address = "192.168.5.21"
		if err := n.sync(table); err != nil {
			t.Fatal(err)
		}
		if got := ours(t); got != "10.213.2.0/24 via 192.168.5.21" {
			t.Errorf("routes after c left and b moved: %s", got)
		}
		all, _ := netlink.RouteList(nil, netlink.FAMILY_V4)
		kept := false
		for _, r := range all {
			kept = kept || (r.Dst != nil && r.Dst.String() == "172.16.0.0/16")
		}
		if !kept {
			t.Error("a route the driver does not own was removed")
		}
		out, _ := exec.Command("nft", "list", "set", "inet", "cohort_cohort0", "hosts").CombinedOutput()
		if !strings.Contains(string(out), "192.168.5.21") || strings.Contains(string(out), "192.168.5.12") {
			t.Errorf("the firewall's hosts do not follow the table:\n%s", out)
		}
	})
}

func ours(t *testing.T) string {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routeProto}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprintf("%s via %s", r.Dst, r.Gw))
	}
	return strings.Join(out, ",")
}

// The workers' resolver sends *.consul to Consul, other names upstream
// only with egress, and refuses them without; reverse lookups of the
// workers' addresses and queries of several questions never leave it.
func TestDNSForwarder(t *testing.T) {
	var mu sync.Mutex
	var asked []string // what the stand-in for Consul and upstream heard
	consul := &dns.Server{Addr: "127.0.0.1:0", Net: "udp", Handler: dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		mu.Lock()
		asked = append(asked, r.Question[0].Name)
		mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(r)
		rr, _ := dns.NewRR(r.Question[0].Name + " 0 IN A 10.213.1.2")
		m.Answer = append(m.Answer, rr)
		w.WriteMsg(m)
	})}
	started := make(chan struct{})
	consul.NotifyStartedFunc = func() { close(started) }
	go consul.ListenAndServe()
	<-started
	defer consul.Shutdown()
	caddr := consul.PacketConn.LocalAddr().String()

	for _, egress := range []bool{false, true} {
		l, _ := net.ListenPacket("udp", "127.0.0.1:0")
		addr := l.LocalAddr().String()
		l.Close()
		_, workers, _ := net.ParseCIDR("10.213.0.0/16")
		f, err := startDNS(addr, caddr, workers, egress, hclog.NewNullLogger())
		if err != nil {
			t.Fatal(err)
		}
		f.upstream = []string{caddr} // stands for the host's resolver
		c := &dns.Client{Timeout: 2 * time.Second}
		for _, q := range []struct {
			name string
			want int
		}{
			{"w0.sort.service.consul.", dns.RcodeSuccess},
			{"example.com.", map[bool]int{false: dns.RcodeRefused, true: dns.RcodeSuccess}[egress]},
			{"4.1.213.10.in-addr.arpa.", dns.RcodeNameError},
			{"1.213.10.IN-ADDR.ARPA.", dns.RcodeNameError},
			{"9.0.20.172.in-addr.arpa.", map[bool]int{false: dns.RcodeRefused, true: dns.RcodeSuccess}[egress]},
		} {
			m := new(dns.Msg)
			m.SetQuestion(q.name, dns.TypePTR)
			r, _, err := c.Exchange(m, addr)
			if err != nil || r.Rcode != q.want {
				t.Errorf("egress %v: %s: %v rcode %v, want %v", egress, q.name, err, r, q.want)
			}
		}
		m := new(dns.Msg)
		m.SetQuestion("w0.sort.service.consul.", dns.TypeA)
		m.Question = append(m.Question, dns.Question{Name: "leak.example.com.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
		if r, _, err := c.Exchange(m, addr); err != nil || r.Rcode != dns.RcodeFormatError {
			t.Errorf("egress %v: a query of two questions: %v %v", egress, err, r)
		}
		f.Close()
	}
	mu.Lock()
	defer mu.Unlock()
	for _, n := range asked {
		if strings.HasSuffix(strings.ToLower(n), ".213.10.in-addr.arpa.") || n == "leak.example.com." {
			t.Errorf("%s went past the workers' resolver", n)
		}
	}
	if len(asked) != 4 { // the .consul name twice; with egress, example.com and 172.20.0.9
		t.Errorf("the resolver passed on %v", asked)
	}
}

// TestReverseIn: the reverse names of the workers' range, whole
// addresses or parts of it, and nothing else.
func TestReverseIn(t *testing.T) {
	_, rng, _ := net.ParseCIDR("10.213.0.0/16")
	for name, want := range map[string]bool{
		"4.1.213.10.in-addr.arpa.":                true,
		"1.213.10.in-addr.arpa.":                  true,
		"213.10.in-addr.arpa.":                    true,
		"10.in-addr.arpa.":                        false, // wider than the range
		"4.1.214.10.in-addr.arpa.":                false,
		"4.1.213.11.in-addr.arpa.":                false,
		"04.1.213.10.in-addr.arpa.":               false,
		"256.1.213.10.in-addr.arpa.":              false,
		"x.1.213.10.in-addr.arpa.":                false,
		"5.4.1.213.10.in-addr.arpa.":              true, // below an address of the range
		"b._dns-sd._udp.0.1.213.10.in-addr.arpa.": true,
		"example.com.":                            false,
		"1.0.0.0.d.f.ip6.arpa.":                   false,
	} {
		if got := reverseIn(name, rng); got != want {
			t.Errorf("%s: %v, want %v", name, got, want)
		}
	}
	if reverseIn("4.1.213.10.in-addr.arpa.", nil) {
		t.Error("no range holds every address")
	}
}

// BenchmarkTap compares making a worker's tap (create, MTU, bridge, up:
// the start path; removing it is timed apart) with netlink, as the driver
// does, against running `ip` for it, as it did.
// It runs in the host's namespace (ip's children do not follow a Go
// thread into another), on a bridge of its own.
func BenchmarkTap(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	func() {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "cohortbenchbr"}}
		if err := netlink.LinkAdd(br); err != nil {
			b.Fatal(err)
		}
		defer netlink.LinkDel(br)
		b.Run("netlink", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				tap := &netlink.Tuntap{LinkAttrs: netlink.LinkAttrs{Name: "tapnl"}, Mode: netlink.TUNTAP_MODE_TAP,
					Flags: netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE}
				if err := netlink.LinkAdd(tap); err != nil {
					b.Fatal(err)
				}
				for _, f := range tap.Fds {
					f.Close()
				}
				netlink.LinkSetMTU(tap, 1500)
				netlink.LinkSetMasterByIndex(tap, br.Attrs().Index)
				netlink.LinkSetUp(tap)
				b.StopTimer()
				if err := netlink.LinkDel(tap); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
		b.Run("ip", func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				for _, args := range [][]string{
					{"tuntap", "add", "dev", "tapip", "mode", "tap", "vnet_hdr"},
					{"link", "set", "tapip", "mtu", "1500", "master", "cohortbenchbr", "up"},
				} {
					if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
						b.Fatalf("ip %v: %v %s", args, err, out)
					}
				}
				b.StopTimer()
				if out, err := exec.Command("ip", "link", "del", "tapip").CombinedOutput(); err != nil {
					b.Fatalf("ip link del: %v %s", err, out)
				}
				b.StartTimer()
			}
		})
	}()
}
