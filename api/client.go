package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/scheduler/snapshot"
	nomad "github.com/hashicorp/nomad/api"
)

// DefaultAddress is where a client finds cohort when told nothing:
// $COHORT_ADDR, else the local default.
func DefaultAddress() string {
	if v := os.Getenv("COHORT_ADDR"); v != "" {
		return v
	}
	return "http://127.0.0.1:4747"
}

// Config configures a Client.
type Config struct {
	// Address is the server's API, such as http://10.0.0.10:4747; a bare
	// host:port means http. Empty means DefaultAddress.
	Address string
	// HTTPClient carries the requests; nil means a plain one. Its own
	// Timeout, if any, also bounds barrier long polls.
	HTTPClient *http.Client
	// Timeout bounds each call but the barrier's long poll, whose bound
	// is its own wait plus Timeout. Zero means 30 s.
	Timeout time.Duration
	// Token is the caller's Nomad ACL token, sent as Nomad's CLI sends
	// it (X-Nomad-Token): cohort lets a caller do what Nomad's ACLs let
	// the token do.
	Token string
	// TLS is used for https addresses when HTTPClient is nil: the
	// cluster's CA, and a certificate where the server wants one.
	TLS *tls.Config
}

// TokenHeader carries the caller's Nomad ACL token.
const TokenHeader = "X-Nomad-Token"

// Client calls one cohort server.
type Client struct {
	base    string
	http    *http.Client
	timeout time.Duration
	token   string
}

// NewClient returns a client for cfg.
func NewClient(cfg Config) *Client {
	addr := cfg.Address
	if addr == "" {
		addr = DefaultAddress()
	}
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	hc := cfg.HTTPClient
	if hc == nil && cfg.TLS != nil {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.TLSClientConfig = cfg.TLS
		hc = &http.Client{Transport: t}
	}
	if hc == nil {
		hc = &http.Client{}
	}
	t := cfg.Timeout
	if t == 0 {
		t = 30 * time.Second
	}
	return &Client{base: strings.TrimRight(addr, "/"), http: hc, timeout: t, token: cfg.Token}
}

// Address is the server this client calls.
func (c *Client) Address() string { return c.base }

// Error is an answer other than 200 OK.
type Error struct {
	StatusCode int
	Message    string
	// LeaderID and LeaderAddress are set on a 503 from a server that is
	// not the leader and could not forward the call.
	LeaderID, LeaderAddress string `json:",omitempty"`
}

func (e *Error) Error() string {
	if e.Message == "" {
		return http.StatusText(e.StatusCode)
	}
	return e.Message
}

// IsStatus says whether err is an API error with the given HTTP status.
func IsStatus(err error, code int) bool {
	var e *Error
	return errors.As(err, &e) && e.StatusCode == code
}

// ErrorBody is the JSON body of every error answer.
type ErrorBody struct {
	Error         string `json:"error"`
	LeaderID      string `json:"leader_id,omitempty"`
	LeaderAddress string `json:"leader_address,omitempty"`
}

// maxResponse bounds what the client reads of one answer.
const maxResponse = 64 << 20

func nsQuery(ns string) url.Values {
	q := url.Values{}
	if ns != "" && ns != DefaultNamespace {
		q.Set("namespace", ns)
	}
	return q
}

// JobPath is the API path of a job, its ID escaped.
func JobPath(id string) string { return "/v1/job/" + url.PathEscape(id) }

// do sends one request and decodes the answer into out (when non-nil).
func (c *Client) do(ctx context.Context, method, path string, q url.Values, in, out any) error {
	var body io.Reader
	ctype := ""
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("encoding the request: %w", err)
		}
		body, ctype = bytes.NewReader(b), "application/json"
	}
	resp, err := c.send(ctx, method, path, q, body, ctype)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return fmt.Errorf("reading the answer to %s %s: %w", method, path, err)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("decoding the answer to %s %s: %w", method, path, err)
		}
	}
	return nil
}

// send sends one request and returns a 200's response, its body for the
// caller to read and close; any other status becomes an *Error.
func (c *Client) send(ctx context.Context, method, path string, q url.Values, body io.Reader, ctype string) (*http.Response, error) {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, err
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	if c.token != "" {
		req.Header.Set(TokenHeader, c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	e := &Error{StatusCode: resp.StatusCode}
	var eb ErrorBody
	if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
		e.Message, e.LeaderID, e.LeaderAddress = eb.Error, eb.LeaderID, eb.LeaderAddress
	} else {
		e.Message = fmt.Sprintf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(b)))
	}
	return nil, e
}

func (c *Client) call(method, path string, q url.Values, in, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), c.timeout)
	defer cancel()
	return c.do(ctx, method, path, q, in, out)
}

// Submit admits a Nomad job carrying cohort's gang meta.
func (c *Client) Submit(job *nomad.Job) (SubmitResponse, error) {
	var r SubmitResponse
	err := c.call(http.MethodPost, "/v1/jobs", nil, SubmitRequest{Job: job}, &r)
	return r, err
}

// Job reads one job; with workers, each worker's state too.
func (c *Client) Job(ns, id string, workers bool) (JobView, error) {
	q := nsQuery(ns)
	if workers {
		q.Set("workers", "1")
	}
	var v JobView
	err := c.call(http.MethodGet, JobPath(id), q, nil, &v)
	return v, err
}

// Jobs lists every job in submission order.
func (c *Client) Jobs() ([]JobView, error) {
	var vs []JobView
	err := c.call(http.MethodGet, "/v1/jobs", nil, nil, &vs)
	return vs, err
}

// Stop ends a job at any stage.
func (c *Client) Stop(ns, id string) error {
	return c.call(http.MethodDelete, JobPath(id), nsQuery(ns), nil, nil)
}

// Bill reads a job's ledger; run 0 is the latest run.
func (c *Client) Bill(ns, id string, run int) (Bill, error) {
	q := nsQuery(ns)
	if run != 0 {
		q.Set("run", strconv.Itoa(run))
	}
	var b Bill
	err := c.call(http.MethodGet, JobPath(id)+"/bill", q, nil, &b)
	return b, err
}

// Queue lists queued jobs in scheduling order.
func (c *Client) Queue() ([]JobView, error) {
	var vs []JobView
	err := c.call(http.MethodGet, "/v1/queue", nil, nil, &vs)
	return vs, err
}

// Nodes lists the nodes as placement sees them.
func (c *Client) Nodes() ([]NodeView, error) {
	var ns []NodeView
	err := c.call(http.MethodGet, "/v1/nodes", nil, nil, &ns)
	return ns, err
}

// Members lists the server group.
func (c *Client) Members() ([]MemberView, error) {
	var ms []MemberView
	err := c.call(http.MethodGet, "/v1/members", nil, nil, &ms)
	return ms, err
}

// RemoveMember takes a server that is gone for good out of the group.
func (c *Client) RemoveMember(id string) error {
	return c.call(http.MethodDelete, "/v1/members/"+url.PathEscape(id), nil, nil, nil)
}

// SnapshotSave copies the group's state, as a snapshot file, to w.
func (c *Client) SnapshotSave(ctx context.Context, w io.Writer) error {
	resp, err := c.send(ctx, http.MethodGet, "/v1/operator/snapshot", nil, nil, "")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(w, resp.Body); err != nil {
		return fmt.Errorf("reading the snapshot: %w", err)
	}
	return nil
}

// SnapshotRestore replaces the group's state with the snapshot file r
// holds, and returns its header as the server read it.
func (c *Client) SnapshotRestore(ctx context.Context, r io.Reader) (snapshot.Header, error) {
	var h snapshot.Header
	resp, err := c.send(ctx, http.MethodPut, "/v1/operator/snapshot", nil, r, "application/octet-stream")
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err == nil {
		err = json.Unmarshal(b, &h)
	}
	return h, err
}

// AgentSelf says who the server is.
func (c *Client) AgentSelf() (AgentSelf, error) {
	var a AgentSelf
	err := c.call(http.MethodGet, "/v1/agent/self", nil, nil, &a)
	return a, err
}

// Leader names the Raft leader.
func (c *Client) Leader() (Leader, error) {
	var l Leader
	err := c.call(http.MethodGet, "/v1/leader", nil, nil, &l)
	return l, err
}

// Health succeeds when the server knows a leader.
func (c *Client) Health() error {
	return c.call(http.MethodGet, "/v1/health", nil, nil, nil)
}

// Join asks the group's leader to add a server (between servers).
func (c *Client) Join(m Member) error {
	return c.call(http.MethodPost, "/v1/members/join", nil, m, nil)
}

// RegisterMember records a server's addresses with the leader (between
// servers).
func (c *Client) RegisterMember(m Member) error {
	return c.call(http.MethodPost, "/v1/members/register", nil, m, nil)
}

// Barrier reports a worker's boot and waits up to req.Wait for the
// verdict.
func (c *Client) Barrier(ctx context.Context, ns, job string, req BarrierRequest) (BarrierResponse, error) {
	wait := time.Duration(0)
	if req.Wait != "" {
		d, err := time.ParseDuration(req.Wait)
		if err != nil {
			return BarrierResponse{}, fmt.Errorf("bad wait %q: %w", req.Wait, err)
		}
		wait = d
	}
	ctx, cancel := context.WithTimeout(ctx, wait+c.timeout)
	defer cancel()
	var v BarrierResponse
	err := c.do(ctx, http.MethodPost, "/v1/barrier/"+url.PathEscape(job), nsQuery(ns), req, &v)
	return v, err
}

// Lease asks for (or renews) this node's worker subnet.
func (c *Client) Lease(req LeaseRequest) (Lease, error) {
	var l Lease
	err := c.call(http.MethodPost, "/v1/network/lease", nil, req, &l)
	return l, err
}

// Leases reads every node's subnet; with index > 0 it waits up to wait for
// the table to move past index.
func (c *Client) Leases(ctx context.Context, index uint64, wait time.Duration) (LeaseTable, error) {
	q := url.Values{}
	if index > 0 {
		q.Set("index", strconv.FormatUint(index, 10))
		q.Set("wait", wait.String())
	}
	ctx, cancel := context.WithTimeout(ctx, wait+c.timeout)
	defer cancel()
	var t LeaseTable
	err := c.do(ctx, http.MethodGet, "/v1/network/leases", q, nil, &t)
	return t, err
}

// ReleaseLease gives a node's subnet up, for a node that left for good.
func (c *Client) ReleaseLease(node string) error {
	return c.call(http.MethodDelete, "/v1/network/lease/"+url.PathEscape(node), nil, nil, nil)
}
