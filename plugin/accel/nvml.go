package accel

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// NVML is what the plugin asks of NVIDIA's management library. The real
// one (go-nvml, which loads libnvidia-ml.so.1 at run time) sits behind it
// so fingerprinting is tested with a fake.
type NVML interface {
	// DriverVersion is the kernel driver's version, "580.159.04".
	DriverVersion() (string, error)
	// GPUs lists every GPU the library sees. A GPU it cannot query is
	// still listed, with the failure in Err (Lost when the library says
	// the GPU fell off the bus).
	GPUs() ([]GPU, error)
	// Usage is a GPU's current load.
	Usage(uuid string) (Usage, error)
	Close() error
}

// GPU is one GPU as NVML reports it.
type GPU struct {
	UUID     string // "GPU-97695a8d-…"
	Name     string // "NVIDIA H100 80GB HBM3"
	PCIBusID string // "0000:00:06.0"
	// Memory, BAR1 in MiB; power limit in W; clocks (the maximum) in MHz.
	MemoryMiB, BAR1MiB      uint64
	PowerLimitW             uint32
	SMClockMHz, MemClockMHz uint32
	PCIeGen, PCIeWidth      int
	MIG                     bool
	Lost                    bool
	Err                     error
}

// Usage is a GPU's load: utilisation in percent, memory used in MiB,
// temperature in °C, power draw in W.
type Usage struct {
	GPUUtil, MemUtil uint32
	MemoryUsedMiB    uint64
	MemoryMiB        uint64
	TemperatureC     uint32
	PowerW           float64
}

// ErrNoNVML says the library is not installed: the plugin falls back to
// what sysfs says of NVIDIA GPUs.
var ErrNoNVML = errors.New("NVML (libnvidia-ml.so.1) is not available")

// OpenNVML loads the library; it is replaced in tests.
var OpenNVML = openNVML

// busID normalizes a PCI address to sysfs's form: NVML writes the domain
// with eight digits ("00000000:00:06.0") and in upper case.
func busID(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	parts := strings.SplitN(s, ":", 3)
	if len(parts) != 3 {
		return s
	}
	dom, err := strconv.ParseUint(parts[0], 16, 32)
	if err != nil {
		return s
	}
	return fmt.Sprintf("%04x:%s:%s", dom, parts[1], parts[2])
}
