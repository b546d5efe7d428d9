// Package billing prices what a gang's workers held, per worker and per
// millisecond, from the moment the whole gang was running (billing starts
// when the start barrier releases, not when the first VM boots) until the
// worker's own end: its allocation's finish, or the gang's end, whichever
// came first. It derives everything from the replicated job record, so
// every replica bills the same.
package billing

import (
	"fmt"
	"sort"
	"time"

	"github.com/cohort-dev/cohort/api"
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

// For bills a job as of now. A job that never ran costs nothing.
func For(j *state.Job, p Prices, now time.Time) api.Bill {
	b := api.Bill{Job: j.Spec.ID, Namespace: j.Spec.Namespace, Run: j.Run, Status: string(j.Status), Currency: p.Currency}
	if j.StartedAt.IsZero() || j.Decision == nil {
		return b
	}
	gangEnd := j.EndedAt
	if gangEnd.IsZero() {
		gangEnd, b.Open = now, true
	}
	for _, w := range j.Decision.Workers {
		g := j.Spec.Group(w.Group)
		if g == nil {
			continue
		}
		end := gangEnd
		if e, ok := j.WorkerEnds[fmt.Sprintf("%s[%d]", w.Group, w.Index)]; ok && e.Before(end) {
			end = e
		}
		if end.Before(j.StartedAt) {
			// A worker whose program ended before the release reached
			// every worker still held its room from the release on.
			end = j.StartedAt
		}
		devices := 0
		for _, c := range g.Devices {
			devices += c
		}
		hours := end.Sub(j.StartedAt).Hours()
		amount := hours * (float64(g.CPU)*p.CPUMHzHour + float64(g.MemoryMB)/1024*p.MemoryGiBHour + float64(devices)*p.DeviceHour)
		b.Lines = append(b.Lines, api.BillLine{
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
