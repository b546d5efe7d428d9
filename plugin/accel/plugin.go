// Package accel is nomad-device-accel, a Nomad device plugin for PCI
// accelerators: GPUs of any vendor (display and 3D controllers, PCI class
// 0x03) and processing accelerators (class 0x12, where FPGA cards sit).
// Devices are found in sysfs and named from the PCI ID database; NVIDIA
// GPUs are described further by NVML when libnvidia-ml is installed.
//
// Reserve hands a task what a process needs (NVIDIA_VISIBLE_DEVICES) and
// what the microvm driver needs to pass devices through (ReservedPCIEnv).
package accel

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/driver/vfio"
	"github.com/cohort-dev/cohort/version"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/device"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	"github.com/hashicorp/nomad/plugins/shared/structs"
)

const (
	// PluginName is the name in a Nomad client's plugin block.
	PluginName = "nomad-device-accel"
	// ReservedPCIEnv lists the PCI addresses of a task's reserved
	// devices, comma-separated ("0000:00:06.0,0000:00:07.0"). The
	// microvm driver passes exactly these through to the worker's VM.
	ReservedPCIEnv = vfio.DevicesEnv
	// VisibleDevicesEnv is what NVIDIA's container runtime and CUDA
	// programs read: the reserved GPUs' UUIDs.
	VisibleDevicesEnv = "NVIDIA_VISIBLE_DEVICES"
)

// Config is the plugin block's config.
type Config struct {
	// FingerprintPeriod is how often devices are looked for again.
	FingerprintPeriod string `codec:"fingerprint_period"`
	// IgnoredDevices are PCI addresses or GPU UUIDs never handed out.
	IgnoredDevices []string `codec:"ignored_devices"`
	// SysfsRoot is where sysfs is mounted; tests point it at a tree.
	SysfsRoot string `codec:"sysfs_root"`
	// PCIIDs is the PCI ID database; empty looks in the usual places.
	PCIIDs string `codec:"pci_ids"`
	// NVML, on by default, uses libnvidia-ml for NVIDIA GPUs.
	NVML bool `codec:"nvml"`
}

var configSpec = hclspec.NewObject(map[string]*hclspec.Spec{
	"fingerprint_period": hclspec.NewDefault(hclspec.NewAttr("fingerprint_period", "string", false), hclspec.NewLiteral(`"1m"`)),
	"ignored_devices":    hclspec.NewAttr("ignored_devices", "list(string)", false),
	"sysfs_root":         hclspec.NewDefault(hclspec.NewAttr("sysfs_root", "string", false), hclspec.NewLiteral(`"/sys"`)),
	"pci_ids":            hclspec.NewAttr("pci_ids", "string", false),
	"nvml":               hclspec.NewDefault(hclspec.NewAttr("nvml", "bool", false), hclspec.NewLiteral("true")),
})

var pluginInfo = &base.PluginInfoResponse{
	Type:              base.PluginTypeDevice,
	PluginApiVersions: []string{device.ApiVersion010},
	PluginVersion:     version.Version,
	Name:              PluginName,
}

// Plugin is the device plugin.
type Plugin struct {
	log hclog.Logger

	// scanMu serializes fingerprints (the Fingerprinter remembers what
	// it saw); mu guards the rest, and is never held across sysfs or
	// NVML calls, so Reserve never waits behind a hung GPU.
	scanMu  sync.Mutex
	mu      sync.Mutex
	fp      *Fingerprinter
	period  time.Duration
	devices map[string]Instance // by ID, as last fingerprinted
	kinds   map[string][3]string
}

// New returns the plugin, unconfigured until SetConfig.
func New(log hclog.Logger) *Plugin {
	return &Plugin{log: log.Named(PluginName), period: time.Minute}
}

func (p *Plugin) PluginInfo() (*base.PluginInfoResponse, error) { return pluginInfo, nil }
func (p *Plugin) ConfigSchema() (*hclspec.Spec, error)          { return configSpec, nil }

// SetConfig checks the config and opens NVML when asked to.
func (p *Plugin) SetConfig(c *base.Config) error {
	cfg := Config{FingerprintPeriod: "1m", SysfsRoot: "/sys", NVML: true}
	if c != nil && len(c.PluginConfig) != 0 {
		if err := base.MsgPackDecode(c.PluginConfig, &cfg); err != nil {
			return fmt.Errorf("decoding %s config: %w", PluginName, err)
		}
	}
	period, err := time.ParseDuration(cfg.FingerprintPeriod)
	if err != nil || period < time.Second {
		return fmt.Errorf("%s config: fingerprint_period must be a duration of at least 1s, such as \"1m\"; got %q", PluginName, cfg.FingerprintPeriod)
	}
	fp := &Fingerprinter{Root: cfg.SysfsRoot, Ignore: map[string]bool{}, PCIIDs: DefaultPCIIDs}
	if cfg.PCIIDs != "" {
		fp.PCIIDs = []string{cfg.PCIIDs}
	}
	uuids := false
	for _, id := range cfg.IgnoredDevices {
		fp.Ignore[id] = true
		if b := busID(id); b != id {
			fp.Ignore[b] = true
		}
		uuids = uuids || strings.HasPrefix(id, "GPU-") || strings.HasPrefix(id, "MIG-")
	}
	if cfg.NVML {
		n, err := OpenNVML()
		switch {
		case err == nil:
			fp.NVML = n
		case errors.Is(err, ErrNoNVML):
			p.log.Info("NVML is not available: NVIDIA GPUs are described from sysfs only (IDs are PCI addresses; no UUIDs, memory, clocks or stats)", "reason", err)
		default:
			p.log.Warn("NVML failed to start: NVIDIA GPUs are described from sysfs only", "error", err)
		}
	}
	if uuids && fp.NVML == nil {
		p.log.Warn("ignored_devices names GPUs by UUID, but without NVML the plugin knows no UUIDs: name them by PCI address")
	}
	p.scanMu.Lock()
	defer p.scanMu.Unlock()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fp != nil && p.fp.NVML != nil {
		p.fp.NVML.Close()
	}
	p.fp, p.period = fp, period
	return nil
}

// scan fingerprints once and keeps the result for Reserve and Stats.
func (p *Plugin) scan() ([]*device.DeviceGroup, []error) {
	p.scanMu.Lock()
	defer p.scanMu.Unlock()
	p.mu.Lock()
	fp := p.fp
	p.mu.Unlock()
	if fp == nil {
		return nil, []error{errors.New("not configured")}
	}
	insts, dv, errs := fp.Scan()
	devices := make(map[string]Instance, len(insts))
	kinds := make(map[string][3]string, len(insts))
	for _, in := range insts {
		devices[in.ID] = in
		v, t, n := fp.Kind(in)
		kinds[in.ID] = [3]string{v, t, n}
	}
	groups := fp.Groups(insts, dv)
	p.mu.Lock()
	p.devices, p.kinds = devices, kinds
	p.mu.Unlock()
	return groups, errs
}

// Fingerprint reports the devices at once, then again whenever what it
// would report changes.
func (p *Plugin) Fingerprint(ctx context.Context) (<-chan *device.FingerprintResponse, error) {
	ch := make(chan *device.FingerprintResponse)
	go p.fingerprintLoop(ctx, ch)
	return ch, nil
}

func (p *Plugin) fingerprintLoop(ctx context.Context, ch chan<- *device.FingerprintResponse) {
	defer close(ch)
	last, first := "", true
	logged := map[string]bool{}
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		}
		groups, errs := p.scan()
		for _, err := range errs {
			// The same broken device fails every period; say so once.
			if !logged[err.Error()] {
				logged[err.Error()] = true
				p.log.Warn("fingerprinting", "error", err)
			}
		}
		// The first answer goes out even when empty: a node without
		// accelerators says so rather than leave Nomad waiting.
		if s := render(groups); s != last || first {
			last, first = s, false
			p.log.Debug("devices changed", "groups", len(groups))
			select {
			case ch <- device.NewFingerprint(groups...):
			case <-ctx.Done():
				return
			}
		}
		p.mu.Lock()
		timer.Reset(p.period)
		p.mu.Unlock()
	}
}

// render is a canonical text of the groups, to tell a change.
func render(groups []*device.DeviceGroup) string {
	var b strings.Builder
	for _, g := range groups {
		fmt.Fprintf(&b, "%s/%s/%s\n", g.Vendor, g.Type, g.Name)
		keys := make([]string, 0, len(g.Attributes))
		for k := range g.Attributes {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, " %s=%s\n", k, g.Attributes[k].GoString())
		}
		for _, d := range g.Devices {
			fmt.Fprintf(&b, " - %s %t %s\n", d.ID, d.Healthy, d.HealthDesc)
		}
	}
	return b.String()
}

// Reserve tells Nomad what a task given these devices needs: the GPUs'
// UUIDs for CUDA and NVIDIA's container runtime (which take UUIDs or
// indices, never PCI addresses: without NVML the variable is left out),
// and every device's PCI address for the microvm driver. An unknown or
// unhealthy ID is refused: a task must not start believing it has a
// device it cannot use.
func (p *Plugin) Reserve(ids []string) (*device.ContainerReservation, error) {
	if len(ids) == 0 {
		return &device.ContainerReservation{}, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	var visible, addrs []string
	for _, id := range ids {
		in, ok := p.devices[id]
		if !ok {
			return nil, fmt.Errorf("reserving device %q: no such device on this node", id)
		}
		if !in.Healthy {
			return nil, fmt.Errorf("reserving device %q: it is unhealthy: %s", id, in.HealthDesc)
		}
		if in.GPU != nil && in.GPU.UUID != "" {
			visible = append(visible, in.GPU.UUID)
		}
		addrs = append(addrs, in.PCI.Address)
	}
	env := map[string]string{ReservedPCIEnv: strings.Join(addrs, ",")}
	if len(visible) > 0 {
		env[VisibleDevicesEnv] = strings.Join(visible, ",")
	}
	return &device.ContainerReservation{Envs: env}, nil
}

// Stats reports, every interval, each NVIDIA GPU's load as NVML sees it.
// Other devices have no standard way to report load and are left out.
func (p *Plugin) Stats(ctx context.Context, interval time.Duration) (<-chan *device.StatsResponse, error) {
	if interval <= 0 {
		interval = time.Second
	}
	ch := make(chan *device.StatsResponse)
	go func() {
		defer close(ch)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			r := &device.StatsResponse{Groups: p.stats(time.Now())}
			select {
			case ch <- r:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

func (p *Plugin) stats(now time.Time) []*device.DeviceGroupStats {
	p.mu.Lock()
	if p.fp == nil || p.fp.NVML == nil {
		p.mu.Unlock()
		return nil
	}
	nvml := p.fp.NVML
	devices, kinds := p.devices, p.kinds // replaced whole, never changed
	p.mu.Unlock()
	byKind := map[[3]string]*device.DeviceGroupStats{}
	ids := make([]string, 0, len(devices))
	for id := range devices {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	var out []*device.DeviceGroupStats
	for _, id := range ids {
		in := devices[id]
		if in.GPU == nil || !in.Healthy || in.PCI.Driver != "nvidia" {
			continue
		}
		u, err := nvml.Usage(in.GPU.UUID)
		if err != nil {
			p.log.Debug("GPU stats", "device", id, "error", err)
			continue
		}
		k := kinds[id]
		g := byKind[k]
		if g == nil {
			g = &device.DeviceGroupStats{Vendor: k[0], Type: k[1], Name: k[2], InstanceStats: map[string]*device.DeviceStats{}}
			byKind[k] = g
			out = append(out, g)
		}
		g.InstanceStats[id] = usageStats(u, now)
	}
	return out
}

func usageStats(u Usage, now time.Time) *device.DeviceStats {
	memUsed, memTotal := int64(u.MemoryUsedMiB), int64(u.MemoryMiB)
	gpu, mem := int64(u.GPUUtil), int64(u.MemUtil)
	temp := int64(u.TemperatureC)
	power := u.PowerW
	hundred := int64(100)
	return &device.DeviceStats{
		Summary: &structs.StatValue{IntNumeratorVal: &memUsed, IntDenominatorVal: &memTotal, Unit: structs.UnitMiB, Desc: "memory used"},
		Stats: &structs.StatObject{Attributes: map[string]*structs.StatValue{
			"gpu_utilization":    {IntNumeratorVal: &gpu, IntDenominatorVal: &hundred, Unit: "%", Desc: "GPU utilization"},
			"memory_utilization": {IntNumeratorVal: &mem, IntDenominatorVal: &hundred, Unit: "%", Desc: "memory bandwidth utilization"},
			"memory_used":        {IntNumeratorVal: &memUsed, IntDenominatorVal: &memTotal, Unit: structs.UnitMiB, Desc: "memory used"},
			"temperature":        {IntNumeratorVal: &temp, Unit: "C", Desc: "GPU temperature"},
			"power":              {FloatNumeratorVal: &power, Unit: structs.UnitW, Desc: "power draw"},
		}},
		Timestamp: now,
	}
}
