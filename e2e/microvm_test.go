package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
)

// submit writes a cohort spec, turns it into a Nomad job with cohort plan
// and registers it with nomad job run, as a user would.
func submit(t *testing.T, c *devcluster.Cluster, spec string) {
	t.Helper()
	dir := t.TempDir()
	src := filepath.Join(dir, "job.hcl")
	if err := os.WriteFile(src, []byte(spec), 0o644); err != nil {
		t.Fatal(err)
	}
	out := run(t, c, cohortBin, "plan", src)
	dst := filepath.Join(dir, "job.nomad.hcl")
	os.WriteFile(dst, []byte(out), 0o644)
	nomad, _ := devcluster.FindBinary("nomad")
	run(t, c, nomad, "job", "run", "-detach", dst)
}

func microvmJob(name string, count int, args ...string) string {
	quoted := make([]string, len(args))
	for i, a := range args {
		quoted[i] = strconv.Quote(a)
	}
	return fmt.Sprintf(`job %q {
  max_runtime = "5m"
  group "w" {
    count = %d
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

func exitCode(a alloc) (int, bool) {
	for _, e := range a.TaskStates["worker"].Events {
		if e.Type == "Terminated" {
			return e.ExitCode, true
		}
	}
	return 0, false
}

// vmPIDs lists the cluster's task VMs (not its template VMs) by their run
// directories.
func vmPIDs(c *devcluster.Cluster) map[string]bool {
	out, _ := exec.Command("pgrep", "-f", "qemu-system-x86_64 .*"+c.MicroVMStateDir()+"/run/").Output()
	pids := map[string]bool{}
	for _, p := range strings.Fields(string(out)) {
		pids[p] = true
	}
	return pids
}

func taps(t *testing.T, c *devcluster.Cluster) []string {
	out, err := exec.Command("ip", "-n", c.MicroVMNetNS(), "-o", "link", "show").CombinedOutput()
	if err != nil {
		t.Fatalf("ip link: %v %s", err, out)
	}
	var ts []string
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && strings.HasPrefix(f[1], "ct") {
			ts = append(ts, strings.TrimSuffix(f[1], ":"))
		}
	}
	return ts
}

// TestMicroVMExitCodeAndLogs: a microvm job whose program prints and exits
// 3; nomad alloc logs shows stdout and stderr apart, and the alloc reports
// exit code 3.
func TestMicroVMExitCodeAndLogs(t *testing.T) {
	c, _ := microvmCluster(t)
	submit(t, c, microvmJob("exit3", 2, "exit", "3"))
	allocs := waitAllocs(t, c, "exit3", 2, allStatus("failed"))
	nomad, _ := devcluster.FindBinary("nomad")
	for _, a := range allocs {
		if code, ok := exitCode(a); !ok || code != 3 {
			t.Errorf("alloc %s exit code = %d (terminated %v), want 3", a.Name, code, ok)
		}
		if out := run(t, c, nomad, "alloc", "logs", a.ID, "worker"); out != "hello from the worker on stdout\n" {
			t.Errorf("stdout = %q", out)
		}
		if out := run(t, c, nomad, "alloc", "logs", "-stderr", a.ID, "worker"); out != "hello from the worker on stderr\n" {
			t.Errorf("stderr = %q", out)
		}
	}
	if ts := taps(t, c); len(ts) != 0 {
		t.Errorf("taps left after the job ended: %v", ts)
	}
}

// TestMicroVMStopSignalRecover: four sleeping workers survive a restart of
// the Nomad agent (same VMs, re-attached); a signal reaches a program; and
// stopping the job leaves no VM and no tap.
func TestMicroVMStopSignalRecover(t *testing.T) {
	c, _ := microvmCluster(t)
	before := map[string]bool{}
	submit(t, c, microvmJob("sleepers", 4, "sleep"))
	allocs := waitAllocs(t, c, "sleepers", 4, allStatus("running"))
	waitFor(t, "4 VMs", func() bool { return len(newPIDs(before, vmPIDs(c))) == 4 })
	vms := newPIDs(before, vmPIDs(c))
	if n := len(taps(t, c)); n != 4 {
		t.Errorf("taps = %d, want 4", n)
	}
	// Stats are the VMM process's: some resident memory, some CPU time.
	var stats struct {
		ResourceUsage struct {
			MemoryStats struct{ RSS uint64 }
			CpuStats    struct{ UserMode, SystemMode float64 }
		}
	}
	waitFor(t, "task stats", func() bool {
		resp, err := http.Get(c.NomadAddr() + "/v1/client/allocation/" + allocs[1].ID + "/stats")
		if err != nil || resp.StatusCode != 200 {
			return false
		}
		defer resp.Body.Close()
		json.NewDecoder(resp.Body).Decode(&stats)
		return stats.ResourceUsage.MemoryStats.RSS > 0
	})
	if rss := stats.ResourceUsage.MemoryStats.RSS; rss < 1<<20 || rss > 1<<30 {
		t.Errorf("vm rss = %d bytes, implausible", rss)
	}

	if err := c.RestartNomad(context.Background()); err != nil {
		t.Fatal(err)
	}
	// The same four VMs run on, and Nomad still sees them running.
	time.Sleep(2 * time.Second)
	after := newPIDs(before, vmPIDs(c))
	if strings.Join(after, ",") != strings.Join(vms, ",") {
		t.Fatalf("VMs after agent restart = %v, want the same %v", after, vms)
	}
	waitAllocs(t, c, "sleepers", 4, allStatus("running"))

	// A signal sent through Nomad reaches the program in the VM, which
	// dies of it; the recovered handle reports that.
	nomad, _ := devcluster.FindBinary("nomad")
	run(t, c, nomad, "alloc", "signal", "-s", "SIGTERM", allocs[0].ID, "worker")
	waitFor(t, "signalled alloc to end", func() bool {
		var a alloc
		getJSON(t, c.NomadAddr()+"/v1/allocation/"+allocs[0].ID, &a)
		return a.ClientStatus == "failed"
	})
	var a alloc
	getJSON(t, c.NomadAddr()+"/v1/allocation/"+allocs[0].ID, &a)
	if code, _ := exitCode(a); code != 128+15 {
		t.Errorf("signalled worker exit code = %d, want 143", code)
	}

	run(t, c, nomad, "job", "stop", "sleepers")
	waitFor(t, "VMs to exit", func() bool { return len(newPIDs(before, vmPIDs(c))) == 0 })
	waitFor(t, "taps to be removed", func() bool { return len(taps(t, c)) == 0 })
}

func newPIDs(before, now map[string]bool) []string {
	var out []string
	for p := range now {
		if !before[p] {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	waitWithin(t, 60*time.Second, what, ok)
}

// waitWithin is waitFor with its own deadline.
func waitWithin(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if ok() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestMicroVMNetwork: workers on a node reach each other by IP, and the
// address Nomad advertises for a worker is its VM's; a worker cannot reach
// the node's own services.
func TestMicroVMNetwork(t *testing.T) {
	c, _ := microvmCluster(t)
	submit(t, c, microvmJob("server", 1, "serve", "7000"))
	allocs := waitAllocs(t, c, "server", 1, allStatus("running"))
	ip := vmAddress(t, c, "server-w")
	if !strings.HasPrefix(ip, "10.213.") {
		t.Fatalf("advertised address = %q, want the VM's address in 10.213.0.0/16", ip)
	}

	submit(t, c, microvmJob("client", 1, "dial", ip+":7000"))
	done := waitAllocs(t, c, "client", 1, func(as []alloc) bool { return as[0].ClientStatus != "pending" && as[0].ClientStatus != "running" })
	if code, _ := exitCode(done[0]); done[0].ClientStatus != "complete" || code != 0 {
		t.Fatalf("client alloc = %s (exit %d), want complete", done[0].ClientStatus, code)
	}
	nomad, _ := devcluster.FindBinary("nomad")
	waitFor(t, "the server to see the client", func() bool {
		return strings.Contains(run(t, c, nomad, "alloc", "logs", allocs[0].ID, "worker"), `got "hello"`)
	})

	// A worker that writes and exits at once still delivers every byte:
	// the receiver reads at 512 KiB/s, so when the sender's program
	// exits, up to its 64 KiB send buffer (doubled by the kernel) still
	// waits in its VM's kernel for about a quarter of a second.
	submit(t, c, microvmJob("sink", 1, "sink", "7001", "512"))
	sink := waitAllocs(t, c, "sink", 1, allStatus("running"))
	sinkIP := vmAddress(t, c, "sink-w")
	submit(t, c, microvmJob("sender", 1, "send", sinkIP+":7001", "1048576"))
	waitAllocs(t, c, "sender", 1, allStatus("complete"))
	waitAllocs(t, c, "sink", 1, allStatus("complete"))
	if out := run(t, c, nomad, "alloc", "logs", sink[0].ID, "worker"); !strings.Contains(out, "sink got 1048576 bytes, then EOF") {
		t.Errorf("the sink did not get all 1 MiB and the end of the stream:\n%s", out)
	}

	// The gateway is the bridge inside the VMs' namespace, not the host:
	// Nomad's HTTP port, open on the host, is not reachable from a worker.
	port := strings.TrimPrefix(c.NomadAddr(), "http://127.0.0.1:")
	submit(t, c, microvmJob("escape", 1, "dial", "10.213.0.1:"+port))
	esc := waitAllocs(t, c, "escape", 1, allStatus("failed"))
	if code, _ := exitCode(esc[0]); code != 1 {
		t.Errorf("dialing the host from a worker: exit %d, want 1 (connection refused)", code)
	}
}

// vmAddress is the address Consul has for the one instance of service.
func vmAddress(t *testing.T, c *devcluster.Cluster, service string) string {
	t.Helper()
	var ip string
	waitFor(t, service+"'s VM address in Consul", func() bool {
		var entries []struct{ ServiceAddress string }
		getJSON(t, c.ConsulAddr()+"/v1/catalog/service/"+service, &entries)
		if len(entries) == 1 {
			ip = entries[0].ServiceAddress
		}
		return ip != ""
	})
	return ip
}

// TestMicroVMBadProgram: a program the VM cannot run fails the task with a
// message that says why. The job is a gang registered with Nomad directly,
// so cohort adopts it; its worker fails before the gang starts, so the gang
// is retried whole and fails after three attempts, each with that message.
func TestMicroVMBadProgram(t *testing.T) {
	c, api, _ := microvmServerCluster(t)
	for name, tc := range map[string]struct{ path, want string }{
		"dynamic": {"/bin/true", "dynamically linked"},
		"missing": {"/nonexistent/worker", "does not exist on this node"},
		"script":  {"/usr/bin/ldd", "not an ELF executable"},
	} {
		spec := strings.Replace(microvmJob(name, 1), workerBin, tc.path, 1)
		submit(t, c, spec)
		v := waitStatus(t, api, name, "failed")
		if v.Attempts != 3 || !strings.Contains(v.Reason, "did not start in 3 attempts") {
			t.Errorf("%s: %+v", name, v)
		}
		as := waitAllocs(t, c, name, 3, allStatus("failed"))
		for _, a := range as {
			if msgs := taskEvents(t, c, a.ID); !strings.Contains(msgs, tc.want) {
				t.Errorf("%s: task events do not say %q:\n%s", name, tc.want, msgs)
			}
		}
	}
}

// TestMicroVMBadConfig: Nomad jobs written by hand that the driver refuses,
// each with a task event that says why.
func TestMicroVMBadConfig(t *testing.T) {
	c, _ := microvmCluster(t)
	nomad, _ := devcluster.FindBinary("nomad")
	for name, tc := range map[string]struct{ config, memory, want string }{
		"smallmem": {fmt.Sprintf("program = %q", workerBin), "32", "too small for a worker VM"},
		"unknown":  {fmt.Sprintf("program = %q\n        bogus = 1", workerBin), "128", `"bogus"`},
		"accel":    {fmt.Sprintf("program = %q\n        accelerator = \"fast\"", workerBin), "128", `accelerator must be`},
	} {
		job := fmt.Sprintf(`job %q {
  type = "batch"
  group "g" {
    restart {
      attempts = 0
      mode     = "fail"
    }
    reschedule {
      attempts  = 0
      unlimited = false
    }
    task "worker" {
      driver = "microvm"
      config {
        %s
      }
      resources {
        memory = %s
      }
    }
  }
}
`, name, tc.config, tc.memory)
		path := filepath.Join(t.TempDir(), name+".nomad.hcl")
		os.WriteFile(path, []byte(job), 0o644)
		run(t, c, nomad, "job", "run", "-detach", path)
		as := waitAllocs(t, c, name, 1, allStatus("failed"))
		msgs := taskEvents(t, c, as[0].ID)
		if !strings.Contains(msgs, tc.want) {
			t.Errorf("%s: task events do not say %q:\n%s", name, tc.want, msgs)
		}
	}
}

// TestMicroVMSnapshotStart: once the node reports its template ready,
// workers start from the snapshot, each with its own address and entropy.
func TestMicroVMSnapshotStart(t *testing.T) {
	c, _ := microvmCluster(t)
	waitFor(t, "the template snapshot", func() bool {
		var nodes []struct{ ID string }
		getJSON(t, c.NomadAddr()+"/v1/nodes", &nodes)
		var node struct {
			Drivers map[string]struct{ Attributes map[string]string }
		}
		getJSON(t, c.NomadAddr()+"/v1/node/"+nodes[0].ID, &node)
		return node.Drivers["microvm"].Attributes["driver.microvm.snapshot"] == "ready"
	})
	submit(t, c, microvmJob("warm", 3, "rand"))
	allocs := waitAllocs(t, c, "warm", 3, allStatus("complete"))
	nomad, _ := devcluster.FindBinary("nomad")
	seen := map[string]bool{}
	for _, a := range allocs {
		if evs := taskEvents(t, c, a.ID); !strings.Contains(evs, "restored from snapshot") {
			t.Errorf("alloc %s was not restored from the snapshot:\n%s", a.Name, evs)
		}
		// "<hostname> <random hex> <ip/len> <mac>"
		f := strings.Fields(run(t, c, nomad, "alloc", "logs", a.ID, "worker"))
		if len(f) != 4 {
			t.Fatalf("worker output = %q", f)
		}
		for _, v := range f[1:] {
			if seen[v] {
				t.Errorf("two restored workers share %s", v)
			}
			seen[v] = true
		}
	}
}

// taskEvents is an alloc's worker task events, one "Type: message" a line.
func taskEvents(t *testing.T, c *devcluster.Cluster, allocID string) string {
	t.Helper()
	var ev struct {
		TaskStates map[string]struct {
			Events []struct{ Type, DisplayMessage string }
		}
	}
	getJSON(t, c.NomadAddr()+"/v1/allocation/"+allocID, &ev)
	msgs := ""
	for _, e := range ev.TaskStates["worker"].Events {
		msgs += e.Type + ": " + e.DisplayMessage + "\n"
	}
	return msgs
}
