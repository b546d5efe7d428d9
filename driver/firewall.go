package driver

// The workers' firewall, one nftables table per bridge (inet
// cohort_<bridge>), replaced whole and atomically whenever what it knows
// changes (the other nodes' addresses). Workers:
//
//   - reach every worker of the cluster (the worker range) on any port;
//   - reach the host only for DNS on their gateway (the resolver);
//   - never reach a cluster host: every node's address, the cohort
//     servers', the ones listed in network.deny, the link-local range
//     (where clouds serve instance metadata), and on any other address
//     the control ports of Nomad (4646-4648), Consul (8300-8302,
//     8500-8503, 8600), cohort (4747-4749) and ssh (22); nor any other
//     node itself (its gateway address is in the worker range: each
//     node drops traffic from the worker range that reaches it from
//     anywhere but its own bridge);
//   - send only from their own address;
//   - reach the outside world (network.egress, on by default), limited to
//     network.egress_allow, through NAT to the host's address;
//   - are reached only by workers, and by replies to their own
//     connections.

import (
	"bytes"
	"fmt"
	"net"
	"net/url"
	"os/exec"
	"sort"
	"strings"
)

// resolveServers is the cohort servers' IPv4 addresses, looked up once
// (never under the network's lock: a slow resolver must not stall task
// starts).
func resolveServers(servers []string) []string {
	var out []string
	for _, s := range servers {
		u, err := url.Parse(s)
		if err != nil {
			continue
		}
		if ip := net.ParseIP(u.Hostname()).To4(); ip != nil {
			if !ip.IsLoopback() {
				out = append(out, ip.String())
			}
			continue
		}
		ips, _ := net.LookupIP(u.Hostname())
		for _, ip := range ips {
			if ip4 := ip.To4(); ip4 != nil && !ip4.IsLoopback() {
				out = append(out, ip4.String())
			}
		}
	}
	return out
}

// controlPorts are the TCP ports of the cluster's own services, closed to
// workers whatever the address.
const controlPorts = "22, 4646-4648, 4747-4749, 8300-8302, 8500-8503, 8600"

// controlUDPPorts are the UDP ones (serf gossip, DNS served by Consul).
const controlUDPPorts = "4648, 8301-8302, 8600"

// firewallLocked replaces the table with one for what the network knows
// now. The caller holds mu.
func (n *network) firewallLocked() error {
	if n.subnet == nil {
		return nil
	}
	rules := n.ruleset()
	cmd := exec.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("loading the workers' firewall: %v: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// tableName is the nftables table of this network.
func (n *network) tableName() string {
	return "cohort_" + strings.NewReplacer("-", "_", ".", "_").Replace(n.cfg.Bridge)
}

// ruleset renders the table. The caller holds mu.
func (n *network) ruleset() string {
	hosts := n.hostsLocked()
	br := n.cfg.Bridge
	rng := n.rng.String()
	var b strings.Builder
	t := n.tableName()
	// Declaring the table first makes the delete valid on the first load;
	// the whole file is one transaction.
	fmt.Fprintf(&b, "table inet %s {}\ndelete table inet %s\n", t, t)
	fmt.Fprintf(&b, "table inet %s {\n", t)
	fmt.Fprintf(&b, "  set hosts {\n    type ipv4_addr\n    flags interval\n")
	if len(hosts) > 0 {
		fmt.Fprintf(&b, "    elements = { %s }\n", strings.Join(hosts, ", "))
	}
	fmt.Fprintf(&b, "  }\n")
	fmt.Fprintf(&b, "  set egress {\n    type ipv4_addr\n    flags interval\n")
	if allow := n.egressAllow(); len(allow) > 0 {
		fmt.Fprintf(&b, "    elements = { %s }\n", strings.Join(allow, ", "))
	}
	fmt.Fprintf(&b, "  }\n")

	fmt.Fprintf(&b, "  chain input {\n    type filter hook input priority filter; policy accept;\n")
	// Workers of other nodes never reach this host, whatever address
	// they aim at (this node's gateway is in the worker range, so their
	// own node's firewall lets them send to it); the gateway serves only
	// this node's bridge.
	fmt.Fprintf(&b, "    iifname != %q ip saddr %s drop\n", br, rng)
	fmt.Fprintf(&b, "    iifname != %q ip daddr %s drop\n", br, n.gw)
	fmt.Fprintf(&b, "    iifname %q ip daddr %s udp dport 53 accept\n", br, n.gw)
	fmt.Fprintf(&b, "    iifname %q ip daddr %s tcp dport 53 accept\n", br, n.gw)
	fmt.Fprintf(&b, "    iifname %q ip daddr %s icmp type echo-request accept\n", br, n.gw)
	fmt.Fprintf(&b, "    iifname %q ct state established,related accept\n", br)
	fmt.Fprintf(&b, "    iifname %q drop\n  }\n", br)

	fmt.Fprintf(&b, "  chain forward {\n    type filter hook forward priority filter; policy accept;\n")
	fmt.Fprintf(&b, "    oifname %q ip saddr %s accept\n", br, rng)
	fmt.Fprintf(&b, "    oifname %q ct state established,related accept\n", br)
	fmt.Fprintf(&b, "    oifname %q drop\n", br)
	// A worker speaks only from its own address.
	fmt.Fprintf(&b, "    iifname %q ip saddr != %s drop\n", br, n.subnet)
	fmt.Fprintf(&b, "    iifname %q ip daddr %s accept\n", br, rng)
	fmt.Fprintf(&b, "    iifname %q ip daddr @hosts drop\n", br)
	fmt.Fprintf(&b, "    iifname %q tcp dport { %s } drop\n", br, controlPorts)
	fmt.Fprintf(&b, "    iifname %q udp dport { %s } drop\n", br, controlUDPPorts)
	if n.cfg.Egress {
		fmt.Fprintf(&b, "    iifname %q ip daddr @egress accept\n", br)
	}
	fmt.Fprintf(&b, "    iifname %q drop\n  }\n", br)

	if n.cfg.Egress {
		fmt.Fprintf(&b, "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n")
		fmt.Fprintf(&b, "    ip saddr %s ip daddr != %s oifname != %q masquerade\n  }\n", n.subnet, rng, br)
	}
	fmt.Fprintf(&b, "}\n")
	return b.String()
}

// hostsLocked are the cluster's hosts: every node's address, the cohort
// servers', this host's own and the configured deny list. The caller
// holds mu.
func (n *network) hostsLocked() []string {
	set := map[string]bool{}
	for _, l := range n.peers {
		if ip := net.ParseIP(l.Address).To4(); ip != nil {
			set[ip.String()] = true
		}
	}
	if n.address != "" {
		set[n.address] = true
	}
	for _, ip := range n.serverIPs {
		set[ip] = true
	}
	set["169.254.0.0/16"] = true // cloud instance metadata and the like
	for _, c := range n.cfg.Deny {
		if _, ipn, err := net.ParseCIDR(c); err == nil && ipn.IP.To4() != nil {
			set[ipn.String()] = true
		} else if ip := net.ParseIP(c).To4(); ip != nil {
			set[ip.String()] = true
		}
	}
	out := make([]string, 0, len(set))
	for h := range set {
		out = append(out, h)
	}
	sort.Strings(out)
	return mergeable(out)
}

// egressAllow is the egress allow-list, 0.0.0.0/0 by default.
func (n *network) egressAllow() []string {
	allow := n.cfg.EgressAllow
	if len(allow) == 0 {
		allow = []string{"0.0.0.0/0"}
	}
	var out []string
	for _, c := range allow {
		if _, ipn, err := net.ParseCIDR(c); err == nil && ipn.IP.To4() != nil {
			out = append(out, ipn.String())
		}
	}
	sort.Strings(out)
	return mergeable(out)
}

// mergeable drops entries that an earlier, wider one contains: an
// interval set refuses overlapping elements.
func mergeable(cidrs []string) []string {
	var nets []*net.IPNet
	for _, c := range cidrs {
		s := c
		if !strings.Contains(s, "/") {
			s += "/32"
		}
		if _, ipn, err := net.ParseCIDR(s); err == nil {
			nets = append(nets, ipn)
		}
	}
	sort.Slice(nets, func(a, b int) bool {
		oa, _ := nets[a].Mask.Size()
		ob, _ := nets[b].Mask.Size()
		return oa < ob
	})
	var kept []*net.IPNet
	for _, c := range nets {
		inside := false
		for _, k := range kept {
			if k.Contains(c.IP) {
				inside = true
				break
			}
		}
		if !inside {
			kept = append(kept, c)
		}
	}
	out := make([]string, len(kept))
	for i, k := range kept {
		out[i] = k.String()
	}
	sort.Strings(out)
	return out
}
