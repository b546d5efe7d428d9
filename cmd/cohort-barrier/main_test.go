package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
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
	if !strings.Contains(string(out), "waiting for gang j's barrier token") || !strings.Contains(string(errs), "no barrier token") {
		t.Errorf("stdout %q, stderr %q", out, errs)
	}
	if n := reports.Load(); n != 0 {
		t.Errorf("%d reports without a token", n)
	}
}
