package devcluster

// The cluster's own little network: a bridge in the host's network
// namespace, where the servers (Consul's, Nomad's, cohort's) listen at
// its first address, and one network namespace per node joined to it by a
// veth pair, each node a host of its own with its own address, routes and
// firewall. An extra namespace can stand for a host outside the cluster.

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// devNet names everything after a tag (the Nomad server's HTTP port), so
// clusters side by side never share a name or a subnet.
type devNet struct {
	tag    int
	bridge string
	prefix string // the /24's first three octets
	// locks keep other dev networks off this one's tag and subnet while
	// it is up (see lockNet).
	locks []*os.File
}

// lock takes the network's locks, unless it holds them.
func (d *devNet) lock() error {
	if d.locks != nil {
		return nil
	}
	tag, err := lockNet(fmt.Sprintf("port-%d", d.tag), fmt.Sprintf("ports (%d)", d.tag))
	if err != nil {
		return err
	}
	subnet, err := lockNet("net-"+d.prefix, "network ("+d.prefix+".0/24)")
	if err != nil {
		tag.Close()
		return err
	}
	d.locks = []*os.File{tag, subnet}
	return nil
}

func (d *devNet) unlock() {
	for _, f := range d.locks {
		f.Close()
	}
	d.locks = nil
}

func newDevNet(tag int) *devNet {
	return &devNet{
		tag:    tag,
		bridge: fmt.Sprintf("cdb%d", tag),
		// 10.100.0.0 - 10.199.255.0: never the workers' 10.213.0.0/16.
		prefix: fmt.Sprintf("10.%d.%d", 100+(tag>>8)%100, tag&255),
	}
}

// ServerIP is where the servers listen, the bridge's address.
func (d *devNet) ServerIP() string { return d.prefix + ".1" }

func (d *devNet) hostIP(i int) string { return fmt.Sprintf("%s.%d", d.prefix, 11+i) }

// OutsideIP is the address of the host outside the cluster.
func (d *devNet) OutsideIP() string { return d.prefix + ".250" }

func (d *devNet) netns(name string) string { return fmt.Sprintf("cohort-%d-%s", d.tag, name) }

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// up creates the bridge with the servers' address. A network that
// cannot come up takes down what it made and lets go of its locks.
func (d *devNet) up() error {
	if err := d.lock(); err != nil {
		return err
	}
	d.teardown() // a cluster of the same tag that crashed
	for _, args := range [][]string{
		{"ip", "link", "add", d.bridge, "type", "bridge"},
		{"ip", "addr", "add", d.ServerIP() + "/24", "dev", d.bridge},
		{"ip", "link", "set", d.bridge, "up"},
	} {
		if err := run(args...); err != nil {
			d.down()
			return fmt.Errorf("the dev network: %w", err)
		}
	}
	return nil
}

// addHost creates a host: a namespace with eth0 at ip on the bridge and a
// default route through the bridge's address.
func (d *devNet) addHost(name, ip string) (string, error) {
	ns := d.netns(name)
	veth := fmt.Sprintf("cd%d%s", d.tag, name)
	if len(veth) > 15 {
		veth = veth[:15]
	}
	for _, args := range [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns},
		{"ip", "link", "set", veth, "master", d.bridge, "up"},
		{"ip", "-n", ns, "addr", "add", ip + "/24", "dev", "eth0"},
		{"ip", "-n", ns, "link", "set", "eth0", "up"},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "route", "add", "default", "via", d.ServerIP()},
	} {
		if err := run(args...); err != nil {
			return "", fmt.Errorf("the dev host %s: %w", name, err)
		}
	}
	return ns, nil
}

// down removes every host and the bridge, if this network holds them,
// and lets go of its locks; removing a namespace removes all it held (its
// end of the veth, the workers' bridge and taps, its routes and firewall).
func (d *devNet) down() error {
	if d.locks == nil {
		return nil // never up, or another's: nothing of it is this one's
	}
	defer d.unlock()
	return d.teardown()
}

// teardown removes the bridge and the namespaces of the network's tag.
func (d *devNet) teardown() error {
	var errs []string
	out, _ := exec.Command("ip", "netns", "list").Output()
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], fmt.Sprintf("cohort-%d-", d.tag)) {
			if err := run("ip", "netns", "del", f[0]); err != nil {
				errs = append(errs, err.Error())
			}
		}
	}
	if exec.Command("ip", "link", "show", d.bridge).Run() == nil {
		if err := run("ip", "link", "del", d.bridge); err != nil {
			errs = append(errs, err.Error())
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("removing the dev network: %s", strings.Join(errs, "; "))
	}
	return nil
}

// ServerIPFor is the servers' address of the cluster whose Nomad server
// listens on nomadHTTP: what cohort's servers advertise to its nodes, and
// so what the nodes' drivers are configured with before it starts.
func ServerIPFor(nomadHTTP int) string { return newDevNet(nomadHTTP).ServerIP() }

// Network is the dev cluster's network on its own, for tests that set
// their hosts up themselves as an operator would: a bridge holding
// ServerIP, and hosts in namespaces at HostIP(i) routed through it.
type Network struct{ d *devNet }

// NewNetwork names a network after tag, which must differ from every
// other network's and dev cluster's on this machine (a free port will do).
func NewNetwork(tag int) *Network { return &Network{newDevNet(tag)} }

// Up creates the bridge, removing a crashed network of the same tag.
func (n *Network) Up() error { return n.d.up() }

// AddHost creates a host named name at ip and returns its namespace.
func (n *Network) AddHost(name, ip string) (string, error) { return n.d.addHost(name, ip) }

// Down removes every host and the bridge.
func (n *Network) Down() error { return n.d.down() }

// ServerIP is the bridge's address, HostIP the i-th host's.
func (n *Network) ServerIP() string    { return n.d.ServerIP() }
func (n *Network) HostIP(i int) string { return n.d.hostIP(i) }
