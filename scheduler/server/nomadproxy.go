package server

// The Nomad-compatible endpoint. With NOMAD_ADDR pointing at it, `nomad job
// run` of a job that carries cohort's gang meta goes through gang
// admission instead of straight to Nomad; every other request (job status,
// allocations, logs, the UI, with their ACL token headers) is passed to
// Nomad unchanged.
//
// An admitted gang is registered with Nomad later, whole, by the leader.
// So that `nomad job run` (which monitors the evaluation of its
// registration) has something to follow, the answer names a synthetic
// evaluation that this endpoint reports as complete.

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/hashicorp/nomad/api"
)

// NomadProxy serves the Nomad-compatible endpoint in front of the Nomad
// API at nomadAddr.
type NomadProxy struct {
	s     *Server
	nomad *url.URL
	proxy *httputil.ReverseProxy

	mu    sync.Mutex
	evals map[string]syntheticEval
}

type syntheticEval struct {
	JobID, Namespace string
	At               time.Time
}

// NewNomadProxy returns the endpoint for s in front of nomadAddr.
func (s *Server) NewNomadProxy(nomadAddr string) (*NomadProxy, error) {
	u, err := url.Parse(nomadAddr)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("nomad address %q is not a URL", nomadAddr)
	}
	p := &NomadProxy{s: s, nomad: u, proxy: httputil.NewSingleHostReverseProxy(u), evals: map[string]syntheticEval{}}
	// Streams (logs, event stream, exec) must reach the client as they
	// come.
	p.proxy.FlushInterval = -1
	return p, nil
}

func (p *NomadProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case (r.Method == http.MethodPut || r.Method == http.MethodPost) && r.URL.Path == "/v1/jobs":
		p.register(w, r)
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/v1/evaluation/"):
		if p.evaluation(w, r) {
			return
		}
		p.proxy.ServeHTTP(w, r)
	default:
		p.proxy.ServeHTTP(w, r)
	}
}

// register admits a gang or passes any other job on to Nomad.
func (p *NomadProxy) register(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 8<<20))
	if err != nil {
		nomadErr(w, http.StatusBadRequest, err)
		return
	}
	var req api.JobRegisterRequest
	if err := json.Unmarshal(body, &req); err != nil || req.Job == nil || req.Job.Meta[jobspec.MetaGang] == "" {
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		p.proxy.ServeHTTP(w, r)
		return
	}
	job := req.Job
	// Let Nomad judge the job and the caller's token first: a plan is a
	// dry run that needs the same capability as a registration.
	if code, msg := p.plan(r, job); code != http.StatusOK {
		nomadErr(w, code, errors.New(msg))
		return
	}
	v, err := p.s.submitAnywhere(job)
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, ErrRejected) {
			code = http.StatusBadRequest
		}
		nomadErr(w, code, err)
		return
	}
	id := newEvalID()
	p.mu.Lock()
	for old, ev := range p.evals {
		if time.Since(ev.At) > time.Hour { // long after any monitor gave up
			delete(p.evals, old)
		}
	}
	p.evals[id] = syntheticEval{JobID: *job.ID, Namespace: deref(job.Namespace), At: time.Now()}
	p.mu.Unlock()
	p.s.log.Info("gang admitted through the nomad endpoint", "job", *job.ID, "status", v.Status)
	writeJSON(w, http.StatusOK, api.JobRegisterResponse{
		EvalID: id,
		Warnings: fmt.Sprintf("cohort: gang %q admitted for gang scheduling (%s, %d workers); it is registered with Nomad "+
			"whole once every worker fits. Follow it with: cohort status %s", *job.ID, v.Status, v.Workers, *job.ID),
	})
}

// plan asks Nomad to plan job with the caller's headers (its ACL token).
func (p *NomadProxy) plan(r *http.Request, job *api.Job) (int, string) {
	b, err := json.Marshal(api.JobPlanRequest{Job: job})
	if err != nil {
		return http.StatusBadRequest, err.Error()
	}
	u := *p.nomad
	u.Path = "/v1/job/" + url.PathEscape(*job.ID) + "/plan"
	u.RawQuery = r.URL.RawQuery
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPut, u.String(), bytes.NewReader(b))
	if err != nil {
		return http.StatusInternalServerError, err.Error()
	}
	req.Header = r.Header.Clone()
	resp, err := httpClient.Do(req)
	if err != nil {
		return http.StatusBadGateway, "asking nomad to plan the job: " + err.Error()
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, strings.TrimSpace(string(msg))
}

// evaluation answers for the synthetic evaluations it handed out.
func (p *NomadProxy) evaluation(w http.ResponseWriter, r *http.Request) bool {
	rest := strings.TrimPrefix(r.URL.Path, "/v1/evaluation/")
	id, sub, _ := strings.Cut(rest, "/")
	p.mu.Lock()
	ev, ok := p.evals[id]
	p.mu.Unlock()
	if !ok {
		return false
	}
	switch sub {
	case "":
		writeJSON(w, http.StatusOK, api.Evaluation{
			ID: id, JobID: ev.JobID, Namespace: ev.Namespace, Type: "batch", TriggeredBy: "job-register",
			Status: "complete", StatusDescription: "admitted by cohort's gang scheduler",
			CreateTime: ev.At.UnixNano(), ModifyTime: ev.At.UnixNano(),
		})
	case "allocations":
		writeJSON(w, http.StatusOK, []api.AllocationListStub{})
	default:
		return false
	}
	return true
}

// submitAnywhere submits on the leader: here, or over its HTTP API.
func (s *Server) submitAnywhere(job *api.Job) (JobView, error) {
	if s.r.IsLeader() {
		j, err := s.Submit(job)
		if err != nil {
			return JobView{}, err
		}
		return view(j), nil
	}
	target := s.leaderURL()
	if target == "" {
		return JobView{}, errors.New("no cohort leader is known")
	}
	var v JobView
	err := postJSON(target+"/v1/jobs", map[string]any{"Job": job}, &v)
	if err != nil && strings.Contains(err.Error(), "400 Bad Request") {
		err = fmt.Errorf("%w: %v", ErrRejected, err)
	}
	return v, err
}

// nomadErr answers like Nomad: a plain-text error body.
func nomadErr(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	io.WriteString(w, err.Error())
}

func newEvalID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:32]
}
