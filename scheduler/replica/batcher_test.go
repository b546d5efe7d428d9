package replica

import (
	"fmt"
	"sync"
	"testing"

	"github.com/cohort-dev/cohort/scheduler/state"
)

// Concurrent commands through a batcher each get their own result, and
// all of them are in every replica's state exactly once.
func TestBatcherAnswersEachCommand(t *testing.T) {
	g := newGroup(t, 3)
	l := g.waitLeader("")
	b := NewBatcher(l)
	defer b.Close()
	const n = 300
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			j := gang(i)
			res, err := b.Apply(&state.Command{Op: state.OpSubmit, Job: j})
			switch {
			case err != nil:
				errs <- err
			case res.Err != "" || res.Job == nil || res.Job.Spec.ID != j.ID:
				errs <- fmt.Errorf("submit %s answered %+v", j.ID, res)
			}
		}(i)
	}
	// A command that fails inside a batch fails alone.
	res, err := b.Apply(&state.Command{Op: state.OpStart, JobID: "no-such-job"})
	if err != nil || res.Err == "" {
		t.Errorf("a bad command in a batch: %+v, %v", res, err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	l.Barrier(batchTimeout)
	var count int
	var seqs = map[uint64]bool{}
	l.Read(func(st *state.State) {
		count = len(st.Jobs)
		for _, j := range st.Jobs {
			seqs[j.Spec.Seq] = true
		}
	})
	if count != n || len(seqs) != n {
		t.Errorf("%d jobs with %d distinct sequence numbers, want %d", count, len(seqs), n)
	}
}
