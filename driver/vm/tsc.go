package vm

import (
	"os"
	"runtime"
	"strings"
	"sync"
	"time"
)

// A TCG VM, and any VM with passed-through devices, is told the TSC's
// rate (tsc_early_khz), so that its kernel skips calibrating it:
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
// host's monotonic clock over 200 ms, each end bracketed by two TSC
// reads (a rate 1 µs off at either end is 10 ppm off). Under KVM a VM without
// passed-through devices is not told: it has kvm-clock, and KVM's own
// TSC rate where it prefers the TSC. A restored VM keeps its template's
// calibration; the value on a restore's command line does not reach it.
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
		t0, c0, ok0 := tscPair()
		time.Sleep(200 * time.Millisecond)
		t1, c1, ok1 := tscPair()
		if dt := t1.Sub(t0); ok0 && ok1 && c1 > c0 && dt > 0 {
			tscKHz = int(float64(c1-c0)/dt.Seconds()/1000 + 0.5)
		}
	})
	return tscKHz
}

// tscPair reads the clock and the TSC at one moment: of a few tries, the
// one whose clock read the fewest cycles bracket. A thread preempted
// between the two reads (a loaded host) would otherwise skew the rate,
// which the guest keeps for as long as it runs. ok is false when no try
// was bracketed within 50 µs worth of cycles at 4 GHz.
func tscPair() (time.Time, uint64, bool) {
	var best time.Time
	var bestC, bestGap uint64
	for range 7 {
		a := rdtsc()
		t := time.Now()
		b := rdtsc()
		if b > a && (bestGap == 0 || b-a < bestGap) {
			best, bestC, bestGap = t, a+(b-a)/2, b-a
		}
	}
	return best, bestC, bestGap > 0 && bestGap < 200_000
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
