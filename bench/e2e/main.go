// Command e2e measures cohort end to end on a three-host dev cluster
// (`make bench-e2e`), each figure against a baseline run in the same
// process on the same cluster, and prints name=value medians:
//
//   - gang16_start: `nomad job run` (through cohort's Nomad-compatible
//     endpoint) of a 16-worker microvm gang, until every worker is
//     released and every one of the 16 names resolves from a worker (each
//     worker stamps the time once it resolves all of them);
//   - rawexec16_start: the same 16 tasks as one plain Nomad raw_exec job,
//     no gang, until every task has stamped the time;
//   - sort: the demo's distributed sort, 12 microvm workers over the three
//     hosts, and the same program as 12 raw_exec processes on one host
//     talking over loopback.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	cohortapi "github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/command"
	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/api"
)

var (
	runs    = flag.Int("n", 10, "runs per figure")
	records = flag.Int("records", 20000, "records per sort worker (12 workers of 128 MiB)")
	poolVMs = flag.Int("pool", 0, "warm VMs per shape kept by each node's microvm driver (0: no pool)")
	verbose = flag.Bool("explain", false, "print every gang worker's task events")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-e2e:", err)
		os.Exit(1)
	}
}

type bench struct {
	c        *devcluster.Cluster
	nomad    *api.Client // Nomad itself
	endpoint *api.Client // cohort's Nomad-compatible endpoint
	cohort   *cohortapi.Client
	worker   string // the test worker program
	sort     string // the sort program
}

func run() error {
	tmp, err := os.MkdirTemp("", "cohort-bench-e2e-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	b := &bench{worker: filepath.Join(tmp, "worker"), sort: filepath.Join(tmp, "sort")}
	for out, pkg := range map[string]string{b.worker: "./driver/vm/vmtest/worker", b.sort: "./demo/sort"} {
		cmd := exec.Command("go", "build", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if o, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("building %s: %v: %s", pkg, err, o)
		}
	}
	nomadBin, err := devcluster.FindBinary("nomad")
	if err != nil {
		return err
	}
	consulBin, err := devcluster.FindBinary("consul")
	if err != nil {
		return err
	}
	kernel := devcluster.FindUp(filepath.Join(".tools", "kernel", "vmlinux"))
	root, _ := os.Getwd()
	if kernel == "" {
		return fmt.Errorf("no guest kernel: run make kernel")
	}
	ports, err := devcluster.FreePorts()
	if err != nil {
		return err
	}
	serverIP := devcluster.ServerIPFor(ports.NomadHTTP)
	var free [3]int
	for i := range free {
		if free[i], err = devcluster.FreePort(); err != nil {
			return err
		}
	}
	httpPort, endpointPort, raftPort := free[0], free[1], free[2]
	log := hclog.New(&hclog.LoggerOptions{Name: "bench", Level: hclog.Warn, Output: os.Stderr})
	ctx := context.Background()
	c, err := devcluster.Start(ctx, devcluster.Config{
		DataDir: filepath.Join(tmp, "cluster"), NomadBin: nomadBin, ConsulBin: consulBin,
		PluginDir: filepath.Join(root, "bin", "plugins"), Ports: ports, Nodes: 3, Logger: log,
		MicroVM: &devcluster.MicroVM{Kernel: kernel, Init: filepath.Join(root, "bin", "guest", "cohort-init"),
			CohortServers: []string{fmt.Sprintf("http://%s:%d", serverIP, httpPort)}, Pool: *poolVMs},
	})
	if err != nil {
		return err
	}
	defer c.Stop()
	srv, err := command.StartServer(command.ServerConfig{
		DataDir: filepath.Join(tmp, "cohort"), HTTPAddr: fmt.Sprintf("%s:%d", serverIP, httpPort),
		RaftAddr: fmt.Sprintf("%s:%d", serverIP, raftPort), NodeID: "bench",
		NomadAddr: c.NomadAddr(), NomadListen: fmt.Sprintf("127.0.0.1:%d", endpointPort), BootstrapExpect: 1,
		Prices: billing.DefaultPrices, Logger: log.Named("server"), RaftTimeouts: replica.LANTimeouts,
		BarrierTask: filepath.Join(root, "bin", "cohort-barrier"),
	})
	if err != nil {
		return err
	}
	defer srv.Stop()
	b.c = c
	b.cohort = cohortapi.NewClient(cohortapi.Config{Address: fmt.Sprintf("http://%s:%d", serverIP, httpPort)})
	if b.nomad, err = api.NewClient(&api.Config{Address: c.NomadAddr()}); err != nil {
		return err
	}
	if b.endpoint, err = api.NewClient(&api.Config{Address: fmt.Sprintf("http://127.0.0.1:%d", endpointPort)}); err != nil {
		return err
	}
	if err := b.ready(5 * time.Minute); err != nil {
		return err
	}
	fmt.Printf("hosts=3\nruns=%d\npool=%d\n", *runs, *poolVMs)

	var gang, raw, sortGang, sortRaw []float64
	for i := 0; i <= *runs; i++ { // run 0 warms up and is not counted
		b.settle()
		g, err := b.gang16(i)
		if err != nil {
			return fmt.Errorf("gang16 run %d: %w", i, err)
		}
		b.settle()
		r, err := b.rawexec16(i)
		if err != nil {
			return fmt.Errorf("rawexec16 run %d: %w", i, err)
		}
		sg, err := b.sortGang(i)
		if err != nil {
			return fmt.Errorf("sort run %d: %w", i, err)
		}
		sr, err := b.sortRaw(i)
		if err != nil {
			return fmt.Errorf("sort rawexec run %d: %w", i, err)
		}
		fmt.Fprintf(os.Stderr, "run %d: gang16 %.0f ms, rawexec16 %.0f ms, sort %.0f records/s, sort rawexec %.0f records/s\n", i, g, r, sg, sr)
		if i > 0 {
			gang, raw, sortGang, sortRaw = append(gang, g), append(raw, r), append(sortGang, sg), append(sortRaw, sr)
		}
	}
	fmt.Printf("gang16_start_p50_ms=%.1f\ngang16_start_p90_ms=%.1f\n", pct(gang, 50), pct(gang, 90))
	fmt.Printf("rawexec16_start_p50_ms=%.1f\nrawexec16_start_p90_ms=%.1f\n", pct(raw, 50), pct(raw, 90))
	fmt.Printf("gang16_vs_rawexec=%.2fx\n", pct(gang, 50)/pct(raw, 50))
	fmt.Printf("sort_records_per_s=%.0f\nsort_rawexec_records_per_s=%.0f\nsort_vs_rawexec=%.2fx\n", pct(sortGang, 50), pct(sortRaw, 50), pct(sortGang, 50)/pct(sortRaw, 50))
	return nil
}

// ready waits for every node's network and template snapshot.
func (b *bench) ready(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		snaps, err1 := b.c.NodeAttributes("driver.microvm.snapshot")
		nets, err2 := b.c.NodeAttributes("driver.microvm.network")
		ok := err1 == nil && err2 == nil && b.cohort.Health() == nil
		for i := range snaps {
			ok = ok && snaps[i] == "ready" && strings.HasPrefix(nets[i], "10.")
		}
		if ok {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("the cluster was not ready in %s", timeout)
}

// settle gives the nodes' pools time to refill after a gang took their
// VMs, so that neither the next figure nor its baseline runs beside the
// refill (on 2 cores it would slow both).
func (b *bench) settle() {
	if *poolVMs > 0 {
		time.Sleep(15 * time.Second)
	}
}

// gang16 is one start of the 16-worker gang, in ms.
func (b *bench) gang16(i int) (float64, error) {
	spec := &jobspec.Job{Name: fmt.Sprintf("gang16-%d", i), Priority: 50, Datacenters: []string{"*"}, NodePool: "default",
		MaxRuntime: 5 * time.Minute, GangTimeout: 2 * time.Minute,
		Groups: []*jobspec.Group{{Name: "w", Count: 16, MaxPerNode: 6, Address: fmt.Sprintf("g16-%d", i), Driver: jobspec.DriverMicroVM,
			Resources: jobspec.Resources{CPU: 100, MemoryMB: 128}, Program: jobspec.Program{Path: b.worker, Args: []string{"stamp", "resolve"}}}}}
	job := jobspec.ToNomad(spec)
	start := time.Now()
	if _, _, err := b.endpoint.Jobs().Register(job, nil); err != nil {
		return 0, err
	}
	if err := b.waitCohort(*job.ID); err != nil {
		return 0, err
	}
	end, err := b.lastStamp(*job.ID, 16)
	if err != nil {
		return 0, err
	}
	if *verbose {
		b.explain(*job.ID)
	}
	return float64(end.Sub(start).Microseconds()) / 1000, nil
}

// rawexec16 is one start of the 16 tasks as a plain Nomad raw_exec job.
func (b *bench) rawexec16(i int) (float64, error) {
	id, name, count, mem, cpu := fmt.Sprintf("raw16-%d", i), "w", 16, 128, 100
	job := &api.Job{ID: &id, Name: &id, Type: ptr("batch"), Datacenters: []string{"*"},
		TaskGroups: []*api.TaskGroup{{Name: &name, Count: &count,
			Constraints:      []*api.Constraint{{Operand: api.ConstraintDistinctProperty, LTarget: jobspec.NodeIDAttr, RTarget: "6"}},
			RestartPolicy:    &api.RestartPolicy{Attempts: ptr(0), Mode: ptr("fail")},
			ReschedulePolicy: &api.ReschedulePolicy{Attempts: ptr(0), Unlimited: ptr(false)},
			Tasks: []*api.Task{{Name: "worker", Driver: "raw_exec", Config: map[string]any{"command": b.worker, "args": []string{"stamp"}},
				Resources: &api.Resources{CPU: &cpu, MemoryMB: &mem}}}}}}
	start := time.Now()
	if _, _, err := b.nomad.Jobs().Register(job, nil); err != nil {
		return 0, err
	}
	end, err := b.lastStamp(id, 16)
	b.nomad.Jobs().Deregister(id, true, nil)
	if err != nil {
		return 0, err
	}
	return float64(end.Sub(start).Microseconds()) / 1000, nil
}

// sortGang runs the sort as a 12-worker gang and returns its records/s.
func (b *bench) sortGang(i int) (float64, error) {
	spec := &jobspec.Job{Name: fmt.Sprintf("sort-%d", i), Priority: 50, Datacenters: []string{"*"}, NodePool: "default",
		MaxRuntime: 10 * time.Minute, GangTimeout: 3 * time.Minute,
		Groups: []*jobspec.Group{{Name: "sort", Count: 12, MaxPerNode: 4, Address: fmt.Sprintf("sort-%d", i), Driver: jobspec.DriverMicroVM,
			Resources: jobspec.Resources{CPU: 100, MemoryMB: 128}, Program: jobspec.Program{Path: b.sort, Args: []string{"-records", strconv.Itoa(*records)}}}}}
	job := jobspec.ToNomad(spec)
	if _, _, err := b.endpoint.Jobs().Register(job, nil); err != nil {
		return 0, err
	}
	if err := b.waitCohort(*job.ID); err != nil {
		return 0, err
	}
	return b.sortRate(*job.ID)
}

// sortRaw runs the same sort as 12 raw_exec processes on one host, over
// loopback addresses, and returns its records/s.
func (b *bench) sortRaw(i int) (float64, error) {
	id, name, count, mem, cpu := fmt.Sprintf("sortraw-%d", i), "sort", 12, 128, 100
	var peers []string
	for r := 0; r < count; r++ {
		peers = append(peers, fmt.Sprintf(`"127.0.2.%d"`, r))
	}
	env := map[string]string{
		"COHORT_JOB": id, "COHORT_GROUP": name, "COHORT_RANK": "${NOMAD_ALLOC_INDEX}", "COHORT_SIZE": strconv.Itoa(count),
		"COHORT_PEERS":       fmt.Sprintf(`[{"Group":"sort","Names":[%s]}]`, strings.Join(peers, ",")),
		"COHORT_LISTEN_HOST": "127.0.2.${NOMAD_ALLOC_INDEX}",
	}
	node := b.c.Nodes()[0].Name
	job := &api.Job{ID: &id, Name: &id, Type: ptr("batch"), Datacenters: []string{"*"},
		TaskGroups: []*api.TaskGroup{{Name: &name, Count: &count,
			Constraints:      []*api.Constraint{{LTarget: "${node.unique.name}", Operand: "=", RTarget: node}},
			RestartPolicy:    &api.RestartPolicy{Attempts: ptr(0), Mode: ptr("fail")},
			ReschedulePolicy: &api.ReschedulePolicy{Attempts: ptr(0), Unlimited: ptr(false)},
			Tasks: []*api.Task{{Name: "worker", Driver: "raw_exec", Env: env,
				Config:    map[string]any{"command": b.sort, "args": []string{"-records", strconv.Itoa(*records)}},
				Resources: &api.Resources{CPU: &cpu, MemoryMB: &mem}}}}}}
	if _, _, err := b.nomad.Jobs().Register(job, nil); err != nil {
		return 0, err
	}
	defer b.nomad.Jobs().Deregister(id, true, nil)
	deadline := time.Now().Add(10 * time.Minute)
	for time.Now().Before(deadline) {
		if r, err := b.sortRate(id); err == nil {
			return r, nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return 0, fmt.Errorf("the raw_exec sort did not report")
}

// waitCohort waits until the gang's run ended, and says how.
func (b *bench) waitCohort(id string) error {
	deadline := time.Now().Add(10 * time.Minute)
	for time.Now().Before(deadline) {
		v, err := b.cohort.Job("", id, false)
		if err == nil && v.Ended() {
			if v.Status != cohortapi.StatusFinished || v.Reason != cohortapi.ReasonExited {
				b.explain(id)
				return fmt.Errorf("gang %s: %s: %s", id, v.Status, v.Reason)
			}
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("gang %s did not end", id)
}

// lastStamp waits for want tasks of a job to print their stamp and returns
// the latest.
func (b *bench) lastStamp(id string, want int) (time.Time, error) {
	deadline := time.Now().Add(5 * time.Minute)
	for time.Now().Before(deadline) {
		outs, err := b.logs(id)
		if err == nil {
			var last int64
			n := 0
			for _, o := range outs {
				if ns, ok := strings.CutPrefix(strings.TrimSpace(o), "stamp "); ok {
					v, _ := strconv.ParseInt(ns, 10, 64)
					last, n = max(last, v), n+1
				}
			}
			if n == want {
				return time.Unix(0, last), nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return time.Time{}, fmt.Errorf("job %s: not every task stamped", id)
}

// sortRate is rank 0's records/s.
func (b *bench) sortRate(id string) (float64, error) {
	outs, err := b.logs(id)
	if err != nil {
		return 0, err
	}
	for _, o := range outs {
		for _, line := range strings.Split(o, "\n") {
			if !strings.HasPrefix(line, "sort: ") {
				continue
			}
			if !strings.Contains(line, "VERIFIED") {
				return 0, fmt.Errorf("job %s: %s", id, line)
			}
			var n, mb, w, ms int
			var rate float64
			if _, err := fmt.Sscanf(line, "sort: %d records (%d MB) across %d workers in %d ms: %f records/s", &n, &mb, &w, &ms, &rate); err != nil {
				return 0, fmt.Errorf("job %s: %q: %w", id, line, err)
			}
			return rate, nil
		}
	}
	return 0, fmt.Errorf("job %s: no report yet", id)
}

// explain prints, for a gang that failed, each worker's node, state,
// task events and the tails of its output.
func (b *bench) explain(id string) {
	allocs, _, err := b.nomad.Jobs().Allocations(id, false, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, "explain:", err)
		return
	}
	for _, stub := range allocs {
		fmt.Fprintf(os.Stderr, "== %s on %s: %s\n", stub.Name, stub.NodeName, stub.ClientStatus)
		for _, ts := range stub.TaskStates {
			for _, e := range ts.Events {
				fmt.Fprintf(os.Stderr, "   %s %s: %s\n", time.Unix(0, e.Time).Format("15:04:05.000"), e.Type, e.DisplayMessage)
			}
		}
		for _, f := range []string{"stdout", "stderr"} {
			if out, err := b.cat(stub.ID, "alloc/logs/worker."+f+".0"); err == nil {
				fmt.Fprintf(os.Stderr, "   %s: %q\n", f, out[max(0, len(out)-4096):])
			}
		}
	}
}

// cat reads the first MiB of a file in an allocation's directory
// through the Nomad server, over the bench's one HTTP client. The api's
// AllocFS reads from the client node directly over a new transport per
// call, whose idle connection then lingers: the bench polls logs every
// 100 ms, and so held hundreds of connections until Nomad's limit per
// address (100) refused the rest with 429.
func (b *bench) cat(allocID, path string) (string, error) {
	r, err := b.nomad.Raw().Response("/v1/client/fs/cat/"+allocID, &api.QueryOptions{Params: map[string]string{"path": path}})
	if err != nil {
		return "", err
	}
	defer r.Close()
	out, err := io.ReadAll(io.LimitReader(r, 1<<20))
	return string(out), err
}

// logs is every allocation's stdout of a job.
func (b *bench) logs(id string) ([]string, error) {
	allocs, _, err := b.nomad.Jobs().Allocations(id, false, nil)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, stub := range allocs {
		o, err := b.cat(stub.ID, "alloc/logs/worker.stdout.0")
		if err != nil {
			continue
		}
		out = append(out, o)
	}
	return out, nil
}

func pct(xs []float64, p int) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	i := (len(s)*p + 99) / 100
	return s[max(0, min(len(s)-1, i-1))]
}

func ptr[T any](v T) *T { return &v }
