package e2e

// A cluster that spans hosts: workers on several nodes (each a network
// namespace with its own Nomad client, Consul agent, microvm driver,
// worker subnet and firewall) reach each other by name, reach nothing of
// the cluster's hosts, and reach the outside world through NAT only when
// egress is on.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
)

// peersJob is a microvm gang of count workers, at most one per host, each
// running the test worker with args.
func peersJob(name string, count int, args ...string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = fmt.Sprintf("%q", a)
	}
	return fmt.Sprintf(`job %q {
  max_runtime  = "3m"
  gang_timeout = "90s"
  group "w" {
    count          = %d
    distinct_hosts = true
    resources {
      cpu    = 100
      memory = 128
    }
    program {
      path = %q
      args = [%s]
    }
  }
}
`, name, count, workerBin, strings.Join(quoted, ", "))
}

// logsOf is what each allocation of a job printed, by node.
func logsOf(t *testing.T, c *devcluster.Cluster, job string) map[string]string {
	t.Helper()
	var allocs []struct{ ID, NodeName string }
	getJSON(t, c.NomadAddr()+"/v1/job/"+job+"/allocations", &allocs)
	nomad, _ := devcluster.FindBinary("nomad")
	out := map[string]string{}
	for _, a := range allocs {
		out[a.NodeName] += run(t, c, nomad, "alloc", "logs", a.ID, "worker")
	}
	return out
}

// TestPeersByNameAcrossHosts: a gang of three workers, one on each of
// three hosts, finds every peer's name in the hosts file its release
// wrote, resolves each (and its own hostname, to its own address) from
// inside its VM and exchanges a greeting with each; then, from inside a worker on every
// host, every cluster host's Nomad, Consul, cohort and ssh ports are
// closed while a host outside the cluster is reached (egress through
// NAT).
func TestPeersByNameAcrossHosts(t *testing.T) {
	c, addr, _ := microvmClusterOpts(t, clusterOpts{nodes: 3, outside: true})
	outNS, outIP := c.Outside()
	stopOutside := listenIn(t, outNS, outIP+":9000")
	defer stopOutside()

	cohortRun(t, addr, peersJob("peers", 3, "peers", "7400"))
	v := waitStatus(t, addr, "peers", "finished", "failed")
	logs := logsOf(t, c, "peers")
	if v.Status != "finished" || v.Reason != "every worker exited" || len(logs) != 3 {
		t.Fatalf("peers gang: %+v on %d hosts\n%v", v, len(logs), logs)
	}
	for node, l := range logs {
		// The names come from the hosts file the release wrote (and
		// the greetings show they are the right addresses).
		if strings.Count(l, "resolved w") != 3 || strings.Count(l, "hosts file: w") != 3 || strings.Count(l, "own hostname w-") != 1 || strings.Count(l, `got "hello from w`) != 2 {
			t.Errorf("the worker on %s:\n%s", node, l)
		}
	}
	t.Logf("the worker on %s printed:\n%s", c.Nodes()[0].Name, logs[c.Nodes()[0].Name])

	// Isolation, tried from a worker on every host: each target is a port
	// something listens on, checked from a host first.
	stopSSH := listenIn(t, c.Nodes()[0].NetNS, c.Nodes()[0].IP+":22") // an ssh port to close
	defer stopSSH()
	targets := []string{c.Nodes()[0].IP + ":22"}
	for _, n := range c.Nodes() {
		targets = append(targets, n.IP+":4646", n.IP+":8301") // a client has no RPC port
	}
	for _, a := range []string{addr, c.NomadAddr(), c.ConsulAddr()} {
		_, port, _ := strings.Cut(strings.TrimPrefix(a, "http://"), ":")
		targets = append(targets, c.ServerIP()+":"+port)
	}
	for _, tgt := range targets {
		if out, _ := devcluster.InNetNS(c.Nodes()[1].NetNS, workerBin, "probe", tgt).CombinedOutput(); !strings.Contains(string(out), "open") {
			t.Fatalf("%s is not open even from a host, so the probe proves nothing: %s", tgt, out)
		}
	}
	probe := append(append([]string{"probe"}, targets...), outIP+":9000")
	cohortRun(t, addr, peersJob("probe", 3, probe...))
	v = waitStatus(t, addr, "probe", "finished", "failed")
	logs = logsOf(t, c, "probe")
	if v.Status != "finished" || len(logs) != 3 {
		t.Fatalf("probe gang: %+v on %d hosts", v, len(logs))
	}
	for node, l := range logs {
		if strings.Contains(l, "open "+c.ServerIP()) || strings.Count(l, "closed ") != len(targets) || !strings.Contains(l, "open "+outIP+":9000") {
			t.Errorf("from a worker on %s:\n%s", node, l)
		}
	}
}

// TestEgressOff: with egress off, a worker reaches no host outside the
// cluster, and names outside .consul are refused.
func TestEgressOff(t *testing.T) {
	c, addr, _ := microvmClusterOpts(t, clusterOpts{outside: true, noEgress: true})
	outNS, outIP := c.Outside()
	stop := listenIn(t, outNS, outIP+":9000")
	defer stop()
	cohortRun(t, addr, peersJob("sealed", 1, "probe", outIP+":9000"))
	waitStatus(t, addr, "sealed", "finished", "failed")
	for node, l := range logsOf(t, c, "sealed") {
		if !strings.Contains(l, "closed "+outIP+":9000") {
			t.Errorf("with egress off, a worker on %s:\n%s", node, l)
		}
	}
}

// listenIn serves TCP at addr inside a network namespace until stopped.
func listenIn(t *testing.T, netns, addr string) func() {
	t.Helper()
	cmd := devcluster.InNetNS(netns, workerBin, "listen", addr)
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	if n, _ := out.Read(buf); !strings.HasPrefix(string(buf[:n]), "listening") {
		t.Fatalf("listening on %s in %s: %q", addr, netns, buf[:n])
	}
	return func() { cmd.Process.Kill(); cmd.Wait() }
}

// TestSortSurvivesLeaderKill: the distributed sort, twelve workers over
// three hosts, scheduled by a group of three cohort servers whose leader
// is killed while the sort runs. The sort completes, verified by its rank
// 0, and is billed once: one run, one attempt, twelve workers.
func TestSortSurvivesLeaderKill(t *testing.T) {
	ports := []int{freePort(t), freePort(t), freePort(t)}
	c := startCluster(t, clusterOpts{nodes: 3, microvm: true, servers: ports, tls: true})
	secure(t, c, "")
	dir := t.TempDir()
	servers := make([]*serverProc, 3)
	for i := range servers {
		id := string(rune('a' + i))
		servers[i] = &serverProc{id: "s" + id, http: fmt.Sprintf("%s:%d", c.ServerIP(), ports[i]), raft: fmt.Sprintf("%s:%d", c.ServerIP(), freePort(t)),
			data: filepath.Join(dir, id), log: filepath.Join(dir, id+".log")}
	}
	for i, s := range servers {
		var join []string
		for j, o := range servers {
			if j != i {
				join = append(join, o.http)
			}
		}
		s.start(t, c, join)
	}
	t.Cleanup(func() {
		for _, s := range servers {
			if s.cmd.ProcessState == nil {
				s.cmd.Process.Signal(syscall.SIGTERM)
				s.cmd.Wait()
			}
			if t.Failed() {
				b, _ := os.ReadFile(s.log)
				t.Logf("server %s log:\n%s", s.id, b)
			}
		}
	})
	waitNodesReady(t, c)
	var leader *serverProc
	waitFor(t, "three servers with a leader", func() bool {
		ms, err := members(t, servers[0].http)
		if err != nil || len(ms) != 3 {
			return false
		}
		for _, m := range ms {
			for _, s := range servers {
				if m.Leader && m.ID == s.id && m.HTTPAddr != "" {
					leader = s
				}
			}
		}
		return leader != nil
	})
	var survivor *serverProc
	for _, s := range servers {
		if s != leader {
			survivor = s
			break
		}
	}
	addr := scheme() + survivor.http

	spec, _ := os.ReadFile("../demo/sort.hcl")
	job := strings.Replace(strings.ReplaceAll(string(spec), "@SORT@", sortBin), `"20000"`, `"5000"`, 1)
	cohortRun(t, addr, job)
	waitWithin(t, 3*time.Minute, "the sort running", func() bool {
		v, err := client(addr).Job("", "sort", false)
		return err == nil && v.Status == "running"
	})
	killedAt := time.Now()
	leader.cmd.Process.Kill()
	leader.cmd.Wait()
	t.Logf("killed the leader %s while the sort ran", leader.id)

	// Rank 0 merges and verifies all 60,000 records after the others
	// exit: on a loaded 2-core TCG host that alone can take a minute.
	var v jobView
	waitWithin(t, 3*time.Minute, "the sort to end", func() bool {
		var err error
		v, err = client(addr).Job("", "sort", false)
		return err == nil && (v.Status == "finished" || v.Status == "failed")
	})
	t.Logf("the sort ended %s after the leader was killed: %s", time.Since(killedAt).Round(time.Millisecond), v.Reason)
	if v.Status != "finished" || v.Reason != "every worker exited" || v.Run != 1 || v.Attempts != 1 {
		t.Fatalf("sort: %+v", v)
	}
	var verdict string
	for _, l := range logsOf(t, c, "sort") {
		for _, line := range strings.Split(l, "\n") {
			if strings.HasPrefix(line, "sort: ") {
				verdict = line
			}
		}
	}
	t.Logf("rank 0: %s", verdict)
	if !strings.Contains(verdict, "VERIFIED") || !strings.Contains(verdict, "60000 records") {
		t.Errorf("the sort was not verified: %q", verdict)
	}
	var allocs []alloc
	getJSON(t, c.NomadAddr()+"/v1/job/sort/allocations", &allocs)
	b, err := client(addr).Bill("", "sort", 0)
	if err != nil || len(b.Lines) != 12 || b.Total <= 0 || b.Run != 1 || len(allocs) != 12 {
		t.Errorf("billed once? %v %+v; %d allocations", err, b, len(allocs))
	}
	if _, err := client(addr).Bill("", "sort", 2); err == nil {
		t.Error("the sort has a second run")
	}
}
