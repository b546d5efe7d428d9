package server

import (
	"net/http"
	"time"

	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are a server's Prometheus metrics, in a registry of its own (a
// process may run several servers, as tests do). The histograms are
// observed where the event happens, which for gangs is the leader: a
// follower's histograms stay empty until it leads.
type metrics struct {
	reg         *prometheus.Registry
	admission   prometheus.Histogram
	gangStart   prometheus.Histogram
	barrierWait prometheus.Histogram
	vmStart     *prometheus.HistogramVec
	lateness    prometheus.Histogram
}

// Buckets from 1 ms to about 2 min: admissions take milliseconds, gang
// starts under TCG tens of seconds.
var latencyBuckets = prometheus.ExponentialBuckets(0.001, 2, 18)

func newMetrics(s *Server) *metrics {
	m := &metrics{
		reg: prometheus.NewRegistry(),
		admission: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cohort_admission_seconds",
			Help: "Time to admit a submitted gang: normalization, Nomad's plan, placement and the Raft commit.", Buckets: latencyBuckets}),
		gangStart: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cohort_gang_start_seconds",
			Help: "Time from a gang's submission to its release at the start barrier.", Buckets: latencyBuckets}),
		barrierWait: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cohort_barrier_wait_seconds",
			Help: "Time a worker waited at the start barrier, from its boot report to its gang's release.", Buckets: latencyBuckets}),
		vmStart: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "cohort_vm_start_seconds",
			Help: "Time the microvm driver took to start a worker VM, as it reports at the barrier, by how (restore or cold).", Buckets: latencyBuckets}, []string{"how"}),
		lateness: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "cohort_deadline_lateness_seconds",
			Help: "How long after its deadline a gang was stopped.", Buckets: latencyBuckets}),
	}
	m.reg.MustRegister(m.admission, m.gangStart, m.barrierWait, m.vmStart, m.lateness,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		stateCollector{s})
	return m
}

func (m *metrics) handler() http.Handler {
	return promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{})
}

// stateCollector reads the gauges from the replicated state at scrape
// time.
type stateCollector struct{ s *Server }

var (
	jobsDesc    = prometheus.NewDesc("cohort_jobs", "Cluster jobs by status.", []string{"status"}, nil)
	workersDesc = prometheus.NewDesc("cohort_workers", "Workers of cluster jobs by job status.", []string{"status"}, nil)
	leaderDesc  = prometheus.NewDesc("cohort_leader", "1 when this replica leads.", nil, nil)
	appliedDesc = prometheus.NewDesc("cohort_raft_applied_index", "Last Raft index applied here.", nil, nil)
	readsDesc   = prometheus.NewDesc("cohort_inventory_full_reads_total",
		"Times the leader read its free inventory whole (at its first admission, after Nomad's lists were read afresh, after a restore) instead of applying what changed.", nil, nil)
)

func (c stateCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- jobsDesc
	ch <- workersDesc
	ch <- leaderDesc
	ch <- appliedDesc
	ch <- readsDesc
}

func (c stateCollector) Collect(ch chan<- prometheus.Metric) {
	counts := map[state.Status]int{}
	workers := map[state.Status]int{}
	c.s.r.Read(func(st *state.State) {
		for _, j := range st.Jobs {
			counts[j.Status]++
			workers[j.Status] += j.Spec.Size()
		}
	})
	for _, st := range []state.Status{state.Queued, state.Reserved, state.Running, state.Finished, state.Failed} {
		ch <- prometheus.MustNewConstMetric(jobsDesc, prometheus.GaugeValue, float64(counts[st]), string(st))
		ch <- prometheus.MustNewConstMetric(workersDesc, prometheus.GaugeValue, float64(workers[st]), string(st))
	}
	leader := 0.0
	if c.s.r.IsLeader() {
		leader = 1
	}
	ch <- prometheus.MustNewConstMetric(leaderDesc, prometheus.GaugeValue, leader)
	ch <- prometheus.MustNewConstMetric(appliedDesc, prometheus.GaugeValue, float64(c.s.r.AppliedIndex()))
	ch <- prometheus.MustNewConstMetric(readsDesc, prometheus.CounterValue, float64(c.s.view.FullReads()))
}

// seconds is d in seconds, never negative (clocks of different servers).
func seconds(d time.Duration) float64 { return max(d, 0).Seconds() }
