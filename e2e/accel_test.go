package e2e

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
)

// eightGPUs are the PCI addresses of the 8-GPU fixture node.
var eightGPUs = []string{"0000:18:00.0", "0000:2a:00.0", "0000:3a:00.0", "0000:5d:00.0", "0000:9a:00.0", "0000:ab:00.0", "0000:ba:00.0", "0000:db:00.0"}

func gpuGang(name string, count int, device string) string {
	return fmt.Sprintf(`job %q {
  max_runtime  = "2m"
  gang_timeout = "30s"
  group "w" {
    count  = %d
    driver = "raw_exec"
    resources {
      cpu    = 20
      memory = 32
%s
    }
    program {
      path = "/bin/sh"
      args = ["-c", "echo devices=$COHORT_PCI_DEVICES visible=$NVIDIA_VISIBLE_DEVICES"]
    }
  }
}
`, name, count, device)
}

// TestAcceleratorsOnAGPUNode: a Nomad client loads nomad-device-accel on
// the sysfs tree of an 8-GPU node (modelled on a real H100 node; this
// machine has no GPU, nor NVML, so the plugin describes them from sysfs
// and the PCI ID database). Nomad lists the GPUs with their attributes; a
// 2-worker gang asking one GPU per worker, with an attribute constraint,
// is placed and each worker is handed a different GPU; a gang needing 9,
// and one whose constraint no GPU meets, queue with the reason.
func TestAcceleratorsOnAGPUNode(t *testing.T) {
	root, err := filepath.Abs("../plugin/accel/testdata/8gpu/sys")
	if err != nil {
		t.Fatal(err)
	}
	c := startCluster(t, clusterOpts{accelSysfs: root})
	addr := cohortServer(t, c)

	var nodeID string
	waitWithin(t, 2*time.Minute, "Nomad lists the node's 8 GPUs", func() bool {
		var nodes []struct{ ID string }
		getJSON(t, c.NomadAddr()+"/v1/nodes", &nodes)
		if len(nodes) == 0 {
			return false
		}
		nodeID = nodes[0].ID
		var node struct {
			NodeResources struct {
				Devices []struct {
					Vendor, Type, Name string
					Instances          []struct{ ID string }
				}
			}
		}
		getJSON(t, c.NomadAddr()+"/v1/node/"+nodeID, &node)
		for _, d := range node.NodeResources.Devices {
			if d.Vendor == "nvidia" && d.Type == "gpu" && len(d.Instances) == 8 {
				return true
			}
		}
		return false
	})
	nomad, _ := devcluster.FindBinary("nomad")
	status := run(t, c, nomad, "node", "status", "-verbose", nodeID)
	for _, want := range []string{"nvidia/gpu/H100 SXM5 80GB", "pci_device_id", "0x2330", "pcie_link_width", "0000:db:00.0"} {
		if !strings.Contains(status, want) {
			t.Errorf("nomad node status -verbose lacks %q:\n%s", want, status)
		}
	}
	// cohort's own inventory counts the same GPUs once it has seen them.
	waitWithin(t, time.Minute, "cohort's inventory has the GPUs", func() bool {
		nodes, err := client(addr).Nodes()
		return err == nil && len(nodes) == 1 && nodes[0].Capacity.Devices["nvidia/gpu/H100 SXM5 80GB"] == 8
	})

	cohortRun(t, addr, gpuGang("gpus", 2, `      device "nvidia/gpu" {
        count = 1
        constraint {
          attribute = "pcie_link_width"
          operator  = ">="
          value     = "16"
        }
      }`))
	v := waitStatus(t, addr, "gpus", "finished", "failed")
	if v.Status != "finished" {
		t.Fatalf("gpus gang: %+v", v)
	}
	logs := logsOf(t, c, "gpus")
	line := regexp.MustCompile(`devices=(\S+) visible=(\S*)`)
	got := line.FindAllStringSubmatch(strings.Join(slices.Collect(maps.Values(logs)), "\n"), -1)
	if len(got) != 2 {
		t.Fatalf("worker output: %v", logs)
	}
	seen := map[string]bool{}
	for _, m := range got {
		// Without NVML there is no UUID to put in NVIDIA_VISIBLE_DEVICES.
		if !slices.Contains(eightGPUs, m[1]) || m[2] != "" {
			t.Errorf("worker was handed %q (visible %q), want one of the node's GPUs and no UUIDs", m[1], m[2])
		}
		seen[m[1]] = true
	}
	if len(seen) != 2 {
		t.Errorf("both workers were handed the same GPU: %v", got)
	}
	t.Logf("workers were handed %s", strings.Join(slices.Sorted(maps.Keys(seen)), " and "))

	// A gang that needs more GPUs than are free queues, saying what it
	// needs and the most any node has free.
	cohortRun(t, addr, gpuGangRunning("hold", 1, 1, "sleep 600"))
	waitStatus(t, addr, "hold", "running")
	cohortRun(t, addr, gpuGang("eight", 8, `      device "nvidia/gpu" {}`))
	waitWithin(t, 30*time.Second, "the queued gang's reason", func() bool {
		v, err = client(addr).Job("", "eight", false)
		return err == nil && (v.Status != "queued" || v.Waiting != "")
	})
	t.Logf("eight: %s", v.Waiting)
	if v.Status != "queued" || !strings.Contains(v.Waiting, "waits for room: needs 8 workers") || !strings.Contains(v.Waiting, "1× nvidia/gpu") ||
		!strings.Contains(v.Waiting, "7× nvidia/gpu/H100 SXM5 80GB") {
		t.Errorf("eight: %+v", v)
	}
	var allocs []alloc
	getJSON(t, c.NomadAddr()+"/v1/job/eight/allocations", &allocs)
	if len(allocs) != 0 {
		t.Errorf("a queued gang has %d allocations", len(allocs))
	}
	// When the GPU is given back, it starts whole.
	if err := client(addr).Stop("", "hold"); err != nil {
		t.Fatal(err)
	}
	if v = waitStatus(t, addr, "eight", "finished", "failed"); v.Status != "finished" {
		t.Errorf("eight: %+v", v)
	}

	// A gang that could never fit, by count or by a constraint no GPU
	// meets (the fixture has no NVML, so no memory attribute), is
	// refused at submission with the reason.
	for _, c := range []struct{ spec, want string }{
		{gpuGang("nine", 9, `      device "nvidia/gpu" {}`), "needs 9 workers of 20 MHz, 32 MiB, 1× nvidia/gpu (9 in all)"},
		{gpuGang("bigmem", 1, `      device "nvidia/gpu" {
        constraint {
          attribute = "memory"
          operator  = ">="
          value     = "40 GiB"
        }
      }`), "where nvidia/gpu device.attr.memory >= 40 GiB"},
	} {
		path := filepath.Join(t.TempDir(), "job.hcl")
		os.WriteFile(path, []byte(c.spec), 0o644)
		out, err := cohortCmd("run", "-address", addr, path).CombinedOutput()
		t.Logf("%s", out)
		if exitStatus(err) != 1 || !strings.Contains(string(out), "cannot fit even on the empty cluster") || !strings.Contains(string(out), c.want) {
			t.Errorf("cohort run: %v\n%s", err, out)
		}
	}
}

// gpuGangRunning is a gang of count workers holding per GPUs each and
// running script.
func gpuGangRunning(name string, count, per int, script string) string {
	return strings.Replace(gpuGang(name, count, fmt.Sprintf(`      device "nvidia/gpu" {
        count = %d
      }`, per)), "echo devices=$COHORT_PCI_DEVICES visible=$NVIDIA_VISIBLE_DEVICES", script, 1)
}

// TestMicroVMPassthroughRefusedWithoutIOMMU: a microvm gang handed a GPU
// by the device plugin on a host without an IOMMU (this machine) fails
// every attempt with a task event saying so, before any VM, tap or run
// directory is made.
func TestMicroVMPassthroughRefusedWithoutIOMMU(t *testing.T) {
	if ents, _ := os.ReadDir("/sys/kernel/iommu_groups"); len(ents) > 0 {
		t.Skip("this host has an IOMMU: the refusal cannot be seen here (driver/vfio's fixture tests cover it)")
	}
	root, err := filepath.Abs("../plugin/accel/testdata/8gpu/sys")
	if err != nil {
		t.Fatal(err)
	}
	c, api, _ := microvmClusterOpts(t, clusterOpts{accelSysfs: root})
	waitWithin(t, 2*time.Minute, "Nomad lists the node's GPUs", func() bool {
		nodes, err := client(api).Nodes()
		return err == nil && len(nodes) == 1 && nodes[0].Capacity.Devices["nvidia/gpu/H100 SXM5 80GB"] == 8
	})
	before := vmPIDs(c)
	spec := strings.Replace(microvmJob("passthrough", 1), "      memory = 128\n", "      memory = 128\n      device \"nvidia/gpu\" {}\n", 1)
	submit(t, c, spec)
	v := waitStatus(t, api, "passthrough", "failed")
	if v.Attempts != 3 {
		t.Errorf("passthrough: %+v", v)
	}
	for _, a := range waitAllocs(t, c, "passthrough", 3, allStatus("failed")) {
		msgs := taskEvents(t, c, a.ID)
		if !strings.Contains(msgs, "through to the worker VM: this host has no IOMMU") {
			t.Errorf("task events do not say why:\n%s", msgs)
		}
	}
	if pids := newPIDs(before, vmPIDs(c)); len(pids) != 0 {
		t.Errorf("VMs started for a refused task: %v", pids)
	}
	if tp := taps(t, c); len(tp) != 0 {
		t.Errorf("taps left behind: %v", tp)
	}
}
