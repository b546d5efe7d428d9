package server

import (
	"fmt"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// maxExplained bounds the work of explaining a queue: each explanation
// is a placement over every node, and nobody reads past the first few
// hundred gangs of a queue.
const maxExplained = 200

// waitCacheFor is how long an explanation of the queue is reused while
// the state is unchanged: a page or a `cohort run` polling a queued gang
// costs one inventory read per period, not one per request.
const waitCacheFor = 2 * time.Second

// waitNote is why one queued gang waits: the text, and the key of the
// gang ahead of it that it waits behind, if any (named only to callers
// who may read that gang's namespace).
type waitNote struct {
	text string
	head string
}

type waitCache struct {
	at    time.Time
	index uint64
	notes map[string]waitNote
}

// waiting says, for every queued gang (the first maxExplained in
// scheduling order), why it has not started. Gangs are placed in turn
// on what is free, as the scheduler would: the first that does not fit
// names what it needs and the most any node has free after the gangs
// ahead of it; one after it that fits waits behind it (starting it could
// delay that gang, unless backfill finds it cannot); the first gangs of a
// queue that fit are about to be placed. Nothing is placed for real.
func (s *Server) waiting() map[string]waitNote {
	index := s.r.AppliedIndex()
	cached := func() (map[string]waitNote, bool) {
		s.waitMu.Lock()
		defer s.waitMu.Unlock()
		c := s.waitCache
		return c.notes, c.notes != nil && c.index == index && time.Since(c.at) < waitCacheFor
	}
	if notes, ok := cached(); ok {
		return notes
	}
	// One request computes while the others wait for its answer; the
	// cache's own lock is never held across the inventory read.
	s.waitCompute.Lock()
	defer s.waitCompute.Unlock()
	if notes, ok := cached(); ok {
		return notes
	}
	notes := s.explainQueue()
	s.waitMu.Lock()
	s.waitCache = waitCache{at: time.Now(), index: index, notes: notes}
	s.waitMu.Unlock()
	return notes
}

// explainQueue computes waiting's answer; an empty one when the
// inventory cannot be read (no explanation beats a wrong one), which is
// cached like any other.
func (s *Server) explainQueue() map[string]waitNote {
	var queue []*placement.Job
	var holding []placement.Running
	s.r.Read(func(st *state.State) {
		queue = queuedInOrder(st)
		holding = st.Holding(s.now())
	})
	notes := make(map[string]waitNote, min(len(queue), maxExplained))
	if len(queue) > 0 {
		free, err := s.free(holding)
		if err != nil {
			return notes
		}
		inv := placement.NewInventory(free)
		head := ""
		for i, j := range queue {
			if i == maxExplained {
				break
			}
			d, ok := inv.Place(j)
			switch {
			case !ok:
				notes[j.Key()] = waitNote{text: "waits for room: " + placement.Shortfall(inv.Nodes(), j)}
				// A gang no node has the drivers for is not the head
				// (placement.Schedule passes it over): none waits on it.
				if head == "" && inv.DriversAnywhere(j) {
					head = j.Key()
				}
			case head != "":
				// Behind the head it takes no room: whether backfill
				// starts it depends on deadlines, not on this order.
				inv.Release(j, d)
				notes[j.Key()] = waitNote{head: head}
			default:
				notes[j.Key()] = waitNote{text: "fits: it starts at the scheduler's next pass"}
			}
		}
	}
	return notes
}

// waitText is a note as the caller may see it: the gang ahead is named
// only when the caller may read its namespace.
func (s *Server) waitText(c caller, n waitNote) string {
	if n.head == "" {
		return n.text
	}
	ahead := "a gang ahead of it in the queue"
	if ns, _ := splitKey(n.head); s.mayRead(c, ns) == nil {
		ahead = n.head + ", first in the queue,"
	}
	return fmt.Sprintf("fits, but waits behind %s unless it can run without delaying that gang", ahead)
}

// queuedInOrder copies the queued gangs' specs in scheduling order.
func queuedInOrder(st *state.State) []*placement.Job {
	var queue []*placement.Job
	for _, j := range st.ByStatus(state.Queued) {
		spec := j.Spec
		queue = append(queue, &spec)
	}
	placement.Order(queue)
	return queue
}
