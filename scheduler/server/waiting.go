package server

import (
	"fmt"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// maxExplained bounds the work of explaining a queue: each explanation
// is a placement over every node, and nobody reads past the first few
// hundred gangs of a queue.
const maxExplained = 200

// waiting says, for gangs queued in scheduling order, why each has not
// started: one that does not fit in what is free now names what it needs
// and the most any node has free; one that fits waits behind the first
// that does not (starting it could delay that gang, unless backfill
// finds it cannot); the first gangs of a queue that fit are about to be
// placed. It reads the inventory only; nothing is placed.
func (s *Server) waiting(queue []*placement.Job) map[string]string {
	if len(queue) == 0 {
		return nil
	}
	var holding []placement.Running
	s.r.Read(func(st *state.State) { holding = st.Holding(s.now()) })
	free, err := s.free(holding)
	if err != nil {
		return nil
	}
	out := make(map[string]string, min(len(queue), maxExplained))
	head := ""
	for i, j := range queue {
		if i == maxExplained {
			break
		}
		ok, why := placement.Feasible(free, j)
		switch {
		case !ok:
			out[j.Key()] = "waits for room: " + why
			if head == "" {
				head = j.Key()
			}
		case head != "":
			out[j.Key()] = fmt.Sprintf("fits, but waits behind %s, first in the queue, unless it can run without delaying that gang", head)
		default:
			out[j.Key()] = "fits: it starts at the scheduler's next pass"
		}
	}
	return out
}
