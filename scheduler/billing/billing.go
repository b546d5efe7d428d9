// Package billing prices what a gang's workers held, per worker and per
// millisecond, from the moment the whole gang was running (billing starts
// when the start barrier releases, not when the first VM boots) until it
// ended. It derives everything from the replicated job record, so every
// replica bills the same.
package billing

import (
	"sort"
	"time"

	"github.com/cohort-dev/cohort/scheduler/state"
)

// Prices per hour of one unit; a bill is exact to the millisecond.
type Prices struct {
	CPUMHzHour    float64 // per MHz of reserved CPU
	MemoryGiBHour float64 // per GiB of reserved memory
	DeviceHour    float64 // per device
	Currency      string
}

// DefaultPrices are placeholders an operator overrides in the server's
// configuration.
var DefaultPrices = Prices{CPUMHzHour: 0.00001, MemoryGiBHour: 0.004, DeviceHour: 1.0, Currency: "USD"}

// Line is one worker's entry in the ledger.
type Line struct {
	Group    string
	Index    int
	Node     string
	StartMs  int64 // unix milliseconds
	EndMs    int64
	CPU      int
	MemoryMB int
	Devices  map[string]int `json:",omitempty"`
	Amount   float64
}

// Bill is a job's ledger and its total.
type Bill struct {
	Job      string
	Run      int `json:",omitempty"`
	Status   state.Status
	Open     bool // still running: the last line ends now
	Lines    []Line
	Total    float64
	Currency string
}

// For bills a job as of now. A job that never ran costs nothing.
func For(j *state.Job, p Prices, now time.Time) Bill {
	b := Bill{Job: j.Spec.ID, Run: j.Run, Status: j.Status, Currency: p.Currency}
	if j.StartedAt.IsZero() || j.Decision == nil {
		return b
	}
	end := j.EndedAt
	if end.IsZero() {
		end, b.Open = now, true
	}
	hours := end.Sub(j.StartedAt).Hours()
	for _, w := range j.Decision.Workers {
		g := j.Spec.Group(w.Group)
		if g == nil {
			continue
		}
		devices := 0
		for _, c := range g.Devices {
			devices += c
		}
		amount := hours * (float64(g.CPU)*p.CPUMHzHour + float64(g.MemoryMB)/1024*p.MemoryGiBHour + float64(devices)*p.DeviceHour)
		b.Lines = append(b.Lines, Line{
			Group: w.Group, Index: w.Index, Node: w.Node,
			StartMs: j.StartedAt.UnixMilli(), EndMs: end.UnixMilli(),
			CPU: g.CPU, MemoryMB: g.MemoryMB, Devices: g.Devices, Amount: amount,
		})
		b.Total += amount
	}
	sort.Slice(b.Lines, func(a, c int) bool {
		if b.Lines[a].Group != b.Lines[c].Group {
			return b.Lines[a].Group < b.Lines[c].Group
		}
		return b.Lines[a].Index < b.Lines[c].Index
	})
	return b
}
