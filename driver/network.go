package driver

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"
)

// tapPrefix marks the taps this driver owns; the rest of the name is the
// VM's host index in the subnet, so a tap alone says which address it holds.
const tapPrefix = "ct"

// network owns a bridge inside a dedicated network namespace and hands each
// VM a tap on it and an address from the subnet. The namespace is the
// isolation: it has no route to the host's namespace, so a worker reaches
// other workers and nothing else on the node.
type network struct {
	cfg    NetworkConfig
	subnet *net.IPNet
	gw     net.IP
	log    hclog.Logger

	mu   sync.Mutex
	used map[uint32]bool
}

// NSPath is the namespace's path, for nsenter --net.
func (n *network) NSPath() string { return "/run/netns/" + n.cfg.NetNS }

func (n *network) ip(args ...string) (string, error) {
	full := append([]string{"-n", n.cfg.NetNS}, args...)
	out, err := exec.Command("ip", full...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("ip %s: %v: %s", strings.Join(full, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// setupNetwork creates the namespace and bridge if missing and removes taps
// that no VM holds any more (left by a crash of the plugin).
func setupNetwork(cfg NetworkConfig, log hclog.Logger) (*network, error) {
	_, subnet, err := net.ParseCIDR(cfg.Subnet)
	if err != nil {
		return nil, err
	}
	n := &network{cfg: cfg, subnet: subnet, log: log, used: map[uint32]bool{}}
	n.gw = n.addr(1)
	if _, err := os.Stat(n.NSPath()); err != nil {
		if out, err := exec.Command("ip", "netns", "add", cfg.NetNS).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("creating network namespace %s: %v: %s", cfg.NetNS, err, out)
		}
	}
	if _, err := n.ip("link", "show", cfg.Bridge); err != nil {
		if _, err := n.ip("link", "add", cfg.Bridge, "type", "bridge"); err != nil {
			return nil, err
		}
	}
	ones, _ := subnet.Mask.Size()
	n.ip("addr", "add", n.gw.String()+"/"+strconv.Itoa(ones), "dev", cfg.Bridge) // exists after a restart
	if _, err := n.ip("link", "set", cfg.Bridge, "up"); err != nil {
		return nil, err
	}
	n.ip("link", "set", "lo", "up")

	links, err := n.links()
	if err != nil {
		return nil, err
	}
	for _, l := range links {
		idx, ok := tapIndex(l.Name)
		if !ok {
			continue
		}
		if l.attached() {
			n.used[idx] = true
			continue
		}
		log.Info("removing tap no VM holds", "tap", l.Name)
		n.ip("link", "del", l.Name)
	}
	return n, nil
}

type link struct {
	Name  string   `json:"ifname"`
	Flags []string `json:"flags"`
}

// attached: a tap whose VMM has it open has a carrier.
func (l link) attached() bool {
	for _, f := range l.Flags {
		if f == "NO-CARRIER" {
			return false
		}
	}
	return true
}

func (n *network) links() ([]link, error) {
	out, err := n.ip("-j", "link", "show")
	if err != nil {
		return nil, err
	}
	var ls []link
	if err := json.Unmarshal([]byte(out), &ls); err != nil {
		return nil, fmt.Errorf("parsing ip -j link: %w", err)
	}
	return ls, nil
}

// Taps lists the taps this driver owns, for leak checks.
func (n *network) Taps() ([]string, error) {
	ls, err := n.links()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range ls {
		if _, ok := tapIndex(l.Name); ok {
			out = append(out, l.Name)
		}
	}
	return out, nil
}

func tapIndex(name string) (uint32, bool) {
	if !strings.HasPrefix(name, tapPrefix) {
		return 0, false
	}
	v, err := strconv.ParseUint(name[len(tapPrefix):], 16, 32)
	return uint32(v), err == nil
}

func (n *network) addr(idx uint32) net.IP {
	base := binary.BigEndian.Uint32(n.subnet.IP.To4())
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
}

// allocate picks the lowest free address and creates its tap.
func (n *network) allocate() (*lease, error) {
	ones, bits := n.subnet.Mask.Size()
	size := uint32(1) << uint(bits-ones)
	n.mu.Lock()
	var idx uint32
	for i := uint32(2); i < size-1; i++ {
		if !n.used[i] {
			idx = i
			n.used[i] = true
			break
		}
	}
	n.mu.Unlock()
	if idx == 0 {
		return nil, fmt.Errorf("network %s has no free address", n.cfg.Subnet)
	}
	l := n.leaseFor(idx)
	if _, err := n.ip("tuntap", "add", "dev", l.Tap, "mode", "tap"); err != nil {
		n.free(idx)
		return nil, err
	}
	if _, err := n.ip("link", "set", l.Tap, "master", n.cfg.Bridge, "up"); err != nil {
		n.ip("link", "del", l.Tap)
		n.free(idx)
		return nil, err
	}
	return l, nil
}

func (n *network) leaseFor(idx uint32) *lease {
	ip := n.addr(idx)
	ones, _ := n.subnet.Mask.Size()
	return &lease{
		Tap:     fmt.Sprintf("%s%08x", tapPrefix, idx),
		Address: fmt.Sprintf("%s/%d", ip, ones),
		IP:      ip.String(),
		Gateway: n.gw.String(),
		MAC:     fmt.Sprintf("02:cb:%02x:%02x:%02x:%02x", ip[0], ip[1], ip[2], ip[3]),
	}
}

// claim marks a recovered VM's lease as in use.
func (n *network) claim(l *lease) {
	if idx, ok := tapIndex(l.Tap); ok {
		n.mu.Lock()
		n.used[idx] = true
		n.mu.Unlock()
	}
}

// release deletes the tap and frees its address.
func (n *network) release(l *lease) {
	idx, ok := tapIndex(l.Tap)
	if !ok {
		return
	}
	if _, err := n.ip("link", "del", l.Tap); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
		n.log.Warn("removing tap", "tap", l.Tap, "error", err)
	}
	n.free(idx)
}

func (n *network) free(idx uint32) {
	n.mu.Lock()
	delete(n.used, idx)
	n.mu.Unlock()
}
