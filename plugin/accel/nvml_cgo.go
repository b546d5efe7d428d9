//go:build cgo && linux

package accel

import (
	"fmt"
	"strings"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// realNVML is go-nvml. Init and Shutdown are reference-counted by the
// library; the plugin opens it once and keeps it.
type realNVML struct {
	mu sync.Mutex
}

func openNVML() (NVML, error) {
	var r nvml.Return
	func() {
		// go-nvml panics rather than returning when the shared
		// library cannot be loaded at all.
		defer func() {
			if p := recover(); p != nil {
				r = nvml.ERROR_LIBRARY_NOT_FOUND
			}
		}()
		r = nvml.Init()
	}()
	switch r {
	case nvml.SUCCESS:
		return &realNVML{}, nil
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		return nil, ErrNoNVML
	default:
		return nil, fmt.Errorf("initialising NVML: %s", nvml.ErrorString(r))
	}
}

func (n *realNVML) Close() error {
	if r := nvml.Shutdown(); r != nvml.SUCCESS {
		return fmt.Errorf("shutting NVML down: %s", nvml.ErrorString(r))
	}
	return nil
}

func (n *realNVML) DriverVersion() (string, error) {
	v, r := nvml.SystemGetDriverVersion()
	if r != nvml.SUCCESS {
		return "", fmt.Errorf("NVML driver version: %s", nvml.ErrorString(r))
	}
	return v, nil
}

func (n *realNVML) GPUs() ([]GPU, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	count, r := nvml.DeviceGetCount()
	if r != nvml.SUCCESS {
		return nil, fmt.Errorf("NVML device count: %s", nvml.ErrorString(r))
	}
	gpus := make([]GPU, 0, count)
	for i := 0; i < count; i++ {
		d, r := nvml.DeviceGetHandleByIndex(i)
		if r != nvml.SUCCESS {
			gpus = append(gpus, GPU{Lost: r == nvml.ERROR_GPU_IS_LOST, Err: fmt.Errorf("NVML device %d: %s", i, nvml.ErrorString(r))})
			continue
		}
		gpus = append(gpus, describe(d))
	}
	return gpus, nil
}

// describe reads one GPU; the first query that fails is kept in Err, and
// a lost GPU marks it Lost, but every query is tried so what can be known
// is.
func describe(d nvml.Device) GPU {
	var g GPU
	check := func(what string, r nvml.Return) {
		if r == nvml.SUCCESS || r == nvml.ERROR_NOT_SUPPORTED {
			return
		}
		if r == nvml.ERROR_GPU_IS_LOST {
			g.Lost = true
		}
		if g.Err == nil {
			g.Err = fmt.Errorf("NVML %s: %s", what, nvml.ErrorString(r))
		}
	}
	var r nvml.Return
	g.UUID, r = d.GetUUID()
	check("UUID", r)
	g.Name, r = d.GetName()
	check("name", r)
	pci, r := d.GetPciInfo()
	check("PCI info", r)
	g.PCIBusID = busID(cString(pci.BusId[:]))
	mem, r := d.GetMemoryInfo()
	check("memory", r)
	g.MemoryMiB = mem.Total >> 20
	bar1, r := d.GetBAR1MemoryInfo()
	check("BAR1", r)
	g.BAR1MiB = bar1.Bar1Total >> 20
	p, r := d.GetPowerManagementLimit()
	check("power limit", r)
	g.PowerLimitW = p / 1000
	g.SMClockMHz, r = d.GetMaxClockInfo(nvml.CLOCK_SM)
	check("SM clock", r)
	g.MemClockMHz, r = d.GetMaxClockInfo(nvml.CLOCK_MEM)
	check("memory clock", r)
	g.PCIeGen, r = d.GetMaxPcieLinkGeneration()
	check("PCIe generation", r)
	g.PCIeWidth, r = d.GetMaxPcieLinkWidth()
	check("PCIe width", r)
	mig, _, r := d.GetMigMode()
	check("MIG mode", r)
	g.MIG = mig == nvml.DEVICE_MIG_ENABLE
	return g
}

func (n *realNVML) Usage(uuid string) (Usage, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	d, r := nvml.DeviceGetHandleByUUID(uuid)
	if r != nvml.SUCCESS {
		return Usage{}, fmt.Errorf("NVML device %s: %s", uuid, nvml.ErrorString(r))
	}
	var u Usage
	if util, r := d.GetUtilizationRates(); r == nvml.SUCCESS {
		u.GPUUtil, u.MemUtil = util.Gpu, util.Memory
	}
	if mem, r := d.GetMemoryInfo(); r == nvml.SUCCESS {
		u.MemoryUsedMiB, u.MemoryMiB = mem.Used>>20, mem.Total>>20
	}
	if t, r := d.GetTemperature(nvml.TEMPERATURE_GPU); r == nvml.SUCCESS {
		u.TemperatureC = t
	}
	if p, r := d.GetPowerUsage(); r == nvml.SUCCESS {
		u.PowerW = float64(p) / 1000
	}
	return u, nil
}

// cString is a NUL-terminated C char array as a Go string.
func cString[T ~int8 | ~uint8](b []T) string {
	var sb strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return sb.String()
}
