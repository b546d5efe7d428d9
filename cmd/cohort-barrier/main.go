// Command cohort-barrier is the start barrier for gang workers on drivers
// that have none of their own (raw_exec, exec, docker, ...). cohort adds
// it to each such group as a prestart task: it reports the worker to the
// cohort servers and exits 0 when the whole gang is released, which lets
// Nomad start the worker's main task; it exits 1 when the gang is aborted
// or no verdict comes within the gang timeout plus a grace period, which
// fails the allocation without ever starting the worker.
//
// It reads what Nomad and cohort put in its environment: NOMAD_JOB_ID,
// NOMAD_NAMESPACE, NOMAD_ALLOC_ID, COHORT_SERVERS (API addresses, comma
// separated), COHORT_GANG_TIMEOUT, and, from servers that speak TLS,
// COHORT_BARRIER_TOKEN (its run's token, which authenticates its reports;
// rendered from the job's Nomad variable by the task's template) and
// COHORT_CA_PEM (the servers' CA). It is built static, so it runs
// under the exec driver's chroot too.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/tlsutil"
)

// grace is how long past the gang timeout a worker still waits: the
// leader decides at the gang timeout, and may need an election first.
const grace = 30 * time.Second

// poll is how long one report may wait for the verdict.
const poll = 30 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	os.Exit(run(ctx, os.Getenv, os.Stdout, os.Stderr))
}

func run(ctx context.Context, env func(string) string, stdout, stderr *os.File) int {
	fail := func(format string, args ...any) int {
		fmt.Fprintf(stderr, "cohort-barrier: "+format+"\n", args...)
		return 1
	}
	var servers []string
	for _, s := range strings.Split(env("COHORT_SERVERS"), ",") {
		if s = strings.TrimSpace(s); s != "" {
			servers = append(servers, s)
		}
	}
	job, ns, alloc := env("NOMAD_JOB_ID"), env("NOMAD_NAMESPACE"), env("NOMAD_ALLOC_ID")
	if len(servers) == 0 || job == "" || alloc == "" {
		return fail("COHORT_SERVERS, NOMAD_JOB_ID and NOMAD_ALLOC_ID must be set; this program runs as a gang's prestart task")
	}
	timeout := 30 * time.Second
	if d, err := time.ParseDuration(env("COHORT_GANG_TIMEOUT")); err == nil && d > 0 {
		timeout = d
	}
	var tlsConf *tls.Config
	if pem := env("COHORT_CA_PEM"); pem != "" {
		ca, err := tlsutil.FromPEM([]byte(pem))
		if err != nil {
			return fail("COHORT_CA_PEM: %v", err)
		}
		tlsConf = ca.ClientConfig()
	}
	b := make([]byte, 8)
	rand.Read(b)
	req := api.BarrierRequest{Alloc: alloc, Instance: hex.EncodeToString(b), Wait: poll.String(), Token: env("COHORT_BARRIER_TOKEN")}

	fromVar := env(envTokenFromVariable) != ""
	began := time.Now()
	stopped := ctx
	ctx, cancel := context.WithTimeout(ctx, timeout+grace)
	defer cancel()
	// ended says why the wait ended when ctx did: Nomad stopping the task
	// (a kill, or its template restarting it with a new token) is not
	// the gang timeout.
	ended := func(why string, args ...any) int {
		if stopped.Err() != nil {
			fmt.Fprintln(stdout, "cohort-barrier: stopped")
			return 1
		}
		return fail(why, args...)
	}
	if tlsConf != nil && req.Token == "" {
		// The token comes from the job's Nomad variable through this
		// task's template, which restarts the task once cohort has
		// written it (a gang registered with Nomad directly gets it when
		// cohort adopts it). A report without it would only be refused.
		fmt.Fprintf(stdout, "waiting for gang %s's barrier token (COHORT_BARRIER_TOKEN, from the job's Nomad variable)\n", job)
		<-ctx.Done()
		return ended("no barrier token within the gang timeout (%s) plus %s: the job's Nomad variable has no item %q", timeout, grace, "cohort_barrier_token")
	}
	fmt.Fprintf(stdout, "waiting at the start barrier of gang %s for the whole gang\n", job)
	// One client per server: each keeps its connection for the next
	// report, where a client per report would leave one open per try.
	clients := make([]*api.Client, len(servers))
	for i, server := range servers {
		clients[i] = api.NewClient(api.Config{Address: server, Timeout: 10 * time.Second, TLS: tlsConf})
	}
	backoff := 100 * time.Millisecond
	var refused error
	for i := 0; ; i++ {
		v, err := clients[i%len(clients)].Barrier(ctx, ns, job, req)
		switch {
		case ctx.Err() != nil && refused != nil:
			return ended("the servers refused this report until the gang timeout (%s) plus %s: %v", timeout, grace, refused)
		case ctx.Err() != nil:
			return ended("the start barrier was not released within the gang timeout (%s) plus %s; last error: %v", timeout, grace, err)
		case api.IsStatus(err, 403) && !fromVar:
			return fail("the servers refused this report: %v", err)
		case api.IsStatus(err, 403):
			// A token from before this run's (a stale item the template
			// rendered before cohort wrote the run's): the run's token
			// restarts this task. Anything else fails at the timeout,
			// with this error.
			if refused == nil {
				fmt.Fprintf(stderr, "cohort-barrier: the servers refused this report, waiting for this run's token: %v\n", err)
				backoff = 2 * time.Second
			}
			refused = err
			if sleep(ctx, backoff) {
				backoff = min(2*backoff, 15*time.Second)
			}
			continue
		case err != nil:
			sleep(ctx, backoff)
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		switch v.Status {
		case api.BarrierRelease:
			fmt.Fprintf(stdout, "released by the start barrier after %d ms\n", time.Since(began).Milliseconds())
			return 0
		case api.BarrierAbort:
			return fail("the gang did not start: %s", v.Reason)
		}
	}
}

// envTokenFromVariable is set (by cohort's servers, in the task's
// environment) when the token comes from the job's Nomad variable through
// the task's template, which restarts the task with a new token: only
// then is a refusal worth waiting out.
const envTokenFromVariable = "COHORT_BARRIER_TOKEN_FROM_VARIABLE"

// sleep waits d, with up to a quarter more at random so that a gang's
// workers do not retry in step, or until ctx ends; it says whether it
// slept the whole time.
func sleep(ctx context.Context, d time.Duration) bool {
	d += time.Duration(mrand.Int64N(int64(d)/4 + 1))
	select {
	case <-ctx.Done():
		return false
	case <-time.After(d):
		return true
	}
}
