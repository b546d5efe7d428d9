package deploy_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/deploy"
	"github.com/cohort-dev/cohort/internal/devcluster"
)

// scripts writes the embedded scripts out, as `cohort dev` does.
func scripts(t *testing.T) string {
	dir, err := deploy.WriteTo(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func runScript(t *testing.T, script string, env map[string]string) (string, error) {
	t.Helper()
	return devcluster.RunHostScript("", script, env)
}

// validate has the agents themselves check the configuration written, as
// they would read it at start.
func validate(t *testing.T, nomadDir, consulDir string) {
	t.Helper()
	nomad, err := devcluster.FindBinary("nomad")
	if err != nil {
		t.Skipf("the written configuration needs Nomad to check it: %v", err)
	}
	consul, err := devcluster.FindBinary("consul")
	if err != nil {
		t.Skipf("the written configuration needs Consul to check it: %v", err)
	}
	if out, err := exec.Command(nomad, "config", "validate", nomadDir).CombinedOutput(); err != nil {
		t.Errorf("nomad config validate: %v\n%s", err, out)
	}
	if out, err := exec.Command(consul, "validate", consulDir).CombinedOutput(); err != nil {
		t.Errorf("consul validate: %v\n%s", err, out)
	}
}

func nodeEnv(root string) map[string]string {
	return map[string]string{
		"NODE_NAME": "n1", "NODE_IP": "127.0.0.1", "NODE_INTERFACE": "lo",
		"NOMAD_SERVERS": "10.0.0.1:4647", "CONSUL_RETRY_JOIN": "10.0.0.1:8301",
		"COHORT_SERVERS":   "https://10.0.0.1:4747,https://10.0.0.2:4747",
		"NOMAD_CONFIG_DIR": root + "/etc/nomad.d", "CONSUL_CONFIG_DIR": root + "/etc/consul.d",
		"NOMAD_DATA_DIR": root + "/nomad", "CONSUL_DATA_DIR": root + "/consul",
		"PLUGIN_DIR": root + "/plugins", "SKIP_HOST_CHECKS": "1",
		"COHORT_CA_FILE": "/etc/cohort/ca.pem", "COHORT_CERT_FILE": "/etc/cohort/node.pem", "COHORT_KEY_FILE": "/etc/cohort/node-key.pem",
	}
}

func serverEnv(root string) map[string]string {
	return map[string]string{
		"NODE_NAME": "s1", "NODE_IP": "10.0.0.1", "SERVER_IPS": "10.0.0.1,10.0.0.2,10.0.0.3",
		"NOMAD_CONFIG_DIR": root + "/etc/nomad.d", "CONSUL_CONFIG_DIR": root + "/etc/consul.d", "COHORT_CONFIG_DIR": root + "/etc/cohort",
		"NOMAD_DATA_DIR": root + "/nomad", "CONSUL_DATA_DIR": root + "/consul", "COHORT_DATA_DIR": root + "/cohort",
		"COHORT_CA_FILE": "/etc/cohort/ca.pem", "COHORT_CERT_FILE": "/etc/cohort/server.pem", "COHORT_KEY_FILE": "/etc/cohort/server-key.pem",
	}
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A node's configuration is what Nomad and Consul accept, with cohort's
// plugins configured as asked.
func TestNodeConfiguration(t *testing.T) {
	dir, root := scripts(t), t.TempDir()
	if out, err := runScript(t, filepath.Join(dir, deploy.Node), nodeEnv(root)); err != nil {
		t.Fatalf("node.sh: %v\n%s", err, out)
	}
	hcl := read(t, root+"/etc/nomad.d/cohort-client.hcl")
	for _, want := range []string{`name       = "n1"`, `servers           = ["10.0.0.1:4647"]`,
		`cohort_servers = ["https://10.0.0.1:4747", "https://10.0.0.2:4747"]`, `cert_file = "/etc/cohort/node.pem"`,
		`plugin "nomad-device-accel"`, `bridge = "cohort0"`} {
		if !strings.Contains(hcl, want) {
			t.Errorf("cohort-client.hcl lacks %s:\n%s", want, hcl)
		}
	}
	if strings.Contains(hcl, "raw_exec") || strings.Contains(hcl, "acl {") {
		t.Errorf("raw_exec or Nomad ACLs configured unasked:\n%s", hcl)
	}
	validate(t, root+"/etc/nomad.d", root+"/etc/consul.d")
}

// A host that is both a server and a node (as every Vagrant VM is): the
// agents merge the two scripts' files.
func TestServerAndNodeOnOneHost(t *testing.T) {
	dir, root := scripts(t), t.TempDir()
	if out, err := runScript(t, filepath.Join(dir, deploy.Server), serverEnv(root)); err != nil {
		t.Fatalf("server.sh: %v\n%s", err, out)
	}
	env := nodeEnv(root)
	env["NODE_NAME"] = "s1"
	if out, err := runScript(t, filepath.Join(dir, deploy.Node), env); err != nil {
		t.Fatalf("node.sh: %v\n%s", err, out)
	}
	flags := read(t, root+"/etc/cohort/server.env")
	for _, want := range []string{"-bootstrap-expect=3", "-join=https://10.0.0.2:4747", "-join=https://10.0.0.3:4747",
		"-advertise=https://10.0.0.1:4747", "-cert-file=/etc/cohort/server.pem", "-nomad-listen=10.0.0.1:4749"} {
		if !strings.Contains(flags, want) {
			t.Errorf("server.env lacks %s:\n%s", want, flags)
		}
	}
	if strings.Contains(flags, "-join=https://10.0.0.1:") {
		t.Errorf("a server joins itself:\n%s", flags)
	}
	if st, err := os.Stat(root + "/etc/cohort/server.env"); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("server.env (it may hold a Nomad token) is not 0600: %v %v", st.Mode(), err)
	}
	validate(t, root+"/etc/nomad.d", root+"/etc/consul.d")
}

// Bad input stops the script with the reason, before anything is written.
func TestScriptsRefuseBadInput(t *testing.T) {
	dir := scripts(t)
	for _, c := range []struct {
		script, unset, key, value, want string
	}{
		{deploy.Node, "NODE_NAME", "", "", "NODE_NAME is required"},
		{deploy.Node, "", "NODE_IP", "10.0.0", "not an IPv4 address"},
		{deploy.Node, "", "NODE_NAME", "n_1", "letters, digits and dashes"},
		{deploy.Node, "", "COHORT_KERNEL", `/x"y`, "must not hold quotes"},
		{deploy.Node, "", "WORKER_EGRESS", "yes", "true or false"},
		{deploy.Node, "", "WORKER_POOL", "-1", "from 0 to 64"},
		{deploy.Node, "", "WORKER_POOL", "00", "from 0 to 64"},
		{deploy.Node, "", "WORKER_POOL", "65", "from 0 to 64"},
		{deploy.Node, "", "WORKER_POOL_MEMORY_MB", "32", "at least 64"},
		{deploy.Node, "COHORT_SERVERS", "", "", "COHORT_SERVERS is required"},
		{deploy.Server, "COHORT_CERT_FILE", "", "", "need COHORT_CA_FILE, COHORT_CERT_FILE and COHORT_KEY_FILE"},
		{deploy.Server, "", "SERVER_IPS", "10.0.0.2,10.0.0.3", "must include this server's NODE_IP"},
		{deploy.Server, "", "COHORT_HTTP_PORT", "47a", "must be a port number"},
		{deploy.Server, "", "NOMAD_TOKEN_FILE", "/nonexistent", "does not read"},
		{deploy.Server, "", "SERVER_IPS", "10.0.0.1,10.0.0.1", "twice"},
		{deploy.Server, "", "SERVER_IPS", "10.0.0.1,10.0.0.300", "not an IPv4 address"},
		{deploy.Server, "", "COHORT_NOMAD_PORT", "70000", "port number or none"},
		{deploy.Server, "NOMAD_KEY_FILE", "NOMAD_CERT_FILE", "/etc/n.pem", "NOMAD_CA_FILE is required"},
		{deploy.Node, "", "MICROVM", "true", "must be 0 or 1"},
		{deploy.Node, "", "NOMAD_CERT_FILE", "/etc/n.pem", "NOMAD_CA_FILE is required"},
	} {
		root := t.TempDir()
		env := nodeEnv(root)
		if c.script == deploy.Server {
			env = serverEnv(root)
		}
		delete(env, c.unset)
		if c.key != "" {
			env[c.key] = c.value
		}
		out, err := runScript(t, filepath.Join(dir, c.script), env)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("%s with %s%s=%q: %v %q, want an error with %q", c.script, c.unset, c.key, c.value, err, out, c.want)
		}
		if _, err := os.Stat(root + "/etc"); err == nil {
			t.Errorf("%s with bad %s%s wrote configuration", c.script, c.unset, c.key)
		}
	}
}

// install.sh puts every file where the units and scripts expect it, and
// the units name the paths it was given.
func TestInstallStaged(t *testing.T) {
	dir, src, dest := scripts(t), t.TempDir(), t.TempDir()
	for _, f := range []string{"cohort", "cohort-barrier", "plugins/nomad-driver-microvm", "plugins/nomad-device-accel", "guest/cohort-init", "vmlinux", "nomad", "consul"} {
		os.MkdirAll(filepath.Dir(filepath.Join(src, f)), 0o755)
		if err := os.WriteFile(filepath.Join(src, f), []byte("#!/bin/sh\n"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	env := map[string]string{"BIN_DIR": src, "KERNEL": src + "/vmlinux", "NOMAD": src + "/nomad", "CONSUL": src + "/consul",
		"DESTDIR": dest, "PREFIX": "/opt/c", "ETC": "/etc/c"}
	if out, err := runScript(t, filepath.Join(dir, deploy.Install), env); err != nil {
		t.Fatalf("install.sh: %v\n%s", err, out)
	}
	for _, f := range []string{"/opt/c/bin/cohort", "/opt/c/bin/cohort-barrier", "/opt/c/bin/nomad", "/opt/c/bin/consul",
		"/opt/cohort/plugins/nomad-driver-microvm", "/opt/cohort/plugins/nomad-device-accel",
		"/var/lib/cohort/vmlinux", "/var/lib/cohort/cohort-init", "/etc/systemd/system/cohort.service"} {
		if _, err := os.Stat(dest + f); err != nil {
			t.Errorf("not installed: %v", err)
		}
	}
	unit := read(t, dest+"/etc/systemd/system/nomad.service")
	if !strings.Contains(unit, "ExecStart=/opt/c/bin/nomad agent -config=/etc/c/nomad.d") || strings.Contains(unit, "@") {
		t.Errorf("nomad.service not rendered for the paths given:\n%s", unit)
	}
	delete(env, "BIN_DIR")
	env["BIN_DIR"] = t.TempDir()
	if out, err := runScript(t, filepath.Join(dir, deploy.Install), env); err == nil || !strings.Contains(out, "run make build kernel first") {
		t.Errorf("install.sh without binaries: %v %s", err, out)
	}
}

// A refusal on a host already set up leaves its configuration as it was:
// a mistyped token file never turns into a server.env without the token.
func TestRefusalKeepsConfiguration(t *testing.T) {
	dir, root := scripts(t), t.TempDir()
	env := serverEnv(root)
	token := filepath.Join(root, "token")
	os.WriteFile(token, []byte("0b9d1f5e-7d1a-4c4b-9d8e-3f2a1b0c9d8e\n"), 0o600)
	env["NOMAD_TOKEN_FILE"] = token
	if out, err := runScript(t, filepath.Join(dir, deploy.Server), env); err != nil {
		t.Fatalf("server.sh: %v\n%s", err, out)
	}
	before := read(t, root+"/etc/cohort/server.env")
	if !strings.Contains(before, "NOMAD_TOKEN=0b9d1f5e-") {
		t.Fatalf("server.env lacks the token:\n%s", before)
	}
	env["NOMAD_TOKEN_FILE"] = root + "/tokn"
	if out, err := runScript(t, filepath.Join(dir, deploy.Server), env); err == nil {
		t.Fatalf("server.sh with a missing token file: %s", out)
	}
	if after := read(t, root+"/etc/cohort/server.env"); after != before {
		t.Errorf("a refused run changed server.env:\n%s", after)
	}
	left, _ := filepath.Glob(root + "/etc/*/*.*.*")
	if len(left) > 0 {
		t.Errorf("temporary files left behind: %v", left)
	}

	// A packaged default beside cohort's files is refused, not merged.
	os.WriteFile(root+"/etc/nomad.d/nomad.hcl", []byte("server { enabled = true }\n"), 0o644)
	env["NOMAD_TOKEN_FILE"] = token
	if out, err := runScript(t, filepath.Join(dir, deploy.Server), env); err == nil || !strings.Contains(out, "nomad.hcl is not cohort's") {
		t.Errorf("server.sh beside a packaged nomad.hcl: %v %s", err, out)
	}
	env["FOREIGN_CONFIG"] = "keep"
	if out, err := runScript(t, filepath.Join(dir, deploy.Server), env); err != nil {
		t.Errorf("server.sh with FOREIGN_CONFIG=keep: %v %s", err, out)
	}
}

// With NOMAD=skip and CONSUL=skip the units run the agents found on the
// PATH, as a packaged install puts them.
func TestInstallUsesInstalledAgents(t *testing.T) {
	dir, src, dest, path := scripts(t), t.TempDir(), t.TempDir(), t.TempDir()
	for _, f := range []string{"cohort", "cohort-barrier", "plugins/nomad-driver-microvm", "plugins/nomad-device-accel", "guest/cohort-init", "vmlinux"} {
		os.MkdirAll(filepath.Dir(filepath.Join(src, f)), 0o755)
		os.WriteFile(filepath.Join(src, f), []byte("#!/bin/sh\n"), 0o755)
	}
	for _, f := range []string{"nomad", "consul"} {
		os.WriteFile(filepath.Join(path, f), []byte("#!/bin/sh\n"), 0o755)
	}
	if out, err := runScript(t, filepath.Join(dir, deploy.Install), map[string]string{"PATH": path + ":" + os.Getenv("PATH"),
		"BIN_DIR": src, "KERNEL": src + "/vmlinux", "NOMAD": "skip", "CONSUL": "skip", "DESTDIR": dest}); err != nil {
		t.Fatalf("install.sh: %v\n%s", err, out)
	}
	if unit := read(t, dest+"/etc/systemd/system/nomad.service"); !strings.Contains(unit, "ExecStart="+path+"/nomad agent") {
		t.Errorf("nomad.service does not run the installed nomad:\n%s", unit)
	}
	if _, err := os.Stat(dest + "/usr/local/bin/nomad"); err == nil {
		t.Error("nomad installed although skipped")
	}
}
