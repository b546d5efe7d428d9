package devcluster

// The agents' configuration files.

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cohort-dev/cohort/deploy"
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

// configureNode sets a node's host up as an operator's would be: with
// cohort's node.sh, run in the node's namespace, which checks the host and
// writes the node's Nomad and Consul configuration into its directory.
func (c *Cluster) configureNode(n *Node) error {
	env := map[string]string{
		"NODE_NAME":                n.Name,
		"NODE_IP":                  n.IP,
		"NODE_INTERFACE":           "eth0",
		"NOMAD_SERVERS":            c.net.ServerIP() + ":" + strconv.Itoa(c.cfg.Ports.NomadRPC),
		"CONSUL_RETRY_JOIN":        c.net.ServerIP() + ":" + strconv.Itoa(c.cfg.Ports.ConsulSerfLAN),
		"NOMAD_CONFIG_DIR":         filepath.Join(n.Dir, "nomad.d"),
		"CONSUL_CONFIG_DIR":        filepath.Join(n.Dir, "consul.d"),
		"NOMAD_DATA_DIR":           filepath.Join(n.Dir, "nomad"),
		"CONSUL_DATA_DIR":          filepath.Join(n.Dir, "consul"),
		"PLUGIN_DIR":               n.PluginDir,
		"RAW_EXEC":                 "1",
		"NOMAD_GC_MAX_ALLOCS":      "200",
		"MICROVM":                  "0",
		"ACCEL_SYSFS_ROOT":         "/sys",
		"ACCEL_FINGERPRINT_PERIOD": "5s",
	}
	if a := c.cfg.Accel; a != nil {
		if a.SysfsRoot != "" {
			env["ACCEL_SYSFS_ROOT"] = a.SysfsRoot
		}
		if a.FingerprintPeriod != "" {
			env["ACCEL_FINGERPRINT_PERIOD"] = a.FingerprintPeriod
		}
	}
	if mv := c.cfg.MicroVM; mv != nil {
		env["MICROVM"] = "1"
		env["COHORT_KERNEL"] = mv.Kernel
		env["COHORT_INIT"] = mv.Init
		env["COHORT_STATE_DIR"] = n.StateDir
		env["COHORT_SERVERS"] = strings.Join(mv.CohortServers, ",")
		env["WORKER_EGRESS"] = strconv.FormatBool(!mv.NoEgress)
		env["WORKER_POOL"] = strconv.Itoa(mv.Pool)
		if mv.NoNetwork {
			env["WORKER_BRIDGE"] = "none"
		}
		if c.tls != nil {
			f := c.tls.Nodes[n.Name]
			env["COHORT_CA_FILE"], env["COHORT_CERT_FILE"], env["COHORT_KEY_FILE"] = f.CAFile, f.CertFile, f.KeyFile
		}
	}
	if c.cfg.NomadSecure {
		f := c.tlsFor(false)
		env["NOMAD_CA_FILE"], env["NOMAD_CERT_FILE"], env["NOMAD_KEY_FILE"] = f.CAFile, f.CertFile, f.KeyFile
	}
	out, err := RunHostScript(n.NetNS, filepath.Join(c.scripts, deploy.Node), env)
	if err != nil {
		return fmt.Errorf("setting up host %s with node.sh: %v: %s", n.Name, err, out)
	}
	c.log.Debug("host set up", "node", n.Name, "output", out)
	return c.hostVolumes(n)
}

// hostVolumes adds the cluster's host volumes to a node's Nomad client,
// in a file of their own beside node.sh's.
func (c *Cluster) hostVolumes(n *Node) error {
	if len(c.cfg.HostVolumes) == 0 {
		return nil
	}
	var b strings.Builder
	b.WriteString("client {\n")
	for _, name := range c.cfg.HostVolumes {
		dir := filepath.Join(n.Dir, "volumes", name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
		fmt.Fprintf(&b, "  host_volume %q {\n    path = %q\n  }\n", name, dir)
	}
	b.WriteString("}\n")
	p := filepath.Join(n.Dir, "nomad.d", "host-volumes.hcl")
	if err := os.WriteFile(p, []byte(b.String()), 0o644); err != nil {
		return fmt.Errorf("writing %s: %w", p, err)
	}
	return nil
}

// RunHostScript runs one of cohort's host scripts as root on a host
// would: in the host's network namespace (this one when netns is ""),
// with only PATH and env (which may override PATH) in its environment.
// It returns the script's output, trimmed.
func RunHostScript(netns, script string, env map[string]string) (string, error) {
	cmd := exec.Command("bash", script)
	if netns != "" {
		cmd = InNetNS(netns, "bash", script)
	}
	// The last of duplicate keys wins: env's PATH over this one.
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	return strings.TrimSpace(string(out)), err
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
