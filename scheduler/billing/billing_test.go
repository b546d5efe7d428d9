package billing

import (
	"math"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/cohort-dev/cohort/scheduler/state"
)

func TestBill(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	j := &state.Job{
		Spec: placement.Job{ID: "sort", Groups: []placement.Group{
			{Name: "w", Count: 2, CPU: 1000, MemoryMB: 2048, Devices: map[string]int{"nvidia/gpu": 1}},
		}},
		Status:    state.Finished,
		StartedAt: start,
		EndedAt:   start.Add(90 * time.Minute),
		Decision: &placement.Decision{Job: "sort", Workers: []placement.Worker{
			{Group: "w", Index: 1, Node: "b"}, {Group: "w", Index: 0, Node: "a"},
		}},
	}
	p := Prices{CPUMHzHour: 0.001, MemoryGiBHour: 0.01, DeviceHour: 2, Currency: "EUR"}
	b := For(j, p, start.Add(time.Hour*10))
	perWorker := 1.5 * (1000*0.001 + 2*0.01 + 2)
	if len(b.Lines) != 2 || b.Lines[0].Index != 0 || b.Open {
		t.Fatalf("bill = %+v", b)
	}
	if math.Abs(b.Lines[0].Amount-perWorker) > 1e-9 || math.Abs(b.Total-2*perWorker) > 1e-9 {
		t.Errorf("amounts = %v total %v, want %v each", b.Lines[0].Amount, b.Total, perWorker)
	}
	if b.Lines[0].EndMs-b.Lines[0].StartMs != 90*60*1000 {
		t.Errorf("line spans %d ms", b.Lines[0].EndMs-b.Lines[0].StartMs)
	}

	j.EndedAt = time.Time{}
	j.Status = state.Running
	if b := For(j, p, start.Add(time.Minute)); !b.Open || b.Lines[0].EndMs-b.Lines[0].StartMs != 60000 {
		t.Errorf("open bill = %+v", b)
	}
	j.StartedAt = time.Time{}
	if b := For(j, p, start); len(b.Lines) != 0 || b.Total != 0 {
		t.Errorf("a job that never ran was billed: %+v", b)
	}
}

// A worker that ended before its gang is billed to its own end; one
// whose end is unknown, to the gang's.
func TestBillPerWorkerEnds(t *testing.T) {
	start := time.Unix(1_700_000_000, 0)
	j := &state.Job{
		Spec:      placement.Job{ID: "j", Groups: []placement.Group{{Name: "w", Count: 2, CPU: 1000, MemoryMB: 1024}}},
		Status:    state.Finished,
		StartedAt: start, EndedAt: start.Add(10 * time.Second),
		WorkerEnds: map[string]time.Time{"w[0]": start.Add(4 * time.Second), "w[1]": start.Add(time.Hour)},
		Decision:   &placement.Decision{Workers: []placement.Worker{{Group: "w", Index: 0}, {Group: "w", Index: 1}}},
	}
	b := For(j, DefaultPrices, start.Add(time.Hour))
	if got := b.Lines[0].EndMs - b.Lines[0].StartMs; got != 4000 {
		t.Errorf("w[0] billed %d ms, want 4000", got)
	}
	if got := b.Lines[1].EndMs - b.Lines[1].StartMs; got != 10000 {
		t.Errorf("w[1] billed %d ms, want the gang's 10000", got)
	}
}
