package e2e

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestLogsFollowsAGang: cohort logs -f on a running two-worker gang prints
// every line of both workers, prefixed with group and rank, as they come,
// and ends by itself once the gang has ended.
func TestLogsFollowsAGang(t *testing.T) {
	c, _ := cluster(t)
	addr := cohortServer(t, c)
	cohortRun(t, addr, rawGang("talk", 2, "30s", "/bin/sh", "-c",
		"for i in 1 2 3 4 5 6 7 8; do echo tick $i; echo warn $i >&2; sleep 0.5; done"))
	waitStatus(t, addr, "talk", "running")
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := cohortCmd("logs", "-f", "-address", addr, "talk")
	cmd.Env = append(cmd.Env, c.NomadEnv()...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { <-ctx.Done(); cmd.Process.Kill() }()
	err := cmd.Wait()
	t.Logf("cohort logs -f ended after %s: %v\n%s", time.Since(start).Round(time.Millisecond), err, stdout.String())
	if err != nil || ctx.Err() != nil {
		t.Fatalf("cohort logs -f did not end by itself with the gang: %v\nstderr:\n%s", err, stderr.String())
	}
	for _, w := range []string{"w[0]", "w[1]"} {
		for _, want := range []string{w + " tick 1\n", w + " tick 8\n"} {
			if !strings.Contains(stdout.String(), want) {
				t.Errorf("stdout lacks %q", want)
			}
		}
		if !strings.Contains(stderr.String(), w+" warn 8\n") {
			t.Errorf("stderr lacks %s warn 8:\n%s", w, stderr.String())
		}
	}
	// The gang's start is in the server's histograms.
	waitStatus(t, addr, "talk", "finished")
	resp, err := http.Get(addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{"cohort_admission_seconds_count 1", "cohort_gang_start_seconds_count 1",
		"cohort_barrier_wait_seconds_count 2", `cohort_jobs{status="finished"} 1`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
