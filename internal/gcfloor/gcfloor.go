// Package gcfloor keeps the Go garbage collector's heap goal at or above a
// floor.
//
// A cohort server's live heap is small (tens of MiB at 20,000 nodes), while
// each admission allocates a few KiB on every replica. With the default
// GOGC=100 the collector then runs whenever the heap doubles from a small
// base: several cycles a second under load, each taking CPU from the
// admissions of that moment, which is what sets the tail of admission
// latency. A floor trades memory the server can spare for fewer cycles:
// the goal is the floor while the live heap is small, and what GOGC=100
// gives once twice the live heap passes the floor.
//
// The floor is applied by retuning GOGC after every cycle from the live
// heap that cycle measured, not with GOGC=off and a memory limit: a limit
// below the live heap makes the collector run back to back, and a floor
// must never do that. A memory limit the operator sets (GOMEMLIMIT) still
// bounds the heap: Go's collector honours it over any GOGC.
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
// defaultHeapMinimum, in a default build; GOEXPERIMENT=heapminimum512kib
// makes it 512 KiB, under which a tiny heap's goal falls short of the
// floor, never past it). It scales with GOGC, so GOGC=p never lets the
// goal under heapMinimum*p/100.
const heapMinimum = 4 << 20

// Percent is the GOGC that puts the heap goal at floor or above, after a
// cycle that left live bytes of heap and roots bytes of stacks and
// globals to scan: Go's goal is live + (live+roots)*GOGC/100. It is never
// under base, so a heap of about half the floor or more is collected as
// GOGC=base would collect it; and never over the GOGC whose scaled
// minimum goal is the floor, which a tiny heap would otherwise ask for
// and which would put the goal far past the floor.
func Percent(live, roots, floor uint64, base int) int {
	if live >= floor {
		return base
	}
	p := math.Ceil(float64(floor-live) * 100 / float64(max(live+roots, 1)))
	p = min(p, float64(floor)*100/heapMinimum, math.MaxInt32)
	return max(base, int(p))
}

// Floor is a running floor; Stop ends it.
type Floor struct {
	floor uint64
	mu    sync.Mutex
	on    bool
	last  int // the GOGC set
	// prevGOGC is what Stop puts back; ownLimit says whether the floor
	// sets the memory limit (no GOMEMLIMIT was given).
	prevGOGC int
	ownLimit bool
	// cycles counts the retunings, for tests.
	cycles int
}

// Keep keeps the heap goal at floor bytes or above. One floor per
// process: GOGC is the process's. It does nothing where the operator has
// set GOGC (their setting stands) or the floor is 0, and says which in
// the second result.
func Keep(floor uint64) (*Floor, bool) {
	if floor == 0 || os.Getenv("GOGC") != "" {
		return nil, false
	}
	// Retuned from the first cycle's end: before it, no live heap is
	// known, and a GOGC from a guess could let the heap run far past the
	// floor.
	f := &Floor{floor: floor, on: true, last: Base, ownLimit: os.Getenv("GOMEMLIMIT") == ""}
	f.prevGOGC = debug.SetGCPercent(Base)
	f.arm()
	return f, true
}

// Stop ends the floor and puts GOGC (and the memory limit it set) back.
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
	debug.SetGCPercent(f.prevGOGC)
	if f.ownLimit {
		debug.SetMemoryLimit(math.MaxInt64)
	}
}

// sentinel is garbage the collector finds in every cycle: its finalizer
// runs once a cycle has ended, then arms the next one. It holds a pointer
// so that the tiny allocator, which batches small pointer-free objects
// and would delay the finalizer by as many cycles as they live, never
// takes it.
type sentinel struct{ f *Floor }

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

// Backstop is the memory limit the floor sets where the operator set
// none, as a multiple of the floor, while the floor raises GOGC. A GOGC
// set after one cycle applies to the next, whose live heap may be far
// larger (a snapshot restored, the first read of Nomad's lists): at
// GOGC=6,400 from a 4 MiB heap, 100 MiB live would make the goal 6.4 GiB.
// The limit stops that. It is set only while the live heap is under half
// the floor, so four times the floor is at least eight times the live
// heap: reached only by a heap that grows that much within one cycle.
const Backstop = 4

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
	if f.ownLimit {
		// Only while the floor raises GOGC: at Go's default there is no
		// far goal to bound, and a limit would be a cap Go's default
		// does not have.
		limit := int64(math.MaxInt64)
		if p > Base {
			limit = int64(min(Backstop*f.floor, math.MaxInt64/2))
		}
		debug.SetMemoryLimit(limit)
	}
	if p != f.last {
		debug.SetGCPercent(p)
		f.last = p
	}
	f.cycles++
	return true
}
