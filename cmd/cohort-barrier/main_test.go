package main

import (
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/jobspec"
)

// With TLS, a barrier task whose template rendered no token (the job's
// variable holds other items, and cohort has not written the run's token
// yet) waits for the token, which restarts it, and reports nothing: a
// report without a token would only be refused.
func TestWaitsForItsToken(t *testing.T) {
	var reports atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reports.Add(1)
		http.Error(w, "refused", http.StatusForbidden)
	}))
	defer srv.Close()
	ca, err := tlsutil.NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{
		"COHORT_SERVERS": srv.URL, "NOMAD_JOB_ID": "j", "NOMAD_NAMESPACE": "default", "NOMAD_ALLOC_ID": "a",
		"COHORT_CA_PEM": string(ca.CertPEM),
	}
	stdout, _ := os.Create(filepath.Join(t.TempDir(), "stdout"))
	stderr, _ := os.Create(filepath.Join(t.TempDir(), "stderr"))
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if code := run(ctx, func(k string) string { return env[k] }, stdout, stderr); code != 1 {
		t.Errorf("exit %d, want 1 once the wait ends", code)
	}
	out, _ := os.ReadFile(stdout.Name())
	errs, _ := os.ReadFile(stderr.Name())
	// The test's deadline stands for Nomad stopping the task.
	if !strings.Contains(string(out), "waiting for gang j's barrier token") || !strings.Contains(string(out), "stopped") {
		t.Errorf("stdout %q, stderr %q", out, errs)
	}
	if n := reports.Load(); n != 0 {
		t.Errorf("%d reports without a token", n)
	}
}

// The names this program reads are the ones the servers set.
func TestEnvironmentNames(t *testing.T) {
	if envTokenFromVariable != jobspec.EnvTokenFromVariable {
		t.Errorf("%s here, %s in jobspec", envTokenFromVariable, jobspec.EnvTokenFromVariable)
	}
}

// A report refused while the token comes from the job's variable is
// tried again (the template restarts the task with this run's token),
// over the one connection, until the wait ends; refused with a token from
// the environment, it fails at once.
func TestRefusalWaitsOnlyForAVariable(t *testing.T) {
	ca, err := tlsutil.NewCA("test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.Issue(tlsutil.Cert{CommonName: "server", DNSNames: []string{tlsutil.ServerName}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	var reports, conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reports.Add(1)
		http.Error(w, `{"Error":"refused"}`, http.StatusForbidden)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.StartTLS()
	defer srv.Close()
	for _, fromVar := range []bool{false, true} {
		reports.Store(0)
		conns.Store(0)
		env := map[string]string{
			"COHORT_SERVERS": srv.URL, "NOMAD_JOB_ID": "j", "NOMAD_NAMESPACE": "default", "NOMAD_ALLOC_ID": "a",
			"COHORT_CA_PEM": string(ca.CertPEM), "COHORT_BARRIER_TOKEN": "stale",
		}
		if fromVar {
			env[jobspec.EnvTokenFromVariable] = "1"
		}
		stderr, _ := os.Create(filepath.Join(t.TempDir(), "stderr"))
		stdout, _ := os.Create(filepath.Join(t.TempDir(), "stdout"))
		ctx, cancel := context.WithTimeout(context.Background(), 3500*time.Millisecond)
		start := time.Now()
		code := run(ctx, func(k string) string { return env[k] }, stdout, stderr)
		cancel()
		errs, _ := os.ReadFile(stderr.Name())
		switch {
		case code != 1:
			t.Errorf("from the variable %t: exit %d", fromVar, code)
		case !fromVar && (reports.Load() != 1 || time.Since(start) > time.Second || !strings.Contains(string(errs), "refused this report")):
			t.Errorf("a refused token from the environment: %d reports in %s, stderr %q", reports.Load(), time.Since(start), errs)
		case fromVar && (reports.Load() < 2 || conns.Load() != 1 || !strings.Contains(string(errs), "waiting for this run's token")):
			t.Errorf("a refused token from the variable: %d reports over %d connections, stderr %q", reports.Load(), conns.Load(), errs)
		}
	}
}
