package e2e

// docs/install.md, followed as an operator would on three hosts of their
// own: one server and two nodes, each a network namespace. Every step is
// the guide's: install.sh, certificates with `cohort tls` and `nomad tls`,
// server.sh, Nomad's ACL bootstrap, node.sh, the agents started as their
// systemd units say, then the guide's checks. Only systemd itself is
// missing here: each unit's ExecStart runs as a process of the test.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/hashicorp/go-hclog"
)

// guideHost is one host of the guide: its namespace, address and the
// root its files live under (its own /etc, /var/lib, /usr/local, ...).
type guideHost struct {
	name, ns, ip, root string
}

func (h guideHost) path(p string) string { return filepath.Join(h.root, p) }

// script runs one of the host scripts on h, as root there would.
func (h guideHost) script(t *testing.T, script string, env map[string]string) string {
	t.Helper()
	out, err := devcluster.RunHostScript(h.ns, script, env)
	if err != nil {
		t.Fatalf("%s on %s: %v\n%s", filepath.Base(script), h.name, err, out)
	}
	return out
}

// unitCommand is what systemd would run for unit: its ExecStart with the
// variables of its EnvironmentFile expanded (unbraced $VAR splits into
// words, as systemd splits it), and that environment.
func unitCommand(t *testing.T, unit string) (argv, env []string) {
	t.Helper()
	vars := map[string]string{}
	var exec string
	f, err := os.Open(unit)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "ExecStart="):
			exec = strings.TrimPrefix(line, "ExecStart=")
		case strings.HasPrefix(line, "EnvironmentFile="):
			b, err := os.ReadFile(strings.TrimPrefix(line, "EnvironmentFile="))
			if err != nil {
				t.Fatalf("%s: %v", unit, err)
			}
			for _, l := range strings.Split(string(b), "\n") {
				if k, v, ok := strings.Cut(l, "="); ok && !strings.HasPrefix(l, "#") {
					vars[k] = strings.Trim(v, `"`)
					env = append(env, k+"="+vars[k])
				}
			}
		}
	}
	for _, w := range strings.Fields(exec) {
		if strings.HasPrefix(w, "$") {
			argv = append(argv, strings.Fields(vars[w[1:]])...)
			continue
		}
		argv = append(argv, w)
	}
	if len(argv) == 0 {
		t.Fatalf("%s has no ExecStart", unit)
	}
	return argv, env
}

// start runs unit on h as systemd would, its output in a log beside it.
func (h guideHost) start(t *testing.T, unit string, procs *[]*exec.Cmd) {
	t.Helper()
	argv, env := unitCommand(t, h.path("etc/systemd/system/"+unit+".service"))
	cmd := devcluster.InNetNS(h.ns, argv[0], argv[1:]...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, env...)
	log, err := os.Create(h.path(unit + ".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s on %s: %v", unit, h.name, err)
	}
	*procs = append(*procs, cmd)
}

func TestInstallGuide(t *testing.T) {
	if os.Getenv("COHORT_E2E") == "0" {
		t.Skip("COHORT_E2E=0: end-to-end tests disabled")
	}
	nomadBin, err := devcluster.FindBinary("nomad")
	if err != nil {
		t.Fatal(err)
	}
	consulBin, err := devcluster.FindBinary("consul")
	if err != nil {
		t.Fatal(err)
	}
	kernel := devcluster.FindUp(filepath.Join(".tools", "kernel", "vmlinux"))
	scripts := filepath.Dir(devcluster.FindUp(filepath.Join("deploy", "host", "install.sh")))
	if kernel == "" || scripts == "." {
		t.Fatal("the guest kernel or deploy/host not found: run make kernel in the repository")
	}
	if err := devcluster.BecomeSubreaper(); err != nil {
		t.Fatal(err)
	}
	tag, err := devcluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	// The nodes' drivers keep their state under /run, as on a host:
	// socket paths there must stay short.
	stateDir := func(n string) string { return fmt.Sprintf("/run/cohort-g%d-%s", tag, n) }
	network := devcluster.NewNetwork(tag)
	if err := network.Up(); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	var procs []*exec.Cmd
	hosts := map[string]*guideHost{}
	t.Cleanup(func() {
		for i := len(procs) - 1; i >= 0; i-- {
			procs[i].Process.Signal(os.Interrupt)
		}
		for _, p := range procs {
			done := make(chan struct{})
			go func() { p.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				p.Process.Kill()
				<-done
			}
		}
		// Nomad's clients leave their tasks running when they stop, as
		// they should across an upgrade; a test leaves nothing.
		devcluster.KillDescendants(hclog.NewNullLogger())
		if err := devcluster.UnmountUnder(root); err != nil {
			t.Errorf("unmounting: %v", err)
		}
		for _, n := range []string{"node-1", "node-2"} {
			os.RemoveAll(stateDir(n))
		}
		if t.Failed() {
			kept := map[string]string{}
			for _, h := range hosts {
				logs, _ := filepath.Glob(h.path("*.log"))
				for _, l := range logs {
					kept[h.name+"-"+filepath.Base(l)] = l
				}
			}
			keepLogs(t, kept)
		}
		if err := network.Down(); err != nil {
			t.Errorf("removing the network: %v", err)
		}
	})
	for i, name := range []string{"server-1", "node-1", "node-2"} {
		ip := network.HostIP(i)
		ns, err := network.AddHost(name[:1]+name[len(name)-1:], ip)
		if err != nil {
			t.Fatal(err)
		}
		hosts[name] = &guideHost{name: name, ns: ns, ip: ip, root: filepath.Join(root, name)}
	}
	server := hosts["server-1"]

	// The build machine's output, laid out as `make build` lays it out.
	bin := filepath.Join(root, "build")
	for link, target := range map[string]string{"cohort": cohortBin, "cohort-barrier": filepath.Join(filepath.Dir(cohortBin), "cohort-barrier"),
		"plugins": pluginDir, "guest/cohort-init": initBin} {
		os.MkdirAll(filepath.Dir(filepath.Join(bin, link)), 0o755)
		if err := os.Symlink(target, filepath.Join(bin, link)); err != nil {
			t.Fatal(err)
		}
	}

	// Step 1: install.sh on every host.
	for _, h := range hosts {
		h.script(t, filepath.Join(scripts, "install.sh"), map[string]string{
			"BIN_DIR": bin, "KERNEL": kernel, "NOMAD": nomadBin, "CONSUL": consulBin,
			"PREFIX": h.path("usr/local"), "ETC": h.path("etc"), "PLUGIN_DIR": h.path("opt/cohort/plugins"),
			"GUEST_DIR": h.path("var/lib/cohort"), "UNIT_DIR": h.path("etc/systemd/system"),
		})
	}
	cohort := server.path("usr/local/bin/cohort")
	nomad := server.path("usr/local/bin/nomad")

	// Step 2: certificates, made on an operator's machine.
	pki := filepath.Join(root, "pki")
	os.MkdirAll(pki, 0o700)
	inPKI := func(name string, args ...string) {
		cmd := exec.Command(name, args...)
		cmd.Dir = pki
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
		}
	}
	inPKI(cohort, "tls", "ca", "create")
	inPKI(cohort, "tls", "cert", "create", "-server", "-additional-ipaddress="+server.ip)
	inPKI(cohort, "tls", "cert", "create", "-cli")
	inPKI(nomad, "tls", "ca", "create")
	inPKI(nomad, "tls", "cert", "create", "-server", "-additional-ipaddress="+server.ip)
	inPKI(nomad, "tls", "cert", "create", "-client")
	for _, n := range []string{"node-1", "node-2"} {
		inPKI(cohort, "tls", "cert", "create", "-node="+n)
	}
	pem := func(f string) string { return filepath.Join(pki, f) }

	// Step 3: the server's configuration, Consul and Nomad.
	serverEnv := map[string]string{
		"NODE_NAME": server.name, "NODE_IP": server.ip, "SERVER_IPS": server.ip,
		"NOMAD_CONFIG_DIR": server.path("etc/nomad.d"), "CONSUL_CONFIG_DIR": server.path("etc/consul.d"),
		"COHORT_CONFIG_DIR": server.path("etc/cohort"), "NOMAD_DATA_DIR": server.path("var/lib/nomad"),
		"CONSUL_DATA_DIR": server.path("var/lib/consul"), "COHORT_DATA_DIR": server.path("var/lib/cohort/server"),
		"COHORT_CA_FILE": pem("cohort-agent-ca.pem"), "COHORT_CERT_FILE": pem("cohort-server.pem"), "COHORT_KEY_FILE": pem("cohort-server-key.pem"),
		"NOMAD_CA_FILE": pem("nomad-agent-ca.pem"), "NOMAD_CERT_FILE": pem("global-server-nomad.pem"), "NOMAD_KEY_FILE": pem("global-server-nomad-key.pem"),
	}
	server.script(t, filepath.Join(scripts, "server.sh"), serverEnv)
	server.start(t, "consul", &procs)
	server.start(t, "nomad", &procs)

	// Step 4: Nomad's ACLs bootstrapped; cohort's server gets a token of
	// its policy.
	nomadEnv := []string{"NOMAD_ADDR=https://" + server.ip + ":4646", "NOMAD_CACERT=" + pem("nomad-agent-ca.pem")}
	var token, serverToken string
	deadline := time.Now().Add(90 * time.Second)
	for {
		cmd := exec.Command(nomad, "acl", "bootstrap", "-json")
		cmd.Env = append(os.Environ(), nomadEnv...)
		out, err := cmd.CombinedOutput()
		var tok struct{ SecretID string }
		if err == nil && json.Unmarshal(out, &tok) == nil && tok.SecretID != "" {
			token = tok.SecretID
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nomad acl bootstrap: %v\n%s", err, out)
		}
		time.Sleep(time.Second)
	}
	// The servers' own token, of the policy the guide ships.
	policy := filepath.Join(filepath.Dir(scripts), "nomad", "cohort-server.policy.hcl")
	for _, args := range [][]string{
		{"acl", "policy", "apply", "-description", "cohort servers", "cohort-server", policy},
		{"acl", "token", "create", "-name", "cohort-server", "-policy", "cohort-server", "-json"},
	} {
		cmd := exec.Command(nomad, args...)
		cmd.Env = append(os.Environ(), append(nomadEnv, "NOMAD_TOKEN="+token)...)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("nomad %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		if args[1] == "token" {
			var tok struct{ SecretID string }
			if err := json.Unmarshal(out, &tok); err != nil || tok.SecretID == "" {
				t.Fatalf("nomad acl token create: %v\n%s", err, out)
			}
			serverToken = tok.SecretID
		}
	}
	tokenFile := server.path("etc/cohort/nomad-token")
	if err := os.WriteFile(tokenFile, []byte(serverToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	serverEnv["NOMAD_TOKEN_FILE"] = tokenFile
	server.script(t, filepath.Join(scripts, "server.sh"), serverEnv)
	server.start(t, "cohort", &procs)

	// Step 5: the nodes.
	for _, n := range []string{"node-1", "node-2"} {
		h := hosts[n]
		h.script(t, filepath.Join(scripts, "node.sh"), map[string]string{
			"NODE_NAME": h.name, "NODE_IP": h.ip, "NOMAD_SERVERS": server.ip + ":4647", "CONSUL_RETRY_JOIN": server.ip,
			"COHORT_SERVERS":   "https://" + server.ip + ":4747",
			"NOMAD_CONFIG_DIR": h.path("etc/nomad.d"), "CONSUL_CONFIG_DIR": h.path("etc/consul.d"),
			"NOMAD_DATA_DIR": h.path("var/lib/nomad"), "CONSUL_DATA_DIR": h.path("var/lib/consul"),
			"PLUGIN_DIR": h.path("opt/cohort/plugins"), "COHORT_KERNEL": h.path("var/lib/cohort/vmlinux"),
			"COHORT_INIT": h.path("var/lib/cohort/cohort-init"), "COHORT_STATE_DIR": stateDir(n),
			"COHORT_CA_FILE": pem("cohort-agent-ca.pem"), "COHORT_CERT_FILE": pem("cohort-node-" + n + ".pem"), "COHORT_KEY_FILE": pem("cohort-node-" + n + "-key.pem"),
			"NOMAD_CA_FILE": pem("nomad-agent-ca.pem"), "NOMAD_CERT_FILE": pem("global-client-nomad.pem"), "NOMAD_KEY_FILE": pem("global-client-nomad-key.pem"),
		})
		h.start(t, "consul", &procs)
		h.start(t, "nomad", &procs)
	}

	// Step 6: the guide's checks, with the operator's environment.
	cliEnv := append(os.Environ(), nomadEnv...)
	cliEnv = append(cliEnv, "NOMAD_TOKEN="+token, "COHORT_ADDR=https://"+server.ip+":4747", "COHORT_CACERT="+pem("cohort-agent-ca.pem"))
	cli := func(name string, args ...string) (string, error) {
		cmd := exec.Command(name, args...)
		cmd.Env = cliEnv
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	eventually := func(what string, limit time.Duration, ok func() (string, bool)) string {
		t.Helper()
		deadline := time.Now().Add(limit)
		for {
			out, done := ok()
			if done {
				return out
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within %s; last:\n%s", what, limit, out)
			}
			time.Sleep(2 * time.Second)
		}
	}
	members := eventually("cohort server members shows a leader", time.Minute, func() (string, bool) {
		out, err := cli(cohort, "server", "members")
		return out, err == nil && strings.Contains(out, "server-1") && strings.Contains(out, "true")
	})
	t.Logf("cohort server members:\n%s", members)
	nodes := eventually("both nodes ready with the microvm driver", 4*time.Minute, func() (string, bool) {
		out, err := cli(nomad, "node", "status", "-json")
		var ns []struct {
			Name, Status string
			Drivers      map[string]struct{ Healthy bool }
		}
		if err != nil || json.Unmarshal([]byte(out), &ns) != nil {
			return out, false
		}
		ready := 0
		for _, n := range ns {
			if n.Status == "ready" && n.Drivers["microvm"].Healthy {
				ready++
			}
		}
		return fmt.Sprintf("%d of 2 ready: %s", ready, out), ready == 2
	})
	t.Log(nodes[:strings.Index(nodes, ":")])

	spec := filepath.Join(root, "hello.hcl")
	hello, err := os.ReadFile(devcluster.FindUp(filepath.Join("demo", "hello.hcl")))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(spec, []byte(strings.ReplaceAll(string(hello), "@WORKER@", helloBin)), 0o644)
	if out, err := cli(cohort, "run", "-detach", spec); err != nil {
		t.Fatalf("cohort run hello.hcl: %v\n%s", err, out)
	}
	status := eventually("the hello job finished", 4*time.Minute, func() (string, bool) {
		out, _ := cli(cohort, "status", "-json", "demo")
		return out, strings.Contains(out, `"Status": "finished"`) || strings.Contains(out, `"Status": "failed"`)
	})
	if !strings.Contains(status, `"Status": "finished"`) {
		t.Fatalf("the hello job did not finish:\n%s", status)
	}
	if out, err := cli(cohort, "bill", "demo"); err != nil || !strings.Contains(out, "worker") {
		t.Errorf("cohort bill demo: %v\n%s", err, out)
	}
	// The guide's backup, made and checked as its operating part says.
	snap := filepath.Join(root, "cohort.snap")
	if out, err := cli(cohort, "operator", "snapshot", "save", snap); err != nil {
		t.Errorf("cohort operator snapshot save: %v\n%s", err, out)
	} else if out, err := cli(cohort, "operator", "snapshot", "inspect", snap); err != nil || !strings.Contains(out, "Jobs     1") {
		t.Errorf("cohort operator snapshot inspect: %v\n%s", err, out)
	}
	// Without the token, cohort refuses as Nomad would.
	plain := exec.Command(cohort, "operator", "snapshot", "save", filepath.Join(root, "refused.snap"))
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, "NOMAD_TOKEN=") {
			plain.Env = append(plain.Env, e)
		}
	}
	plain.Env = append(plain.Env, "COHORT_ADDR=https://"+server.ip+":4747", "COHORT_CACERT="+pem("cohort-agent-ca.pem"))
	if out, err := plain.CombinedOutput(); err == nil || !strings.Contains(string(out), "management") {
		t.Errorf("a snapshot without a token: %v\n%s", err, out)
	}
}
