package gcfloor

import (
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"testing"
	"time"
)

func TestPercent(t *testing.T) {
	const mib = 1 << 20
	for _, c := range []struct {
		name               string
		live, roots, floor uint64
		base, wantPercent  int
	}{
		{"heap a quarter of the floor", 64 * mib, 0, 256 * mib, 100, 300},
		{"stacks and globals count", 32 * mib, 32 * mib, 256 * mib, 100, 350},
		{"heap just under the floor", 250 * mib, 0, 256 * mib, 100, 100},
		{"heap over half the floor", 200 * mib, 0, 256 * mib, 100, 100},
		{"heap over the floor", 300 * mib, 0, 256 * mib, 100, 100},
		{"rounded up", 3 * mib, 0, 10 * mib, 100, 234},
		{"a higher base stands", 64 * mib, 0, 256 * mib, 400, 400},
		{"a tiny heap's minimum goal is the floor", 1 * mib, 0, 256 * mib, 100, 6400},
		{"nothing to scan", 0, 0, 256 * mib, 100, 6400},
		{"a small floor keeps the base", 1 * mib, 0, 2 * mib, 100, 100},
	} {
		if got := Percent(c.live, c.roots, c.floor, c.base); got != c.wantPercent {
			t.Errorf("%s: Percent(%d, %d, %d, %d) = %d, want %d", c.name, c.live, c.roots, c.floor, c.base, got, c.wantPercent)
		}
	}
}

// sink keeps allocations from being optimized away.
var sink []byte

// cyclesWhile counts the collections while n MiB of garbage is made in
// small pieces, as a server's requests make it.
func cyclesWhile(n int) uint32 {
	var a, b runtime.MemStats
	runtime.ReadMemStats(&a)
	for range n * 256 {
		sink = make([]byte, 4096)
	}
	runtime.ReadMemStats(&b)
	return b.NumGC - a.NumGC
}

func heapGoal() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/goal:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// retuned waits until f has retuned after a collection started now.
func retuned(t *testing.T, f *Floor) {
	t.Helper()
	f.mu.Lock()
	before := f.cycles
	f.mu.Unlock()
	deadline := time.Now().Add(5 * time.Second)
	for {
		runtime.GC()
		f.mu.Lock()
		n := f.cycles
		f.mu.Unlock()
		if n > before {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the floor did not retune after a collection")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// defaultPacing starts a test from Go's default pacing, whatever GOGC
// the test binary was run with, and puts it back after.
func defaultPacing(t *testing.T) {
	t.Setenv("GOGC", "")
	t.Setenv("GOMEMLIMIT", "")
	old := debug.SetGCPercent(Base)
	oldLimit := debug.SetMemoryLimit(math.MaxInt64)
	t.Cleanup(func() {
		debug.SetGCPercent(old)
		debug.SetMemoryLimit(oldLimit)
	})
}

func TestFloorCutsCollections(t *testing.T) {
	defaultPacing(t)
	runtime.GC()
	without := cyclesWhile(128)

	const floor = 512 << 20
	f, ok := Keep(floor)
	if !ok {
		t.Fatal("Keep did not start with GOGC unset")
	}
	defer f.Stop()
	retuned(t, f)
	// At the floor, not far past it: Go's goal counts stacks and
	// globals too, which the percent allows for.
	if g := heapGoal(); g < floor || g > floor+floor/8 {
		t.Fatalf("heap goal %d MiB with a floor of %d MiB", g>>20, floor>>20)
	}
	// The backstop limit, where the operator set none.
	if l := debug.SetMemoryLimit(-1); l != Backstop*floor {
		t.Errorf("memory limit %d MiB, want %d MiB", l>>20, Backstop*floor>>20)
	}
	with := cyclesWhile(128)
	t.Logf("collections while making 128 MiB of garbage: %d without a floor, %d with 512 MiB", without, with)
	if without < 4 {
		t.Fatalf("only %d collections without a floor: the test's heap is not small enough to show one", without)
	}
	if with > 1 {
		t.Errorf("%d collections with the floor, want at most 1", with)
	}

	// A stopped floor gives the default back.
	f.Stop()
	runtime.GC()
	runtime.GC()
	if g := heapGoal(); g >= floor {
		t.Errorf("heap goal %d MiB after Stop, want the default's", g>>20)
	}
	if l := debug.SetMemoryLimit(-1); l != math.MaxInt64 {
		t.Errorf("memory limit %d after Stop, want none", l)
	}
}

// TestOperatorsLimitStands: with GOMEMLIMIT given, the floor sets no
// limit of its own.
func TestOperatorsLimitStands(t *testing.T) {
	defaultPacing(t)
	t.Setenv("GOMEMLIMIT", "8GiB")
	f, ok := Keep(64 << 20)
	if !ok {
		t.Fatal("Keep did not start with GOGC unset")
	}
	defer f.Stop()
	retuned(t, f)
	if l := debug.SetMemoryLimit(-1); l != math.MaxInt64 {
		t.Errorf("memory limit %d MiB set although GOMEMLIMIT was given", l>>20)
	}
}

// TestHeapOverTheFloor: a live heap larger than the floor is collected
// as GOGC=100 would collect it.
func TestHeapOverTheFloor(t *testing.T) {
	defaultPacing(t)
	const floor = 8 << 20
	live := make([][]byte, 32) // 32 MiB kept live
	for i := range live {
		live[i] = make([]byte, 1<<20)
	}
	f, ok := Keep(floor)
	if !ok {
		t.Fatal("Keep did not start with GOGC unset")
	}
	defer f.Stop()
	retuned(t, f)
	retuned(t, f)
	g := heapGoal()
	// At Go's default GOGC the floor sets no limit either.
	if l := debug.SetMemoryLimit(-1); l != math.MaxInt64 {
		t.Errorf("memory limit %d MiB with the heap over the floor, want none", l>>20)
	}
	runtime.KeepAlive(live)
	if g < 32<<20 || g > 80<<20 {
		t.Errorf("heap goal %d MiB over 32 MiB live, want about twice the live heap", g>>20)
	}
}

func TestOperatorsGOGCStands(t *testing.T) {
	t.Setenv("GOGC", "200")
	if f, ok := Keep(256 << 20); ok {
		f.Stop()
		t.Fatal("Keep started although GOGC is set")
	}
	defaultPacing(t)
	if _, ok := Keep(0); ok {
		t.Fatal("Keep started with a floor of 0")
	}
}
