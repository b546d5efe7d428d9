// Package e2e runs cohort against real agents: a Consul dev agent and a
// Nomad agent started by internal/devcluster, driven through the same CLIs
// a user types.
//
// The tests need the binaries `make tools` builds; set COHORT_E2E=0 to skip
// them (make unit does), otherwise a missing binary fails the run.
package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/hashicorp/go-hclog"
)

var (
	cohortBin string
	pluginDir string // holds nomad-driver-microvm
	initBin   string // static guest init
	workerBin string // static test program, see driver/vm/vmtest/worker
	sortBin   string // the demo's distributed sort, static
	helloBin  string // the demo's hello worker, static
)

func TestMain(m *testing.M) {
	if os.Getenv("COHORT_E2E") == "0" {
		fmt.Println("e2e: skipped because COHORT_E2E=0")
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "cohort-e2e-bin-")
	if err != nil {
		panic(err)
	}
	cohortBin = filepath.Join(dir, "cohort")
	pluginDir = filepath.Join(dir, "plugins")
	initBin = filepath.Join(dir, "cohort-init")
	workerBin = filepath.Join(dir, "worker")
	sortBin = filepath.Join(dir, "sort")
	helloBin = filepath.Join(dir, "hello")
	for _, b := range []struct {
		out, pkg string
		static   bool
	}{
		{cohortBin, "../cmd/cohort", false},
		{filepath.Join(dir, "cohort-barrier"), "../cmd/cohort-barrier", true},
		{filepath.Join(pluginDir, "nomad-driver-microvm"), "../cmd/nomad-driver-microvm", false},
		{filepath.Join(pluginDir, "nomad-device-accel"), "../cmd/nomad-device-accel", false},
		{initBin, "../driver/guest/init", true},
		{workerBin, "../driver/vm/vmtest/worker", true},
		{sortBin, "../demo/sort", true},
		{helloBin, "../demo/worker", true},
	} {
		build := exec.Command("go", "build", "-o", b.out, b.pkg)
		// go-nvml's header marks functions deprecated that it still wraps.
		build.Env = append(os.Environ(), "CGO_CFLAGS=-O2 -g -Wno-deprecated-declarations")
		if b.static {
			build.Env = append(build.Env, "CGO_ENABLED=0")
		}
		build.Stdout, build.Stderr = os.Stdout, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building", b.pkg, err)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// clusterOpts shapes a test's dev cluster.
type clusterOpts struct {
	nodes   int  // hosts, each in its own network namespace (default 1)
	outside bool // a host outside the cluster, for egress tests
	// microvm loads the microvm driver, reporting to a cohort server the
	// test starts; noEgress keeps its workers inside the cluster.
	microvm, noEgress bool
	// pool is each node's warm pool size (0: none).
	pool int
	// servers are the cohort servers' API ports (on the cluster's server
	// address); one is picked when microvm is set and none is given.
	servers []int
	// tls makes the cluster's CA and certificates: cohort's servers speak
	// HTTPS and the drivers show their node's certificate. nomadSecure
	// also runs Nomad with TLS and ACLs.
	tls, nomadSecure bool
	// accelSysfs is a sysfs tree the accelerator device plugin
	// fingerprints instead of the host's.
	accelSysfs string
	// hostVolumes are host volumes every node offers.
	hostVolumes []string
}

// cluster starts a dev cluster on free ports for one test and stops it
// when the test ends.
func cluster(t *testing.T) (*devcluster.Cluster, string) {
	t.Helper()
	c := startCluster(t, clusterOpts{})
	return c, c.DataDir()
}

// microvmCluster is a cluster with the microvm driver loaded, and a cohort
// server its driver reports gang workers to at the start barrier.
func microvmCluster(t *testing.T) (*devcluster.Cluster, string) {
	t.Helper()
	c, _, _ := microvmServerCluster(t)
	return c, ""
}

// microvmServerCluster also returns the cohort server's API and
// Nomad-compatible endpoint.
func microvmServerCluster(t *testing.T, args ...string) (c *devcluster.Cluster, api, nomadEndpoint string) {
	t.Helper()
	return microvmClusterOpts(t, clusterOpts{microvm: true}, args...)
}

// microvmClusterOpts starts a cluster as opts says and one cohort server.
func microvmClusterOpts(t *testing.T, opts clusterOpts, args ...string) (c *devcluster.Cluster, api, nomadEndpoint string) {
	t.Helper()
	opts.microvm = true
	if len(opts.servers) == 0 {
		opts.servers = []int{freePort(t)}
	}
	nomadListen := freeAddr(t)
	c = startCluster(t, opts)
	api = cohortServerAt(t, c, opts.servers[0], append([]string{"-nomad-listen", nomadListen}, args...)...)
	if opts.nodes > 1 {
		waitNodesReady(t, c)
	}
	return c, api, "http://" + nomadListen
}

// waitNodesReady waits until every node has its worker subnet (leased
// from the cohort servers, so they must be up) and its template: gangs
// over several hosts then restore instead of cold-booting all at once.
func waitNodesReady(t *testing.T, c *devcluster.Cluster) {
	t.Helper()
	waitWithin(t, 3*time.Minute, "every node's template snapshot and worker subnet", func() bool {
		snaps, err1 := c.NodeAttributes("driver.microvm.snapshot")
		nets, err2 := c.NodeAttributes("driver.microvm.network")
		ok := err1 == nil && err2 == nil
		for i := range snaps {
			ok = ok && snaps[i] == "ready" && strings.HasPrefix(nets[i], "10.")
		}
		return ok
	})
}

func startCluster(t *testing.T, opts clusterOpts) *devcluster.Cluster {
	t.Helper()
	if os.Getenv("COHORT_E2E") == "0" {
		t.Skip("COHORT_E2E=0: end-to-end tests disabled")
	}
	nomad, err := devcluster.FindBinary("nomad")
	if err != nil {
		t.Fatal(err)
	}
	consul, err := devcluster.FindBinary("consul")
	if err != nil {
		t.Fatal(err)
	}
	ports, err := devcluster.FreePorts()
	if err != nil {
		t.Fatal(err)
	}
	var mv *devcluster.MicroVM
	if opts.microvm {
		kernel := os.Getenv("COHORT_KERNEL")
		if kernel == "" {
			kernel = devcluster.FindUp(filepath.Join(".tools", "kernel", "vmlinux"))
		}
		if kernel == "" {
			t.Fatal("guest kernel not found: run make kernel or set COHORT_KERNEL")
		}
		mv = &devcluster.MicroVM{Kernel: kernel, Init: initBin, NoEgress: opts.noEgress, Pool: opts.pool}
		for _, p := range opts.servers {
			s := "http"
			if opts.tls || opts.nomadSecure {
				s = "https"
			}
			mv.CohortServers = append(mv.CohortServers, fmt.Sprintf("%s://%s:%d", s, devcluster.ServerIPFor(ports.NomadHTTP), p))
		}
	}
	var accel *devcluster.Accel
	if opts.accelSysfs != "" {
		accel = &devcluster.Accel{SysfsRoot: opts.accelSysfs, FingerprintPeriod: "2s"}
	}
	dataDir := t.TempDir()
	c, err := devcluster.Start(context.Background(), devcluster.Config{
		Accel:       accel,
		DataDir:     dataDir,
		NomadBin:    nomad,
		ConsulBin:   consul,
		PluginDir:   pluginDir,
		MicroVM:     mv,
		Nodes:       opts.nodes,
		Outside:     opts.outside,
		Ports:       ports,
		TLS:         opts.tls,
		NomadSecure: opts.nomadSecure,
		HostVolumes: opts.hostVolumes,
		Logger:      hclog.New(&hclog.LoggerOptions{Name: "devcluster", Output: testWriter{t}, Level: hclog.Info}),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		logs := c.Logs()
		if err := c.Stop(); err != nil {
			t.Errorf("stopping cluster: %v", err)
		}
		if t.Failed() {
			kept := map[string]string{}
			for _, f := range logs {
				kept[filepath.Base(f)] = f
			}
			keepLogs(t, kept)
		}
	})
	return c
}

// keepLogs keeps the agents' logs of a failed test for the developer, in
// cohort-e2e-logs/<test> under the temporary directory: each file of
// logs (name there -> path) that reads.
func keepLogs(t *testing.T, logs map[string]string) {
	keep := filepath.Join(os.TempDir(), "cohort-e2e-logs", t.Name())
	os.MkdirAll(keep, 0o755)
	for name, f := range logs {
		if b, err := os.ReadFile(f); err == nil {
			os.WriteFile(filepath.Join(keep, name), b, 0o644)
		}
	}
	t.Logf("agent logs kept in %s", keep)
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// run runs a command with NOMAD_ADDR pointing at the cluster and returns its
// combined output.
func run(t *testing.T, c *devcluster.Cluster, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), c.NomadEnv()...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func getJSON(t *testing.T, url string, out any) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("GET %s: %s %s", url, resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
}

type alloc struct {
	ID           string
	Name         string
	ClientStatus string
	TaskStates   map[string]struct {
		State  string
		Failed bool
		Events []struct {
			Type     string
			ExitCode int
		}
	}
}

// waitAllocs polls until the job has want allocations and ok accepts them.
func waitAllocs(t *testing.T, c *devcluster.Cluster, job string, want int, ok func([]alloc) bool) []alloc {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var allocs []alloc
	for time.Now().Before(deadline) {
		getJSON(t, c.NomadAddr()+"/v1/job/"+job+"/allocations", &allocs)
		if len(allocs) == want && ok(allocs) {
			return allocs
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("job %s: allocations did not reach the wanted state in 60s: %+v", job, allocs)
	return nil
}

func allStatus(status string) func([]alloc) bool {
	return func(as []alloc) bool {
		for _, a := range as {
			if a.ClientStatus != status {
				return false
			}
		}
		return true
	}
}

// TestPlanRunsOnNomad: `cohort plan` output, given to `nomad job run`,
// registers a job whose workers run with their gang identity and exit.
func TestPlanRunsOnNomad(t *testing.T) {
	c, _ := cluster(t)
	dir := t.TempDir()
	spec := filepath.Join(dir, "hello.nomad.hcl")
	out := run(t, c, cohortBin, "plan", "testdata/hello.hcl")
	if err := os.WriteFile(spec, []byte(out), 0o644); err != nil {
		t.Fatal(err)
	}
	nomad, _ := devcluster.FindBinary("nomad")
	run(t, c, nomad, "job", "run", "-detach", spec)

	allocs := waitAllocs(t, c, "hello", 3, allStatus("complete"))
	var lines []string
	for _, a := range allocs {
		ts := a.TaskStates["worker"]
		if ts.Failed {
			t.Errorf("alloc %s failed: %+v", a.Name, ts)
		}
		stdout := run(t, c, nomad, "alloc", "logs", a.ID, "worker")
		stderr := run(t, c, nomad, "alloc", "logs", "-stderr", a.ID, "worker")
		lines = append(lines, strings.TrimSpace(stdout))
		if strings.TrimSpace(stderr) != "to-stderr" {
			t.Errorf("alloc %s stderr = %q", a.Name, stderr)
		}
	}
	sort.Strings(lines)
	want := []string{
		"hello from rank 0 of 3 in hello-w",
		"hello from rank 1 of 3 in hello-w",
		"hello from rank 2 of 3 in hello-w",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Errorf("worker output =\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(want, "\n"))
	}

	// The gang options survive the trip through Nomad.
	var job struct{ Meta map[string]string }
	getJSON(t, c.NomadAddr()+"/v1/job/hello", &job)
	if job.Meta["cohort.gang"] != "1" || job.Meta["cohort.max_runtime"] != "1m0s" {
		t.Errorf("job meta = %v", job.Meta)
	}
}

// TestPlanJSONAndAddressing: the -json form registers through the HTTP API
// and every worker is registered in Consul under its group's address with
// its rank tag.
func TestPlanJSONAndAddressing(t *testing.T) {
	c, dataDir := cluster(t)
	cmd := exec.Command(cohortBin, "plan", "-json", "testdata/sleeper.hcl")
	body, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(c.NomadAddr()+"/v1/jobs", "application/json", strings.NewReader(string(body)))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("register: %s", resp.Status)
	}
	waitAllocs(t, c, "sleeper", 2, allStatus("running"))

	deadline := time.Now().Add(30 * time.Second)
	var tags []string
	for time.Now().Before(deadline) {
		var entries []struct{ ServiceTags []string }
		getJSON(t, c.ConsulAddr()+"/v1/catalog/service/sleepers", &entries)
		tags = tags[:0]
		for _, e := range entries {
			tags = append(tags, e.ServiceTags...)
		}
		sort.Strings(tags)
		if strings.Join(tags, ",") == "w0,w1" {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if strings.Join(tags, ",") != "w0,w1" {
		t.Fatalf("consul tags for sleepers = %v, want w0,w1", tags)
	}

	// Stopping the cluster leaves no task process and no mount behind.
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if out, _ := exec.Command("pgrep", "-f", "^/bin/sleep 3600$").Output(); len(out) > 0 {
		t.Errorf("task processes left after stop: %s", out)
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), dataDir) {
		t.Errorf("mounts left under %s after stop", dataDir)
	}
}

// TestUIServed: the Nomad agent serves the real web UI, not the placeholder
// a build without -tags ui has.
func TestUIServed(t *testing.T) {
	c, _ := cluster(t)
	resp, err := http.Get(c.NomadAddr() + "/ui/")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	page := string(b)
	if resp.StatusCode != 200 || strings.Contains(page, "UI is not available") || !strings.Contains(page, "nomad-ui") {
		t.Fatalf("GET /ui/: %s\n%.400s", resp.Status, page)
	}
	resp, err = http.Get(c.ConsulAddr() + "/ui/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Errorf("consul GET /ui/: %s", resp.Status)
	}
}
