package command

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"

	nomadapi "github.com/hashicorp/nomad/api"
)

// fakeNomadLogs serves a job's allocations and their logs as Nomad does:
// frames of JSON with the bytes in Data, split mid-line.
func fakeNomadLogs(t *testing.T) *nomadapi.Client {
	t.Helper()
	allocs := []nomadapi.AllocationListStub{
		{ID: "old0", Name: "j.w[0]", JobVersion: 1, ClientStatus: "failed"},
		{ID: "a0", Name: "j.w[0]", JobVersion: 2, ClientStatus: "complete"},
		{ID: "a1", Name: "j.w[1]", JobVersion: 2, ClientStatus: "complete"},
		{ID: "c0", Name: "j.coord[0]", JobVersion: 2, ClientStatus: "complete",
			TaskStates: map[string]*nomadapi.TaskState{"cohort-barrier": {}, "main": {}}},
	}
	var mu sync.Mutex
	tries := map[string]int{}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/job/j/allocations", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(allocs)
	})
	mux.HandleFunc("/v1/client/fs/logs/", func(w http.ResponseWriter, r *http.Request) {
		id := strings.TrimPrefix(r.URL.Path, "/v1/client/fs/logs/")
		task, kind := r.URL.Query().Get("task"), r.URL.Query().Get("type")
		want := "worker"
		if id == "c0" {
			want = "main"
		}
		if task != want {
			http.Error(w, "unknown task "+task, http.StatusNotFound)
			return
		}
		// The first ask for a worker's log finds its task not started
		// (held at the barrier); following asks again.
		mu.Lock()
		tries[id+kind]++
		first := tries[id+kind] == 1
		mu.Unlock()
		if first && id == "a0" && r.URL.Query().Get("follow") == "true" {
			http.Error(w, `task "worker" not started yet. No logs available`, http.StatusNotFound)
			return
		}
		enc := json.NewEncoder(w)
		text := id + " " + kind + " one\n" + id + " " + kind + " two\nno newline"
		off, _ := strconv.Atoi(r.URL.Query().Get("offset"))
		text = text[min(off, len(text)):]
		if text == "" {
			return
		}
		enc.Encode(nomadapi.StreamFrame{Data: []byte(text[:len(text)/2])})
		enc.Encode(nomadapi.StreamFrame{Data: []byte(text[len(text)/2:])})
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	c, err := nomadapi.NewClient(&nomadapi.Config{Address: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func sortedLines(b *bytes.Buffer) string {
	lines := strings.Split(strings.TrimSpace(b.String()), "\n")
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func TestLogsPrefixesEveryLine(t *testing.T) {
	var out, errOut bytes.Buffer
	l := &logStreamer{nomad: fakeNomadLogs(t), job: "j", rank: -1, stdout: &out, stderr: &errOut, started: map[string]bool{}}
	if err := l.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	want := strings.Join([]string{
		"coord[0] c0 stdout one", "coord[0] c0 stdout two", "coord[0] no newline",
		"w[0] a0 stdout one", "w[0] a0 stdout two", "w[0] no newline",
		"w[1] a1 stdout one", "w[1] a1 stdout two", "w[1] no newline",
	}, "\n")
	if got := sortedLines(&out); got != want {
		t.Errorf("stdout:\n%s\nwant (the old run's worker left out):\n%s", got, want)
	}
	if got := sortedLines(&errOut); !strings.Contains(got, "w[1] a1 stderr two") || strings.Contains(got, "stdout") {
		t.Errorf("stderr:\n%s", got)
	}
}

// Following, a worker whose task had not started is read once it has;
// the command ends once every worker has ended.
func TestLogsFollowWaitsForTasks(t *testing.T) {
	var out, errOut bytes.Buffer
	l := &logStreamer{nomad: fakeNomadLogs(t), job: "j", group: "w", rank: 0, follow: true, stdout: &out, stderr: &errOut, started: map[string]bool{}}
	if err := l.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := sortedLines(&out); got != "w[0] a0 stdout one\nw[0] a0 stdout two\nw[0] no newline" || strings.Contains(errOut.String(), "reading") || !strings.Contains(errOut.String(), "w[0] a0 stderr one") {
		t.Errorf("stdout:\n%s\nstderr:\n%s", got, errOut.String())
	}
}

func TestLogsFilters(t *testing.T) {
	var out, errOut bytes.Buffer
	l := &logStreamer{nomad: fakeNomadLogs(t), job: "j", group: "w", rank: 1, stdout: &out, stderr: &errOut, started: map[string]bool{}}
	if err := l.run(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := sortedLines(&out); got != "w[1] a1 stdout one\nw[1] a1 stdout two\nw[1] no newline" {
		t.Errorf("stdout:\n%s", got)
	}
	l = &logStreamer{nomad: fakeNomadLogs(t), job: "j", group: "nope", rank: -1, stdout: &out, stderr: &errOut, started: map[string]bool{}}
	if err := l.run(context.Background()); err == nil || !strings.Contains(err.Error(), "no workers") {
		t.Errorf("no such group: %v", err)
	}
}

// Following a job cohort does not know is an error at once; following a
// gang that has ended with no workers ends.
func TestLogsFollowEnds(t *testing.T) {
	var out, errOut bytes.Buffer
	l := &logStreamer{nomad: fakeNomadLogs(t), job: "nope", rank: -1, follow: true, stdout: &out, stderr: &errOut, started: map[string]bool{},
		ended: func() (bool, error) { return false, errors.New("no job nope") }}
	if err := l.run(context.Background()); err == nil || !strings.Contains(err.Error(), "no job nope") {
		t.Errorf("unknown job: %v", err)
	}
	l = &logStreamer{nomad: fakeNomadLogs(t), job: "j", group: "none", rank: -1, follow: true, stdout: &out, stderr: &errOut, started: map[string]bool{},
		ended: func() (bool, error) { return true, nil }}
	if err := l.run(context.Background()); err != nil {
		t.Errorf("ended gang: %v", err)
	}
}
