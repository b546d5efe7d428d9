package devcluster

// The agents' configuration files.

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/internal/tlsutil"
)

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// consulServerConfig is the Consul server, in dev mode, on the bridge.
func (c *Cluster) consulServerConfig() map[string]any {
	p := c.cfg.Ports
	ip := c.net.ServerIP()
	return map[string]any{
		"datacenter":           "dc1",
		"node_name":            "cohort-dev-server",
		"bind_addr":            ip,
		"advertise_addr":       ip,
		"client_addr":          "127.0.0.1 " + ip,
		"log_level":            "INFO",
		"disable_update_check": true,
		"ports": map[string]int{
			"http": p.ConsulHTTP, "dns": p.ConsulDNS, "server": p.ConsulServer,
			"serf_lan": p.ConsulSerfLAN, "serf_wan": p.ConsulSerfWAN, "grpc": p.ConsulGRPC,
			"grpc_tls": -1, // dev mode's default 8503 would clash between clusters
		},
		"ui_config": map[string]bool{"enabled": true},
	}
}

// consulClientConfig is a node's Consul agent, in the node's namespace on
// the usual ports.
func (c *Cluster) consulClientConfig(n *Node) map[string]any {
	return map[string]any{
		"datacenter":           "dc1",
		"node_name":            n.Name,
		"data_dir":             filepath.Join(n.Dir, "consul"),
		"bind_addr":            n.IP,
		"advertise_addr":       n.IP,
		"client_addr":          "127.0.0.1",
		"retry_join":           []string{c.net.ServerIP() + ":" + strconv.Itoa(c.cfg.Ports.ConsulSerfLAN)},
		"log_level":            "INFO",
		"disable_update_check": true,
		"ports":                map[string]int{"grpc": 8502, "grpc_tls": -1},
	}
}

// nomadServerConfig is the Nomad server, on the bridge and loopback.
func (c *Cluster) nomadServerConfig() string {
	p := c.cfg.Ports
	ip := c.net.ServerIP()
	return fmt.Sprintf(`
name       = "cohort-dev-server"
datacenter = "dc1"
data_dir   = %q
bind_addr  = "0.0.0.0"
log_level  = "INFO"
disable_update_check = true

ports {
  http = %d
  rpc  = %d
  serf = %d
}

advertise {
  http = %q
  rpc  = %q
  serf = %q
}

server {
  enabled          = true
  bootstrap_expect = 1
}

consul {
  address = "127.0.0.1:%d"
}
%s`, filepath.Join(c.cfg.DataDir, "nomad-server"), p.NomadHTTP, p.NomadRPC, p.NomadSerf, ip, ip, ip, p.ConsulHTTP, c.nomadTLSBlock(c.tlsFor(true)))
}

// nomadClientConfig is a node's Nomad client, in the node's namespace.
func (c *Cluster) nomadClientConfig(n *Node) string {
	return fmt.Sprintf(`
name       = %q
datacenter = "dc1"
data_dir   = %q
plugin_dir = %q
bind_addr  = %q
log_level  = "INFO"
disable_update_check = true

client {
  enabled           = true
  servers           = ["%s:%d"]
  network_interface = "eth0"
  gc_max_allocs     = 200
}

consul {
  address = "127.0.0.1:8500"
}

plugin "raw_exec" {
  config {
    enabled = true
  }
}
%s%s%s
`, n.Name, filepath.Join(n.Dir, "nomad"), n.PluginDir, n.IP, c.net.ServerIP(), c.cfg.Ports.NomadRPC, c.pluginConfig(n), c.accelConfig(), c.nomadTLSBlock(c.tlsFor(false)))
}

// pluginConfig configures the microvm driver of a node.
func (c *Cluster) pluginConfig(n *Node) string {
	mv := c.cfg.MicroVM
	if mv == nil {
		return ""
	}
	network := ""
	if !mv.NoNetwork {
		egress := !mv.NoEgress
		network = fmt.Sprintf(`
    network {
      bridge = "cohort0"
      egress = %t
    }`, egress)
	}
	tlsBlock := ""
	if c.tls != nil {
		f := c.tls.Nodes[n.Name]
		tlsBlock = fmt.Sprintf(`
    tls {
      ca_file   = %q
      cert_file = %q
      key_file  = %q
    }`, f.CAFile, f.CertFile, f.KeyFile)
	}
	return fmt.Sprintf(`
plugin "nomad-driver-microvm" {
  config {
    kernel         = %q
    init           = %q
    state_dir      = %q
    cohort_servers = %s%s%s
  }
}
`, mv.Kernel, mv.Init, n.StateDir, hclList(mv.CohortServers), network, tlsBlock)
}

// accelConfig configures the accelerator device plugin.
func (c *Cluster) accelConfig() string {
	a := c.cfg.Accel
	if a == nil {
		return ""
	}
	period := a.FingerprintPeriod
	if period == "" {
		period = "5s"
	}
	root := a.SysfsRoot
	if root == "" {
		root = "/sys"
	}
	return fmt.Sprintf(`
plugin "nomad-device-accel" {
  config {
    sysfs_root         = %q
    fingerprint_period = %q
  }
}
`, root, period)
}

func hclList(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return "[" + strings.Join(q, ", ") + "]"
}

// tlsFor is Nomad's server or client certificate.
func (c *Cluster) tlsFor(server bool) tlsutil.Files {
	if c.tls == nil {
		return tlsutil.Files{}
	}
	if server {
		return c.tls.NomadServer
	}
	return c.tls.NomadClient
}
