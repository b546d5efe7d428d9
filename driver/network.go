package driver

// Worker networking. Every node has a bridge in the host's network
// namespace carrying one tap per worker VM, and its own worker subnet,
// unique in the cluster: the cohort servers lease it (one Raft commit) to
// the node's stable identity, so a node that restarts gets its own back.
// Traffic between nodes is plain routing over the hosts' own network: a
// route to every other active node's subnet via that node's address, kept
// current from the servers' lease table. Nothing is encapsulated, so the
// workers' MTU is the host link's. nftables (table inet cohort_<bridge>)
// keeps the workers in: they reach every worker of the cluster on any
// port, the resolver on their gateway, and (with egress on) the outside
// world through NAT, and nothing of any cluster host.

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/hashicorp/go-hclog"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// tapPrefix marks the taps this driver owns; the rest of the name is the
// VM's host index in the subnet, so a tap alone says which address it holds.
const tapPrefix = "ct"

// routeProto marks the routes this driver owns ("cohort" in
// /etc/iproute2/rt_protos terms), so a sync removes exactly its own.
const routeProto = netlink.RouteProtocol(0x63)

// Lease renewal and table watch periods.
const (
	renewEvery = 15 * time.Second
	watchWait  = 15 * time.Second
)

// network is one node's worker network.
type network struct {
	cfg       NetworkConfig
	servers   []string
	serverIPs []string // the servers' addresses, for the firewall
	stateDir  string
	log       hclog.Logger

	mu      sync.Mutex
	ready   chan struct{} // closed once the subnet is known and the bridge up
	subnet  *net.IPNet
	rng     *net.IPNet // the cluster's worker range
	gw      net.IP
	mtu     int
	node    string // this node's lease identity
	address string // this node's host address
	peers   []api.Lease
	// used maps each address index in use to the lease that holds it:
	// a tap is deleted only by its holder. unclaimed are the taps found
	// held by VMs at start-up that no recovered task has claimed yet.
	used      map[uint32]*lease
	unclaimed map[uint32]bool
	err       error // why the network is not (or no longer) right, if so
	dns       *dnsForwarder
	// client reaches a cohort server; certNode, when the driver has a
	// node certificate, is the node it names, and the lease's identity.
	client   func(server string) *api.Client
	certNode string
}

// NetworkStatus says how the network stands, for the fingerprint.
func (n *network) Status() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case n.subnet != nil && n.err != nil:
		return n.subnet.String() + " (not renewed: " + n.err.Error() + ")"
	case n.subnet != nil:
		return n.subnet.String()
	case n.err != nil:
		return "waiting for a subnet: " + n.err.Error()
	}
	return "waiting for a subnet"
}

func newNetwork(cfg NetworkConfig, servers []string, stateDir string, log hclog.Logger) *network {
	return &network{cfg: cfg, servers: servers, stateDir: stateDir, log: log, used: map[uint32]*lease{}, unclaimed: map[uint32]bool{}, ready: make(chan struct{})}
}

// start brings the network up: the subnet (leased, or the configured
// one), the bridge, forwarding, the firewall and the resolver; then it
// keeps the lease renewed and the routes current until ctx ends. It
// returns once the network is up or, with a lease still to come, at once;
// allocate waits for it.
func (n *network) start(ctx context.Context) error {
	node, err := nodeID(n.stateDir)
	if err != nil {
		return err
	}
	n.node = node
	if n.certNode != "" {
		// The servers take a lease only from the node its certificate
		// names.
		n.node = n.certNode
	}
	n.serverIPs = resolveServers(n.servers)
	if n.cfg.Subnet != "" {
		_, subnet, err := net.ParseCIDR(n.cfg.Subnet)
		if err != nil {
			return fmt.Errorf("network subnet %q: %w", n.cfg.Subnet, err)
		}
		return n.up(subnet, subnet)
	}
	if len(n.servers) == 0 {
		return errors.New("the network needs cohort_servers to lease this node's subnet from, or a fixed subnet")
	}
	// A node that restarts routes its last subnet at once (its VMs may
	// still run on it); the servers confirm it in the background. If that
	// fails now, maintain tries again.
	if last, err := n.loadLease(); err == nil {
		_, subnet, err1 := net.ParseCIDR(last.Subnet)
		_, rng, err2 := net.ParseCIDR(last.Range)
		if err1 == nil && err2 == nil {
			n.mu.Lock()
			n.address = last.Address
			n.mu.Unlock()
			if err := n.up(subnet, rng); err != nil {
				n.setErr(err)
				n.log.Warn("bringing the saved subnet up; retrying", "subnet", subnet, "error", err)
			}
		}
	}
	go n.maintain(ctx)
	return nil
}

// up configures the host for subnet: bridge, gateway address, MTU,
// forwarding, the firewall and the resolver.
func (n *network) up(subnet, rng *net.IPNet) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.subnet != nil {
		if n.subnet.String() != subnet.String() {
			return fmt.Errorf("this node's subnet moved from %s to %s; restart the driver's node", n.subnet, subnet)
		}
		return nil
	}
	mtu, err := n.linkMTU()
	if err != nil {
		return err
	}
	gw := addr(subnet, 1)
	if err := ensureBridge(n.cfg.Bridge, gw, subnet, mtu); err != nil {
		return err
	}
	if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
		return fmt.Errorf("enabling IPv4 forwarding: %w", err)
	}
	n.subnet, n.rng, n.gw, n.mtu = subnet, rng, gw, mtu
	if err := n.firewallLocked(); err != nil {
		n.subnet = nil
		return err
	}
	if err := n.reclaimTaps(); err != nil {
		n.subnet = nil
		return err
	}
	d, err := startDNS(net.JoinHostPort(gw.String(), "53"), n.cfg.ConsulDNS, rng, n.cfg.Egress, n.log.Named("dns"))
	if err != nil {
		n.subnet = nil
		return err
	}
	n.dns = d
	close(n.ready)
	n.log.Info("worker network up", "subnet", subnet, "gateway", gw, "mtu", mtu, "bridge", n.cfg.Bridge, "egress", n.cfg.Egress)
	return nil
}

// maintain leases (then renews) this node's subnet and keeps the routes to
// the other nodes' subnets current. A renewal that fails does not stop
// the routes from following the table.
func (n *network) maintain(ctx context.Context) {
	backoff := 200 * time.Millisecond
	var index uint64
	renewed, lastWarn := time.Time{}, time.Time{}
	for i := 0; ctx.Err() == nil; i++ {
		c := n.cohortClient(n.servers[i%len(n.servers)])
		if time.Since(renewed) >= renewEvery {
			if err := n.renew(c); err != nil {
				n.setErr(err)
				if time.Since(lastWarn) > time.Minute {
					lastWarn = time.Now()
					n.log.Warn("leasing this node's subnet", "server", c.Address(), "error", err)
				}
				sleep(ctx, backoff)
				backoff = min(2*backoff, 5*time.Second)
				if !n.isUp() {
					continue
				}
			} else {
				renewed, backoff = time.Now(), 200*time.Millisecond
			}
		}
		wait := max(min(watchWait, renewEvery-time.Since(renewed)), time.Second)
		t, err := c.Leases(ctx, index, wait)
		if err != nil {
			n.log.Debug("reading the lease table", "server", c.Address(), "error", err)
			sleep(ctx, backoff)
			backoff = min(2*backoff, 5*time.Second)
			continue
		}
		index = t.Index
		if err := n.sync(t); err != nil {
			n.log.Warn("routing to the other nodes' workers", "error", err)
		}
	}
}

func (n *network) isUp() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.subnet != nil
}

func sleep(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

func (n *network) setErr(err error) {
	n.mu.Lock()
	n.err = err
	n.mu.Unlock()
}

// renew leases or renews the subnet and brings the network up with it.
// A node that routes a subnet asks for that one; the servers give it back
// or refuse, never hand it another while its workers live on it.
func (n *network) renew(c *api.Client) error {
	address := n.cfg.Advertise
	if address == "" {
		// Always from the first server: the route to it says which of a
		// multi-homed host's addresses its peers reach, and it must not
		// change with the server a renewal goes to.
		a, err := sourceAddress(n.servers[0])
		n.mu.Lock()
		switch {
		case err == nil:
			address = a
		case n.address != "":
			address = n.address
		}
		n.mu.Unlock()
		if address == "" {
			return err
		}
	}
	req := api.LeaseRequest{Node: n.node, Address: address}
	n.mu.Lock()
	if n.subnet != nil {
		req.Subnet = n.subnet.String()
	}
	n.mu.Unlock()
	l, err := c.Lease(req)
	if err != nil {
		return err
	}
	_, subnet, err := net.ParseCIDR(l.Subnet)
	if err != nil {
		return fmt.Errorf("the servers leased %q: %w", l.Subnet, err)
	}
	_, rng, err := net.ParseCIDR(l.Range)
	if err != nil {
		return fmt.Errorf("the servers' worker range %q: %w", l.Range, err)
	}
	n.mu.Lock()
	n.address = address
	n.mu.Unlock()
	if err := n.up(subnet, rng); err != nil {
		return err
	}
	n.setErr(nil)
	l.Address = address
	return n.saveLease(l)
}

// sync routes every other active node's subnet via its address, removes
// the routes of nodes gone, and refreshes the firewall's set of hosts.
func (n *network) sync(t api.LeaseTable) error {
	n.mu.Lock()
	if n.subnet == nil {
		n.mu.Unlock()
		return nil
	}
	self := n.subnet.String()
	n.peers = t.Leases
	n.mu.Unlock()
	want := map[string]net.IP{}
	for _, l := range t.Leases {
		if l.Subnet == self || !l.Active {
			continue
		}
		gw := net.ParseIP(l.Address)
		if gw == nil {
			continue
		}
		want[l.Subnet] = gw
	}
	var errs []error
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: routeProto}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		if gw, ok := want[r.Dst.String()]; ok && r.Gw.Equal(gw) {
			delete(want, r.Dst.String())
			continue
		}
		if err := netlink.RouteDel(&r); err != nil {
			errs = append(errs, fmt.Errorf("removing the route to %s: %w", r.Dst, err))
		} else {
			n.log.Info("removed the route to a node's workers", "subnet", r.Dst, "via", r.Gw)
		}
	}
	for subnet, gw := range want {
		_, dst, _ := net.ParseCIDR(subnet)
		if err := netlink.RouteReplace(&netlink.Route{Dst: dst, Gw: gw, Protocol: routeProto}); err != nil {
			errs = append(errs, fmt.Errorf("routing %s via %s: %w", subnet, gw, err))
			continue
		}
		n.log.Info("routing to a node's workers", "subnet", subnet, "via", gw)
	}
	n.mu.Lock()
	err = n.firewallLocked()
	n.mu.Unlock()
	errs = append(errs, err)
	return errors.Join(errs...)
}

// wait blocks until the network is up, ctx ends, or timeout passes.
func (n *network) wait(ctx context.Context, timeout time.Duration) error {
	select {
	case <-n.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(timeout):
		return fmt.Errorf("this node has no worker subnet yet (%s)", n.Status())
	}
}

// sourceAddress is the address this host reaches a server from: the one
// its peers can route to.
func sourceAddress(server string) (string, error) {
	u, err := url.Parse(server)
	if err != nil || u.Host == "" {
		return "", fmt.Errorf("server address %q is not a URL", server)
	}
	host := u.Hostname()
	port := u.Port()
	if port == "" {
		port = "80"
	}
	c, err := net.Dial("udp", net.JoinHostPort(host, port))
	if err != nil {
		return "", fmt.Errorf("finding the address that reaches %s: %w", host, err)
	}
	defer c.Close()
	ip := c.LocalAddr().(*net.UDPAddr).IP
	if ip.IsLoopback() {
		return "", fmt.Errorf("the cohort server %s is on this host's loopback: set network.advertise to the address other nodes reach this one at", host)
	}
	return ip.String(), nil
}

// linkMTU is the MTU of the link the host address is on: workers are
// routed over it unencapsulated, so theirs is the same.
func (n *network) linkMTU() (int, error) {
	if n.cfg.MTU > 0 {
		return n.cfg.MTU, nil
	}
	addr := n.cfg.Advertise
	if addr == "" {
		addr = n.address
	}
	if addr == "" {
		return 1500, nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return 0, fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		as, _ := netlink.AddrList(l, netlink.FAMILY_V4)
		for _, a := range as {
			if a.IP.String() == addr {
				return l.Attrs().MTU, nil
			}
		}
	}
	return 1500, nil
}

// ensureBridge creates the bridge if missing and gives it the gateway
// address and the MTU.
func ensureBridge(name string, gw net.IP, subnet *net.IPNet, mtu int) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}
		if err := netlink.LinkAdd(br); err != nil && !os.IsExist(err) {
			return fmt.Errorf("creating bridge %s: %w", name, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("bridge %s: %w", name, err)
		}
	}
	if l.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(l, mtu); err != nil {
			return fmt.Errorf("setting the MTU of %s: %w", name, err)
		}
	}
	ones, _ := subnet.Mask.Size()
	a := &netlink.Addr{IPNet: &net.IPNet{IP: gw, Mask: net.CIDRMask(ones, 32)}}
	if err := netlink.AddrReplace(l, a); err != nil {
		return fmt.Errorf("addressing bridge %s: %w", name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("bringing %s up: %w", name, err)
	}
	return nil
}

// reclaimTaps marks the taps that VMs hold as used and removes the ones
// no VM holds any more (left by a crash of the plugin). The caller holds
// mu.
func (n *network) reclaimTaps() error {
	links, err := netlink.LinkList()
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	for _, l := range links {
		idx, ok := tapIndex(l.Attrs().Name)
		if !ok {
			continue
		}
		if l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0 { // a carrier: a VMM holds it
			// A recovered task may have claimed it already (the network
			// can come up after the tasks are recovered).
			if n.used[idx] == nil {
				n.used[idx] = &lease{Tap: l.Attrs().Name}
				n.unclaimed[idx] = true
			}
			continue
		}
		n.log.Info("removing tap no VM holds", "tap", l.Attrs().Name)
		netlink.LinkDel(l)
	}
	return nil
}

// Taps lists the taps this driver owns, for leak checks.
func (n *network) Taps() ([]string, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range links {
		if _, ok := tapIndex(l.Attrs().Name); ok {
			out = append(out, l.Attrs().Name)
		}
	}
	return out, nil
}

func tapIndex(name string) (uint32, bool) {
	if !strings.HasPrefix(name, tapPrefix) || len(name) != len(tapPrefix)+8 {
		return 0, false
	}
	v, err := strconv.ParseUint(name[len(tapPrefix):], 16, 32)
	return uint32(v), err == nil
}

func addr(subnet *net.IPNet, idx uint32) net.IP {
	base := binary.BigEndian.Uint32(subnet.IP.To4())
	ip := make(net.IP, 4)
	binary.BigEndian.PutUint32(ip, base+idx)
	return ip
}

// lease is one VM's place on the network.
type lease struct {
	Tap     string
	Address string // CIDR
	IP      string
	Gateway string
	MAC     string
	MTU     int `json:",omitempty"`
}

// allocate picks the lowest free address and creates its tap, on the
// bridge.
func (n *network) allocate(ctx context.Context) (*lease, error) {
	if err := n.wait(ctx, 30*time.Second); err != nil {
		return nil, err
	}
	n.mu.Lock()
	ones, bits := n.subnet.Mask.Size()
	size := uint32(1) << uint(bits-ones)
	var idx uint32
	for i := uint32(2); i < size-1; i++ {
		if n.used[i] == nil {
			idx = i
			break
		}
	}
	l := n.leaseFor(idx)
	if idx != 0 {
		n.used[idx] = l
	}
	n.mu.Unlock()
	if idx == 0 {
		return nil, fmt.Errorf("this node's worker subnet %s has no free address", n.subnet)
	}
	br, err := netlink.LinkByName(n.cfg.Bridge)
	if err != nil {
		n.free(idx)
		return nil, fmt.Errorf("bridge %s: %w", n.cfg.Bridge, err)
	}
	tap := &netlink.Tuntap{
		LinkAttrs: netlink.LinkAttrs{Name: l.Tap},
		Mode:      netlink.TUNTAP_MODE_TAP,
		Flags:     netlink.TUNTAP_NO_PI | netlink.TUNTAP_VNET_HDR | netlink.TUNTAP_ONE_QUEUE,
	}
	if err := netlink.LinkAdd(tap); err != nil {
		n.free(idx)
		return nil, fmt.Errorf("creating tap %s: %w", l.Tap, err)
	}
	for _, f := range tap.Fds {
		f.Close() // persistent: QEMU opens it by name
	}
	err = netlink.LinkSetMTU(tap, l.MTU)
	if err == nil {
		err = netlink.LinkSetMasterByIndex(tap, br.Attrs().Index)
	}
	if err == nil {
		err = netlink.LinkSetUp(tap)
	}
	if err != nil {
		netlink.LinkDel(tap)
		n.free(idx)
		return nil, fmt.Errorf("attaching tap %s to %s: %w", l.Tap, n.cfg.Bridge, err)
	}
	return l, nil
}

func (n *network) leaseFor(idx uint32) *lease {
	ip := addr(n.subnet, idx)
	ones, _ := n.subnet.Mask.Size()
	return &lease{
		Tap:     fmt.Sprintf("%s%08x", tapPrefix, idx),
		Address: fmt.Sprintf("%s/%d", ip, ones),
		IP:      ip.String(),
		Gateway: n.gw.String(),
		MAC:     fmt.Sprintf("02:cb:%02x:%02x:%02x:%02x", ip[0], ip[1], ip[2], ip[3]),
		MTU:     n.mtu,
	}
}

// claim makes a recovered VM's lease the holder of its address, unless
// the address went to another VM meanwhile (the recovered VM had died and
// its tap was removed at start-up): then the recovered task holds nothing
// and releases nothing.
func (n *network) claim(l *lease) {
	idx, ok := tapIndex(l.Tap)
	if !ok {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if h := n.used[idx]; h != nil && !n.unclaimed[idx] {
		n.log.Warn("a recovered task's address is held by another vm; leaving it there", "tap", l.Tap)
		return
	}
	n.used[idx] = l
	delete(n.unclaimed, idx)
}

// release deletes the tap and frees its address, when l still holds
// them: a start that failed after the collector took its tap must not
// delete the tap the same address now has for another VM. The check, the
// deletion and the freeing happen under one lock, so no claim or
// allocation comes between them.
func (n *network) release(l *lease) {
	idx, ok := tapIndex(l.Tap)
	if !ok {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.used[idx] != l {
		n.log.Debug("not releasing a tap this lease no longer holds", "tap", l.Tap)
		return
	}
	if link, err := netlink.LinkByName(l.Tap); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			n.log.Warn("removing tap", "tap", l.Tap, "error", err)
		}
	}
	delete(n.used, idx)
	delete(n.unclaimed, idx)
}

func (n *network) free(idx uint32) {
	n.mu.Lock()
	delete(n.used, idx)
	n.mu.Unlock()
}

// releaseOrphans deletes the taps no lease holds: ones left by a VM that
// is gone, and ones found at start-up that no task was recovered for.
func (n *network) releaseOrphans() {
	taps, err := n.Taps()
	if err != nil {
		n.log.Warn("listing taps", "error", err)
		return
	}
	for _, t := range taps {
		idx, _ := tapIndex(t)
		n.mu.Lock()
		holder := n.used[idx]
		if holder == nil {
			holder = &lease{Tap: t}
			n.used[idx] = holder
		} else if !n.unclaimed[idx] {
			holder = nil // a task's or a start's
		}
		n.mu.Unlock()
		if holder != nil {
			n.log.Warn("removing orphaned tap", "tap", t)
			n.release(holder)
		}
	}
}

// DNS is the resolver workers use: their gateway.
func (n *network) DNS() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.gw == nil {
		return nil
	}
	return []string{n.gw.String()}
}

// stop ends the resolver; the bridge, routes and firewall stay for the
// VMs that outlive the plugin.
func (n *network) stop() {
	n.mu.Lock()
	d := n.dns
	n.mu.Unlock()
	if d != nil {
		d.Close()
	}
}

// nodeID is this node's stable identity for its lease, kept in the state
// directory.
func nodeID(stateDir string) (string, error) {
	path := filepath.Join(stateDir, "node-id")
	if b, err := os.ReadFile(path); err == nil && len(strings.TrimSpace(string(b))) > 0 {
		return strings.TrimSpace(string(b)), nil
	}
	b := make([]byte, 16)
	rand.Read(b)
	id := hex.EncodeToString(b)
	if err := os.WriteFile(path, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("saving this node's identity: %w", err)
	}
	return id, nil
}

func (n *network) leasePath() string { return filepath.Join(n.stateDir, "lease.json") }

func (n *network) loadLease() (api.Lease, error) {
	var l api.Lease
	b, err := os.ReadFile(n.leasePath())
	if err != nil {
		return l, err
	}
	return l, json.Unmarshal(b, &l)
}

func (n *network) saveLease(l api.Lease) error {
	b, _ := json.Marshal(l)
	tmp := n.leasePath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, n.leasePath())
}

func (n *network) cohortClient(server string) *api.Client {
	if n.client != nil {
		return n.client(server)
	}
	return api.NewClient(api.Config{Address: server, Timeout: 10 * time.Second})
}
