package vm

import (
	"os"
	"runtime"
	"strings"
	"sync"
	"time"
)

// A VM with passed-through devices boots with ACPI, which on QEMU's
// microvm is hardware-reduced: the guest kernel then has no PIT or PIC
// and times everything with the TSC. When its early TSC calibration
// fails, as it does in about one TCG boot in three on a busy host, the
// kernel has no clock at all and hangs before the init. Telling it the
// TSC's rate (tsc_early_khz) skips that calibration. The guest's TSC runs
// at the host's under TCG and under KVM without TSC scaling, so the
// host's rate is measured once, against the monotonic clock.
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
