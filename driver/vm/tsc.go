package vm

import (
	"os"
	"runtime"
	"strings"
	"sync"
	"time"
)

// Every VM is told the TSC's rate (tsc_early_khz), so that its kernel
// skips calibrating it:
//   - Without it, a TCG guest's calibration against the PIT fails and the
//     kernel keeps time with jiffies. Such a clock loses every tick the
//     vCPU misses, so with 16 VMs on a 2-core host the workers' clocks fell
//     seconds behind the host's within a minute. With the TSC they keep
//     the host's time.
//   - A VM with passed-through devices boots with ACPI, which on QEMU's
//     microvm is hardware-reduced: there is no PIT or PIC, and the TSC is
//     the only clock. When the calibration fails there, as it does in
//     about one TCG boot in three on a busy host, the kernel has no clock
//     at all and hangs before the init.
//
// The guest's TSC runs at the host's rate, under TCG and under KVM
// without TSC scaling, so the host's rate is measured once, against the
// monotonic clock. (Under KVM the guest prefers kvm-clock anyway.) A
// restored VM keeps its template's calibration; the value on a restore's
// command line does not reach it.
var (
	tscOnce sync.Once
	tscKHz  int
)

// hostTSCkHz is the host's TSC rate in kHz, or 0 when it cannot be
// trusted (not amd64, or a TSC whose rate changes with the CPU's).
func hostTSCkHz() int {
	tscOnce.Do(func() {
		if runtime.GOARCH != "amd64" || !constantTSC() {
			return
		}
		t0, c0 := time.Now(), rdtsc()
		time.Sleep(100 * time.Millisecond)
		c1, dt := rdtsc(), time.Since(t0)
		if c1 > c0 && dt > 0 {
			tscKHz = int(float64(c1-c0) / dt.Seconds() / 1000)
		}
	})
	return tscKHz
}

func constantTSC() bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "flags") {
			return strings.Contains(line, " constant_tsc") && strings.Contains(line, " nonstop_tsc")
		}
	}
	return false
}
