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
	"crypto/tls"
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

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/placement"
	nomadapi "github.com/hashicorp/nomad/api"
)

// NomadProxy serves the Nomad-compatible endpoint in front of the Nomad
// API at nomadAddr.
type NomadProxy struct {
	s     *Server
	nomad *url.URL
	proxy *httputil.ReverseProxy
	// http asks Nomad itself (plans), over Nomad's TLS where it has it.
	http *http.Client

	mu    sync.Mutex
	evals map[string]syntheticEval
}

type syntheticEval struct {
	JobID, Namespace string
	At               time.Time
}

// NewNomadProxy returns the endpoint for s in front of nomadAddr;
// nomadTLS, when Nomad speaks HTTPS, verifies it and holds cohort's
// client certificate for it.
func (s *Server) NewNomadProxy(nomadAddr string, nomadTLS *tls.Config) (*NomadProxy, error) {
	u, err := url.Parse(nomadAddr)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("nomad address %q is not a URL", nomadAddr)
	}
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = nomadTLS
	p := &NomadProxy{s: s, nomad: u, proxy: httputil.NewSingleHostReverseProxy(u), evals: map[string]syntheticEval{},
		http: &http.Client{Timeout: 10 * time.Second, Transport: t}}
	p.proxy.Transport = t
	// Streams (logs, event stream, exec) must reach the client as they
	// come.
	p.proxy.FlushInterval = -1
	return p, nil
}

func (p *NomadProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	// Both registration routes: /v1/jobs (nomad job run) and
	// /v1/job/{id} (the API's job update).
	jobPath := strings.HasPrefix(r.URL.Path, "/v1/job/") && strings.Count(r.URL.Path, "/") == 3
	switch {
	case (r.Method == http.MethodPut || r.Method == http.MethodPost) && (r.URL.Path == "/v1/jobs" || jobPath):
		p.register(w, r)
	case r.Method == http.MethodDelete && jobPath:
		p.deregister(w, r)
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
	body, err := io.ReadAll(io.LimitReader(r.Body, maxJobBody+1))
	if err != nil {
		nomadErr(w, http.StatusBadRequest, err)
		return
	}
	if len(body) > maxJobBody {
		nomadErr(w, http.StatusRequestEntityTooLarge, fmt.Errorf("job over %d bytes", maxJobBody))
		return
	}
	var req nomadapi.JobRegisterRequest
	if err := json.Unmarshal(body, &req); err != nil || req.Job == nil || req.Job.Meta[jobspec.MetaGang] == "" {
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		p.proxy.ServeHTTP(w, r)
		return
	}
	// The namespace as Nomad would take it: the query (-namespace) first,
	// then the request, then the job's own.
	if ns := namespaceForJob(req.Job.Namespace, r.URL.Query().Get("namespace"), req.Namespace); ns != "" {
		req.Job.Namespace = &ns
	}
	// The job as cohort will register it: normalized, with the barrier
	// task where its driver needs one.
	job, notes, err := p.s.Normalize(req.Job)
	if err != nil {
		nomadErr(w, http.StatusBadRequest, err)
		return
	}
	// Let Nomad judge the job and the caller's token first: a plan is a
	// dry run that needs the same capability as a registration.
	if code, msg := p.plan(r, job); code != http.StatusOK {
		nomadErr(w, code, planRefusal(code, msg, "submitting", job))
		return
	}
	// The plan does not check volume mounts; Nomad's registration would,
	// and cohort registers with its own token.
	if err := p.s.mayMount(p.s.callerOf(r), job); err != nil {
		code, err := refusal(err)
		nomadErr(w, code, err)
		return
	}
	v, err := p.s.submitAnywhere(job, tokenOf(r))
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, ErrRejected) {
			code = http.StatusBadRequest
		}
		nomadErr(w, code, err)
		return
	}
	id := p.newEval(*job.ID, deref(job.Namespace))
	p.s.log.Info("gang admitted through the nomad endpoint", "job", *job.ID, "status", v.Status)
	warn := fmt.Sprintf("cohort: gang %q admitted for gang scheduling (%s, %d workers); it is registered with Nomad "+
		"whole once every worker fits. Follow it with: cohort status %s", *job.ID, v.Status, v.Workers, *job.ID)
	for _, n := range append(notes, v.Warnings...) {
		if !strings.Contains(warn, n) {
			warn += "\n* " + n
		}
	}
	writeJSON(w, http.StatusOK, nomadapi.JobRegisterResponse{EvalID: id, Warnings: warn})
}

// deregister stops a gang cohort knows (`nomad job stop`), at whatever
// stage it is, queued included, where Nomad has nothing to stop yet; any
// other job, and a purge, go on to Nomad.
func (p *NomadProxy) deregister(w http.ResponseWriter, r *http.Request) {
	id, err := url.PathUnescape(strings.TrimPrefix(r.URL.Path, "/v1/job/"))
	if err != nil || jobspec.ValidateJobID(id) != nil {
		p.proxy.ServeHTTP(w, r)
		return
	}
	ns := r.URL.Query().Get("namespace")
	if jobspec.ValidateNamespace(ns) != nil {
		p.proxy.ServeHTTP(w, r)
		return
	}
	j, known := p.s.job(placement.Key(normNS(ns), id))
	if !known || j.Ended() {
		p.proxy.ServeHTTP(w, r)
		return
	}
	// Nomad's own check of the caller's token comes first. Stopping a job
	// takes the submit-job capability, as planning one does: Nomad plans
	// the gang's job with the caller's token.
	var stored nomadapi.Job
	if err := json.Unmarshal(j.Nomad, &stored); err != nil {
		nomadErr(w, http.StatusInternalServerError, fmt.Errorf("decoding the stored job: %w", err))
		return
	}
	if code, msg := p.plan(r, &stored); code != http.StatusOK {
		nomadErr(w, code, planRefusal(code, msg, "stopping", &stored))
		return
	}
	if err := p.s.stopAnywhere(normNS(ns), id, tokenOf(r)); err != nil {
		nomadErr(w, http.StatusInternalServerError, err)
		return
	}
	if r.URL.Query().Get("purge") == "true" {
		p.proxy.ServeHTTP(w, r)
		return
	}
	eval := p.newEval(id, ns)
	p.s.log.Info("gang stopped through the nomad endpoint", "job", placement.Key(normNS(ns), id))
	writeJSON(w, http.StatusOK, nomadapi.JobDeregisterResponse{EvalID: eval})
}

// namespaceForJob is the namespace Nomad registers a job in: the query's,
// then the request's, then the job's own.
func namespaceForJob(job *string, query, request string) string {
	switch {
	case query != "":
		return query
	case request != "":
		return request
	}
	return deref(job)
}

// ask sends Nomad one request with the caller's headers (its ACL token)
// and returns Nomad's status and the start of its answer.
func (p *NomadProxy) ask(r *http.Request, method, path, rawQuery string, body []byte) (int, string) {
	u := *p.nomad
	u.Path, u.RawQuery = path, rawQuery
	req, err := http.NewRequestWithContext(r.Context(), method, u.String(), bytes.NewReader(body))
	if err != nil {
		return http.StatusInternalServerError, err.Error()
	}
	req.Header = r.Header.Clone()
	// The answer is read here, not passed on: let the transport undo
	// any compression.
	req.Header.Del("Accept-Encoding")
	resp, err := p.http.Do(req)
	if err != nil {
		return http.StatusBadGateway, fmt.Sprintf("asking nomad (%s %s): %v", method, path, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return resp.StatusCode, strings.TrimSpace(string(msg))
}

func (p *NomadProxy) newEval(jobID, ns string) string {
	id := newEvalID()
	p.mu.Lock()
	defer p.mu.Unlock()
	for old, ev := range p.evals {
		if time.Since(ev.At) > time.Hour { // long after any monitor gave up
			delete(p.evals, old)
		}
	}
	p.evals[id] = syntheticEval{JobID: jobID, Namespace: ns, At: time.Now()}
	return id
}

// plan asks Nomad to plan job with the caller's headers (its ACL token).
func (p *NomadProxy) plan(r *http.Request, job *nomadapi.Job) (int, string) {
	b, err := json.Marshal(nomadapi.JobPlanRequest{Job: job})
	if err != nil {
		return http.StatusBadRequest, err.Error()
	}
	q := r.URL.Query()
	q.Set("namespace", nomadNS(deref(job.Namespace)))
	return p.ask(r, http.MethodPut, "/v1/job/"+url.PathEscape(*job.ID)+"/plan", q.Encode(), b)
}

// planRefusal is Nomad's refusal of a plan made with the caller's token,
// saying what the token lacks when it was the token.
func planRefusal(code int, msg, doing string, job *nomadapi.Job) error {
	if code == http.StatusForbidden {
		return fmt.Errorf("permission denied: %s gang %s in namespace %s needs the submit-job capability (nomad: %s)", doing, deref(job.ID), nomadNS(deref(job.Namespace)), msg)
	}
	return errors.New(msg)
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
		writeJSON(w, http.StatusOK, nomadapi.Evaluation{
			ID: id, JobID: ev.JobID, Namespace: ev.Namespace, Type: "batch", TriggeredBy: "job-register",
			Status: "complete", StatusDescription: "admitted by cohort's gang scheduler",
			CreateTime: ev.At.UnixNano(), ModifyTime: ev.At.UnixNano(),
		})
	case "allocations":
		writeJSON(w, http.StatusOK, []nomadapi.AllocationListStub{})
	default:
		return false
	}
	return true
}

// submitAnywhere submits on the leader: here, or over its HTTP API with
// the caller's token (which the leader checks again).
func (s *Server) submitAnywhere(job *nomadapi.Job, token string) (api.SubmitResponse, error) {
	if s.r.IsLeader() {
		sub, err := s.Submit(job)
		if err != nil {
			return api.SubmitResponse{}, err
		}
		return api.SubmitResponse{JobView: view(&sub.Job), Warnings: sub.Notes}, nil
	}
	target := s.leaderURL()
	if target == "" {
		return api.SubmitResponse{}, errors.New("no cohort leader is known yet; try again in a moment")
	}
	v, err := s.peer(target, token).Submit(job)
	if api.IsStatus(err, http.StatusBadRequest) {
		err = fmt.Errorf("%w: %v", ErrRejected, err)
	}
	return v, err
}

// stopAnywhere stops a job on the leader: here, or over its HTTP API.
func (s *Server) stopAnywhere(ns, id, token string) error {
	if s.r.IsLeader() {
		_, err := s.Stop(placement.Key(ns, id))
		return err
	}
	target := s.leaderURL()
	if target == "" {
		return errors.New("no cohort leader is known yet; try again in a moment")
	}
	return s.peer(target, token).Stop(ns, id)
}

func nomadNS(ns string) string {
	if ns == "" {
		return api.DefaultNamespace
	}
	return ns
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
