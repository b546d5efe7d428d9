package accel

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/device"
)

// fakeNVML answers from a fixed list of GPUs.
type fakeNVML struct {
	gpus    []GPU
	usage   map[string]Usage
	version string
}

func (f *fakeNVML) DriverVersion() (string, error) { return f.version, nil }
func (f *fakeNVML) GPUs() ([]GPU, error)           { return f.gpus, nil }
func (f *fakeNVML) Close() error                   { return nil }
func (f *fakeNVML) Usage(uuid string) (Usage, error) {
	u, ok := f.usage[uuid]
	if !ok {
		return Usage{}, fmt.Errorf("no GPU %s", uuid)
	}
	return u, nil
}

// h100NVML is what NVML reported on the real H100 node (testdata/h100/nvml.json).
func h100NVML(t *testing.T) *fakeNVML {
	t.Helper()
	b, err := os.ReadFile("testdata/h100/nvml.json")
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		DriverVersion string `json:"driver_version"`
		GPUs          []struct {
			UUID, Name, PCIBusID    string
			MemoryMiB, BAR1MiB      uint64
			PowerLimitW             uint32
			SMClockMHz, MemClockMHz uint32
			PCIeGen, PCIeWidth      int
			MIGMode                 int
		} `json:"gpus"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	f := &fakeNVML{version: raw.DriverVersion, usage: map[string]Usage{}}
	for _, g := range raw.GPUs {
		f.gpus = append(f.gpus, GPU{UUID: g.UUID, Name: g.Name, PCIBusID: g.PCIBusID, MemoryMiB: g.MemoryMiB, BAR1MiB: g.BAR1MiB,
			PowerLimitW: g.PowerLimitW, SMClockMHz: g.SMClockMHz, MemClockMHz: g.MemClockMHz, PCIeGen: g.PCIeGen, PCIeWidth: g.PCIeWidth, MIG: g.MIGMode == 1})
		f.usage[g.UUID] = Usage{GPUUtil: 37, MemUtil: 12, MemoryUsedMiB: 1024, MemoryMiB: g.MemoryMiB, TemperatureC: 41, PowerW: 71.5}
	}
	return f
}

func scan(t *testing.T, fp *Fingerprinter) ([]*device.DeviceGroup, []Instance) {
	t.Helper()
	insts, dv, errs := fp.Scan()
	for _, err := range errs {
		t.Errorf("scan: %v", err)
	}
	groups := fp.Groups(insts, dv)
	for _, g := range groups {
		if err := g.Validate(); err != nil {
			t.Errorf("group %s/%s/%s is not valid for Nomad: %v", g.Vendor, g.Type, g.Name, err)
		}
	}
	return groups, insts
}

func attr(g *device.DeviceGroup, name string) string {
	a, ok := g.Attributes[name]
	if !ok {
		return "<none>"
	}
	return a.GoString()
}

func names(g *device.DeviceGroup) string { return g.Vendor + "/" + g.Type + "/" + g.Name }

func TestH100NodeFromSysfsAlone(t *testing.T) {
	fp := &Fingerprinter{Root: "testdata/h100/sys", PCIIDs: []string{"testdata/pci.ids"}}
	groups, _ := scan(t, fp)
	if len(groups) != 1 {
		t.Fatalf("groups = %d, want the one GPU (virtio devices are not accelerators)", len(groups))
	}
	g := groups[0]
	if names(g) != "nvidia/gpu/H100 SXM5 80GB" {
		t.Errorf("group = %q, want the PCI ID database's marketing name", names(g))
	}
	if len(g.Devices) != 1 || g.Devices[0].ID != "0000:00:06.0" || !g.Devices[0].Healthy || g.Devices[0].HwLocality.PciBusID != "0000:00:06.0" {
		t.Errorf("devices = %+v", g.Devices[0])
	}
	for k, want := range map[string]string{"fingerprint": "sysfs", "pci_vendor_id": "0x10de", "pci_device_id": "0x2330",
		"pci_class": "0x030200", "pcie_link_width": "16", "vendor_name": "NVIDIA Corporation", "memory": "<none>"} {
		if got := attr(g, k); got != want {
			t.Errorf("attribute %s = %s, want %s", k, got, want)
		}
	}
}

func TestH100NodeWithNVML(t *testing.T) {
	fp := &Fingerprinter{Root: "testdata/h100/sys", PCIIDs: []string{"testdata/pci.ids"}, NVML: h100NVML(t)}
	groups, _ := scan(t, fp)
	if len(groups) != 1 {
		t.Fatalf("groups = %d", len(groups))
	}
	g := groups[0]
	// Named as Nomad's NVIDIA plugin names it, so both device
	// "nvidia/gpu" and device "nvidia/gpu/H100 80GB HBM3" match.
	if names(g) != "nvidia/gpu/H100 80GB HBM3" {
		t.Errorf("group = %q", names(g))
	}
	// The ID is the PCI address even where NVML knows the UUID: it must
	// not change when NVML stops seeing the GPU.
	if g.Devices[0].ID != "0000:00:06.0" {
		t.Errorf("ID = %q, want the PCI address", g.Devices[0].ID)
	}
	for k, want := range map[string]string{"fingerprint": "nvml", "memory": "81559MiB", "bar1": "131072MiB", "power": "700W",
		"cores_clock": "1980MHz", "memory_clock": "2619MHz", "pcie_gen": "5", "pcie_width": "16",
		"driver_version": "580.159.04", "mig_mode": "false"} {
		if got := attr(g, k); got != want {
			t.Errorf("attribute %s = %s, want %s", k, got, want)
		}
	}
}

func TestEightGPUNode(t *testing.T) {
	fp := &Fingerprinter{Root: "testdata/8gpu/sys", PCIIDs: []string{"testdata/pci.ids"}}
	groups, insts := scan(t, fp)
	if len(groups) != 1 || len(groups[0].Devices) != 8 {
		t.Fatalf("groups = %d (%v), want one of 8 GPUs and no BMC display", len(groups), render(groups))
	}
	numa := map[int]int{}
	for _, in := range insts {
		numa[in.PCI.NUMANode]++
		if in.PCI.IOMMU == "" {
			t.Errorf("%s has no IOMMU group", in.PCI.Address)
		}
	}
	if numa[0] != 4 || numa[1] != 4 {
		t.Errorf("NUMA nodes = %v", numa)
	}
}

func TestFPGANode(t *testing.T) {
	fp := &Fingerprinter{Root: "testdata/fpga/sys", PCIIDs: []string{"testdata/pci.ids"}}
	groups, insts := scan(t, fp)
	if len(groups) != 1 || names(groups[0]) != "xilinx/fpga/Alveo U250" || len(groups[0].Devices) != 1 {
		t.Fatalf("groups = %s", render(groups))
	}
	if in := insts[0]; in.PCI.Driver != "vfio-pci" || in.PCI.IOMMU != "7" {
		t.Errorf("FPGA = %+v", in.PCI)
	}
}

func TestNodeWithoutAccelerators(t *testing.T) {
	for _, root := range []string{"testdata/none/sys", t.TempDir()} {
		fp := &Fingerprinter{Root: root, PCIIDs: []string{"testdata/pci.ids"}}
		if groups, _ := scan(t, fp); len(groups) != 0 {
			t.Errorf("%s: groups = %s", root, render(groups))
		}
	}
}

func TestNamesWithoutTheDatabase(t *testing.T) {
	for root, want := range map[string]string{"testdata/h100/sys": "nvidia/gpu/0x2330", "testdata/fpga/sys": "xilinx/fpga/0x5005"} {
		fp := &Fingerprinter{Root: root, PCIIDs: []string{filepath.Join(t.TempDir(), "missing")}}
		groups, _ := scan(t, fp)
		if len(groups) != 1 || names(groups[0]) != want {
			t.Errorf("%s: %s, want %s", root, render(groups), want)
		}
	}
	// An unknown vendor is named by its hex ID.
	d := PCIDevice{Vendor: 0xabcd, Device: 0x0001, Class: 0x120000}
	if k := kindOf(Instance{PCI: d}, nil); k.String() != "0xabcd/accelerator/0x0001" {
		t.Errorf("kind = %s", k)
	}
}

// copyTree copies a fixture so a test can change it.
func copyTree(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	if out, err := exec.Command("cp", "-a", src+"/.", dst).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	return dst
}

func TestDeviceThatDisappearsIsUnhealthy(t *testing.T) {
	root := copyTree(t, "testdata/8gpu/sys")
	fp := &Fingerprinter{Root: root, PCIIDs: []string{"testdata/pci.ids"}}
	scan(t, fp)
	if err := os.RemoveAll(filepath.Join(root, "bus/pci/devices/0000:5d:00.0")); err != nil {
		t.Fatal(err)
	}
	groups, _ := scan(t, fp)
	if len(groups) != 1 || len(groups[0].Devices) != 8 {
		t.Fatalf("a vanished device must stay listed, unhealthy: %s", render(groups))
	}
	for _, d := range groups[0].Devices {
		gone := d.ID == "0000:5d:00.0"
		if d.Healthy == gone || (gone && !strings.Contains(d.HealthDesc, "gone from the bus")) {
			t.Errorf("device %s healthy=%t %q", d.ID, d.Healthy, d.HealthDesc)
		}
	}
}

func TestNVMLLostGPUIsUnhealthy(t *testing.T) {
	n := h100NVML(t)
	n.gpus[0].Lost, n.gpus[0].Err = true, fmt.Errorf("NVML memory: GPU is lost")
	fp := &Fingerprinter{Root: "testdata/h100/sys", PCIIDs: []string{"testdata/pci.ids"}, NVML: n}
	groups, _ := scan(t, fp)
	d := groups[0].Devices[0]
	if d.Healthy || !strings.Contains(d.HealthDesc, "lost") {
		t.Errorf("device = %+v", d)
	}
	// A GPU on the nvidia driver that NVML does not list is unhealthy too.
	fp = &Fingerprinter{Root: "testdata/h100/sys", PCIIDs: []string{"testdata/pci.ids"}, NVML: &fakeNVML{}}
	groups, _ = scan(t, fp)
	if d := groups[0].Devices[0]; d.Healthy || !strings.Contains(d.HealthDesc, "NVML does not list it") {
		t.Errorf("device = %+v", d)
	}
}

func TestIgnoredDevices(t *testing.T) {
	fp := &Fingerprinter{Root: "testdata/8gpu/sys", PCIIDs: []string{"testdata/pci.ids"}, Ignore: map[string]bool{"0000:18:00.0": true, "0000:db:00.0": true}}
	groups, _ := scan(t, fp)
	if n := len(groups[0].Devices); n != 6 {
		t.Errorf("devices = %d, want 6 of 8", n)
	}
	fp = &Fingerprinter{Root: "testdata/h100/sys", PCIIDs: []string{"testdata/pci.ids"}, NVML: h100NVML(t),
		Ignore: map[string]bool{"GPU-97695a8d-06d1-6f3c-cc8c-f3e15e19d6cb": true}}
	if groups, _ := scan(t, fp); len(groups) != 0 {
		t.Errorf("a GPU ignored by UUID is still reported: %s", render(groups))
	}
	// ... and stays ignored once NVML no longer sees it (on vfio-pci).
	fp.NVML.(*fakeNVML).gpus = nil
	if groups, _ := scan(t, fp); len(groups) != 0 {
		t.Errorf("a GPU ignored by UUID is reported once out of NVML's sight: %s", render(groups))
	}
}

// newPlugin configures the plugin as the Nomad agent would.
func newPlugin(t *testing.T, cfg Config, n NVML) *Plugin {
	t.Helper()
	old := OpenNVML
	OpenNVML = func() (NVML, error) {
		if n == nil {
			return nil, ErrNoNVML
		}
		return n, nil
	}
	t.Cleanup(func() { OpenNVML = old })
	var b []byte
	if err := base.MsgPackEncode(&b, &cfg); err != nil {
		t.Fatal(err)
	}
	p := New(hclog.NewNullLogger())
	if err := p.SetConfig(&base.Config{PluginConfig: b}); err != nil {
		t.Fatal(err)
	}
	return p
}

func next(t *testing.T, ch <-chan *device.FingerprintResponse) *device.FingerprintResponse {
	t.Helper()
	select {
	case r := <-ch:
		if r == nil || r.Error != nil {
			t.Fatalf("fingerprint = %+v", r)
		}
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no fingerprint")
	}
	return nil
}

func TestPluginFingerprintsAndReserves(t *testing.T) {
	root := copyTree(t, "testdata/8gpu/sys")
	p := newPlugin(t, Config{FingerprintPeriod: "1s", SysfsRoot: root, PCIIDs: "testdata/pci.ids", NVML: true}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, err := p.Fingerprint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	r := next(t, ch)
	if len(r.Devices) != 1 || len(r.Devices[0].Devices) != 8 {
		t.Fatalf("first fingerprint: %s", render(r.Devices))
	}
	res, err := p.Reserve([]string{"0000:2a:00.0", "0000:9a:00.0"})
	if err != nil {
		t.Fatal(err)
	}
	if got := res.Envs[ReservedPCIEnv]; got != "0000:2a:00.0,0000:9a:00.0" {
		t.Errorf("%s = %q", ReservedPCIEnv, got)
	}
	// Without NVML there are no UUIDs, and CUDA takes nothing else.
	if v, ok := res.Envs[VisibleDevicesEnv]; ok {
		t.Errorf("%s = %q without NVML", VisibleDevicesEnv, v)
	}
	if _, err := p.Reserve([]string{"0000:99:00.0"}); err == nil || !strings.Contains(err.Error(), "no such device") {
		t.Errorf("reserving an unknown device: %v", err)
	}
	// The next fingerprint comes only when something changed: a GPU
	// falls off the bus.
	if err := os.RemoveAll(filepath.Join(root, "bus/pci/devices/0000:2a:00.0")); err != nil {
		t.Fatal(err)
	}
	r = next(t, ch)
	unhealthy := 0
	for _, d := range r.Devices[0].Devices {
		if !d.Healthy {
			unhealthy++
		}
	}
	if unhealthy != 1 {
		t.Errorf("unhealthy = %d after a GPU vanished", unhealthy)
	}
	if _, err := p.Reserve([]string{"0000:2a:00.0"}); err == nil || !strings.Contains(err.Error(), "unhealthy") {
		t.Errorf("reserving a vanished device: %v", err)
	}
	select {
	case r := <-ch:
		t.Errorf("a fingerprint without a change: %s", render(r.Devices))
	case <-time.After(2500 * time.Millisecond):
	}
	cancel()
	for range ch {
	}
}

func TestPluginWithNVML(t *testing.T) {
	p := newPlugin(t, Config{FingerprintPeriod: "1m", SysfsRoot: "testdata/h100/sys", PCIIDs: "testdata/pci.ids", NVML: true}, h100NVML(t))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, _ := p.Fingerprint(ctx)
	next(t, ch)
	const uuid = "GPU-97695a8d-06d1-6f3c-cc8c-f3e15e19d6cb"
	res, err := p.Reserve([]string{"0000:00:06.0"})
	if err != nil {
		t.Fatal(err)
	}
	if res.Envs[VisibleDevicesEnv] != uuid || res.Envs[ReservedPCIEnv] != "0000:00:06.0" {
		t.Errorf("envs = %v", res.Envs)
	}
	st, _ := p.Stats(ctx, 50*time.Millisecond)
	s := <-st
	if len(s.Groups) != 1 || s.Groups[0].Name != "H100 80GB HBM3" {
		t.Fatalf("stats = %+v", s.Groups)
	}
	ds := s.Groups[0].InstanceStats["0000:00:06.0"]
	if ds == nil || *ds.Summary.IntNumeratorVal != 1024 || *ds.Stats.Attributes["gpu_utilization"].IntNumeratorVal != 37 ||
		*ds.Stats.Attributes["power"].FloatNumeratorVal != 71.5 {
		t.Errorf("instance stats = %+v", ds)
	}
}

func TestConfigRefused(t *testing.T) {
	var b []byte
	if err := base.MsgPackEncode(&b, &Config{FingerprintPeriod: "10ms", SysfsRoot: "/sys"}); err != nil {
		t.Fatal(err)
	}
	err := New(hclog.NewNullLogger()).SetConfig(&base.Config{PluginConfig: b})
	if err == nil || !strings.Contains(err.Error(), "fingerprint_period") {
		t.Errorf("SetConfig = %v", err)
	}
}

// A node without accelerators answers at once, with no devices.
func TestPluginWithoutDevicesAnswers(t *testing.T) {
	p := newPlugin(t, Config{FingerprintPeriod: "1m", SysfsRoot: "testdata/none/sys", PCIIDs: "testdata/pci.ids", NVML: true}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch, _ := p.Fingerprint(ctx)
	if r := next(t, ch); len(r.Devices) != 0 {
		t.Errorf("devices on a node without any: %s", render(r.Devices))
	}
}

// A GPU moved from the nvidia driver to vfio-pci (for passthrough)
// vanishes from NVML; it keeps its ID, group and attributes, healthy, so
// the allocation holding it still counts.
func TestGPUOnVFIOKeepsItsDescription(t *testing.T) {
	root := copyTree(t, "testdata/h100/sys")
	n := h100NVML(t)
	fp := &Fingerprinter{Root: root, PCIIDs: []string{"testdata/pci.ids"}, NVML: n}
	before, _ := scan(t, fp)
	drv := filepath.Join(root, "bus/pci/devices/0000:00:06.0/driver")
	if err := os.Remove(drv); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../../../bus/pci/drivers/vfio-pci", drv); err != nil {
		t.Fatal(err)
	}
	n.gpus = nil
	after, _ := scan(t, fp)
	if render(after) != render(before) {
		t.Errorf("the fingerprint changed when the GPU moved to vfio-pci:\n%s\nwas\n%s", render(after), render(before))
	}
	// A GPU that is on vfio-pci from the start is described by sysfs.
	fresh := &Fingerprinter{Root: root, PCIIDs: []string{"testdata/pci.ids"}, NVML: n}
	if g, _ := scan(t, fresh); len(g) != 1 || names(g[0]) != "nvidia/gpu/H100 SXM5 80GB" || !g[0].Devices[0].Healthy {
		t.Errorf("a GPU on vfio-pci at start: %s", render(g))
	}
}
