package server

import (
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
)

// A gang's life fills the histograms: admission, its start from
// submission, each worker's wait at the barrier, its VMs' start as the
// driver reports it, and how late its deadline was enforced. The gauges
// read the state.
func TestMetricsHistograms(t *testing.T) {
	h := newHarness(t)
	h.submit(gang("m", jobspec.DriverMicroVM, 2))
	allocs := h.nomad.live("m")
	h.srv.Boot("", "m", api.BarrierRequest{Alloc: allocs[0].ID, Instance: "i0", Started: "restore", StartMillis: 180})
	h.advance(40 * time.Millisecond)
	h.srv.Boot("", "m", api.BarrierRequest{Alloc: allocs[1].ID, Instance: "i1", Started: "cold", StartMillis: 900_000})
	h.advance(10 * time.Millisecond)
	h.pass()
	h.advance(time.Minute + 25*time.Millisecond) // past max_runtime
	h.pass()
	rec := h.serve(httptest.NewRequest(http.MethodGet, "/metrics", nil))
	out := rec.Body.String()
	for name, want := range map[string]float64{
		"cohort_admission_seconds_count":               1,
		"cohort_gang_start_seconds_count":              1,
		"cohort_gang_start_seconds_sum":                0.05,
		"cohort_barrier_wait_seconds_count":            2,
		"cohort_barrier_wait_seconds_sum":              0.06,
		`cohort_vm_start_seconds_count{how="restore"}`: 1,
		`cohort_vm_start_seconds_sum{how="restore"}`:   0.18,
		"cohort_deadline_lateness_seconds_count":       1,
		"cohort_deadline_lateness_seconds_sum":         0.025,
		`cohort_jobs{status="finished"}`:               1,
		"cohort_leader":                                1,
		"cohort_inventory_full_reads_total":            1, // the first admission's
	} {
		if got, ok := metricValue(out, name); !ok || math.Abs(got-want) > 1e-9 {
			t.Errorf("%s = %v (found %t), want %v", name, got, ok, want)
		}
	}
	if _, ok := metricValue(out, "go_goroutines"); !ok {
		t.Error("no Go runtime metrics")
	}
	// An implausible report (15 minutes to start a VM) is not recorded.
	if strings.Contains(out, `how="cold"`) {
		t.Errorf("an implausible start time was recorded:\n%s", out)
	}
}

// metricValue is the value of the sample named exactly name (with its
// labels) in Prometheus's text format.
func metricValue(out, name string) (float64, bool) {
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f, err == nil
		}
	}
	return 0, false
}
