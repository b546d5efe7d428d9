// Package gcfloor keeps the Go garbage collector's heap goal at or above a
// floor.
//
// A cohort server's live heap is small (tens of MiB at 20,000 nodes), while
// each admission allocates a few KiB on every replica. With the default
// GOGC=100 the collector then runs whenever the heap doubles from a small
// base: several cycles a second under load, each taking CPU from the
// admissions of that moment, which is what sets the tail of admission
// latency. A floor trades memory the server can spare for fewer cycles:
// the goal is max(floor, what GOGC alone would give), so a heap that
// outgrows the floor is collected exactly as without it.
//
// The floor is applied by retuning GOGC after every cycle from the live
// heap that cycle measured, not with GOGC=off and a memory limit: a limit
// below the live heap makes the collector run back to back, and a floor
// must never do that. A memory limit (GOMEMLIMIT) still bounds the heap
// when set: Go's collector honours it over any GOGC.
package gcfloor

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
)

// Base is the GOGC the floor starts from, Go's default.
const Base = 100

// heapMinimum is the runtime's least heap goal at GOGC=100 (its
// defaultHeapMinimum); it scales with GOGC, so GOGC=p never lets the goal
// under heapMinimum*p/100.
const heapMinimum = 4 << 20

// Percent is the GOGC that puts the heap goal at floor or above, after a
// cycle that left live bytes of heap and roots bytes of stacks and
// globals to scan: Go's goal is live + (live+roots)*GOGC/100. It is never
// under base, so a heap above about half the floor is collected as
// GOGC=base would collect it; and never over the GOGC whose scaled
// minimum goal is the floor, which a tiny heap would otherwise ask for
// and which would put the goal far past the floor.
func Percent(live, roots, floor uint64, base int) int {
	if live >= floor {
		return base
	}
	p := math.Ceil(float64(floor-live) * 100 / float64(max(live+roots, 1)))
	p = min(p, float64(floor)*100/heapMinimum)
	return max(base, int(p))
}

// Floor is a running floor; Stop ends it.
type Floor struct {
	floor uint64
	mu    sync.Mutex
	on    bool
	last  int
	// cycles counts the retunings, for tests.
	cycles int
}

// Keep keeps the heap goal at floor bytes or above. One floor per
// process: GOGC is the process's. It does nothing where the operator has set GOGC (their
// setting stands) or the floor is 0, and says which in the second result.
func Keep(floor uint64) (*Floor, bool) {
	if floor == 0 || os.Getenv("GOGC") != "" {
		return nil, false
	}
	// Retuned from the first cycle's end: before it, no live heap is
	// known, and a GOGC from a guess could let the heap run far past the
	// floor.
	f := &Floor{floor: floor, on: true, last: Base}
	f.arm()
	return f, true
}

// Stop ends the floor and puts GOGC back to Base.
func (f *Floor) Stop() {
	if f == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.on {
		return
	}
	f.on = false
	debug.SetGCPercent(Base)
}

// sentinel is garbage the collector finds in every cycle: its finalizer
// runs once a cycle has ended, then arms the next one. It holds a pointer
// so that it is not batched with other tiny objects, which would delay
// the finalizer by as many cycles as they live.
type sentinel struct {
	f *Floor
	_ [8]byte
}

func (f *Floor) arm() {
	runtime.SetFinalizer(&sentinel{f: f}, func(s *sentinel) {
		if s.f.retune() {
			s.f.arm()
		}
	})
}

// lastCycle is what the last cycle left: the live heap, and the stacks
// and globals it scans besides; live is 0 before the first cycle.
func lastCycle() (live, roots uint64) {
	s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}, {Name: "/gc/scan/stack:bytes"}, {Name: "/gc/scan/globals:bytes"}}
	metrics.Read(s)
	var v [3]uint64
	for i, m := range s {
		if m.Value.Kind() == metrics.KindUint64 {
			v[i] = m.Value.Uint64()
		}
	}
	return v[0], v[1] + v[2]
}

// retune sets GOGC from the heap the last cycle left live; it reports
// whether the floor is still on.
func (f *Floor) retune() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.on {
		return false
	}
	live, roots := lastCycle()
	if live == 0 {
		return true
	}
	p := Percent(live, roots, f.floor, Base)
	// SetGCPercent recomputes the pacer's goal under the heap lock: skip
	// it when the goal would barely move.
	if d := p - f.last; d > f.last/16 || -d > f.last/16 {
		debug.SetGCPercent(p)
		f.last = p
	}
	f.cycles++
	return true
}
