// Package nomad is the gang scheduler's edge to a Nomad cluster: the
// inventory of nodes with what every allocation (cohort's or not) leaves
// free, the gang jobs registered with Nomad, registering a reserved gang
// pinned to its nodes, watching its allocations and stopping it. Every
// call carries the job's namespace.
package nomad

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-rootcerts"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/nomad/api"
	psstructs "github.com/hashicorp/nomad/plugins/shared/structs"
)

// Client wraps the Nomad API.
type Client struct {
	api *api.Client
	// anon is the same cluster without cohort's token: what a caller
	// without a token is allowed is asked through it, never through
	// cohort's own token.
	anon *api.Client
	cfg  Config

	mu sync.Mutex
	// cluster is the watcher's copy of the nodes and allocations (see
	// events.go); nil until its first read.
	cluster *cluster
	gangs   []GangJob
	// watching is set while Watch keeps the lists current.
	watching bool
}

// Config is how cohort reaches Nomad, as Nomad's own CLI is configured.
type Config struct {
	Address string // "" means $NOMAD_ADDR or the default
	Token   string // cohort's own ACL token
	// CACert verifies Nomad's certificate (CAPath: a directory of CA
	// certificates does); ClientCert and ClientKey are cohort's when
	// Nomad verifies its HTTPS clients; TLSServerName is the name to
	// verify Nomad's certificate against. SkipVerify trusts any
	// certificate, as NOMAD_SKIP_VERIFY does: for tests only.
	CACert, CAPath, ClientCert, ClientKey, TLSServerName string
	SkipVerify                                           bool
}

// tlsSet says whether any TLS setting is given.
func (cfg Config) tlsSet() bool {
	return cfg.CACert != "" || cfg.CAPath != "" || cfg.ClientCert != "" || cfg.TLSServerName != "" || cfg.SkipVerify
}

// apiConfig is the Nomad API client's configuration for token.
func (cfg Config) apiConfig(token string) *api.Config {
	c := api.DefaultConfig()
	if cfg.Address != "" {
		c.Address = cfg.Address
	}
	c.SecretID = token
	if cfg.tlsSet() {
		c.TLSConfig = &api.TLSConfig{CACert: cfg.CACert, CAPath: cfg.CAPath, ClientCert: cfg.ClientCert, ClientKey: cfg.ClientKey,
			TLSServerName: cfg.TLSServerName, Insecure: cfg.SkipVerify}
	}
	return c
}

// TLS is the TLS configuration for talking to Nomad directly (the
// Nomad-compatible endpoint's proxy), nil for plain HTTP.
func (cfg Config) TLS() (*tls.Config, error) {
	if !cfg.tlsSet() {
		return nil, nil
	}
	tc := &tls.Config{ServerName: cfg.TLSServerName, MinVersion: tls.VersionTLS12, InsecureSkipVerify: cfg.SkipVerify}
	if cfg.CACert != "" || cfg.CAPath != "" {
		// As Nomad's CLI: the file if given, else every certificate in
		// the directory.
		pool, err := rootcerts.LoadCACerts(&rootcerts.Config{CAFile: cfg.CACert, CAPath: cfg.CAPath})
		if err != nil {
			return nil, fmt.Errorf("nomad's CA certificates: %w", err)
		}
		tc.RootCAs = pool
	}
	if cfg.ClientCert != "" {
		cert, err := tls.LoadX509KeyPair(cfg.ClientCert, cfg.ClientKey)
		if err != nil {
			return nil, fmt.Errorf("loading the client certificate for nomad: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// New connects to Nomad.
func New(cfg Config) (*Client, error) {
	c, err := api.NewClient(cfg.apiConfig(cfg.Token))
	if err != nil {
		return nil, fmt.Errorf("nomad client: %w", err)
	}
	anon, err := api.NewClient(cfg.apiConfig(""))
	if err != nil {
		return nil, fmt.Errorf("nomad client: %w", err)
	}
	return &Client{api: c, anon: anon, cfg: cfg}, nil
}

// Address is Nomad's API address.
func (c *Client) Address() string { return c.api.Address() }

// resources asks list endpoints for each entry's resources.
var resources = map[string]string{"resources": "true"}

// snapshot returns the node and allocation lists: the watcher's, or read
// now.
func (c *Client) snapshot() ([]*api.NodeListStub, []*api.AllocationListStub, error) {
	c.mu.Lock()
	if c.watching && c.cluster != nil {
		n, a := c.cluster.lists()
		c.mu.Unlock()
		return n, a, nil
	}
	c.mu.Unlock()
	return c.readLists(context.Background())
}

// readLists reads the node and allocation lists whole, with each entry's
// resources.
func (c *Client) readLists(ctx context.Context) ([]*api.NodeListStub, []*api.AllocationListStub, error) {
	nodes, _, err := c.api.Nodes().List((&api.QueryOptions{Params: resources}).WithContext(ctx))
	if err != nil {
		return nil, nil, fmt.Errorf("listing nodes: %w", err)
	}
	allocs, _, err := c.api.Allocations().List((&api.QueryOptions{Params: resources, Namespace: "*"}).WithContext(ctx))
	if err != nil {
		return nil, nil, fmt.Errorf("listing allocations: %w", err)
	}
	return nodes, allocs, nil
}

// GangJob is a job registered with Nomad that carries cohort's gang meta.
type GangJob struct {
	Namespace, ID  string
	Stop           bool
	Status         string
	JobModifyIndex uint64
}

// Key is the job's key, as placement.Key.
func (g GangJob) Key() string { return placement.Key(g.Namespace, g.ID) }

// Watch keeps the node, allocation and gang job lists current until ctx
// ends (nodes and allocations through the event stream, gang jobs with
// blocking queries), so a scheduling pass reads its inventory from memory
// instead of asking Nomad for every node.
func (c *Client) Watch(ctx context.Context, log hclog.Logger) {
	c.mu.Lock()
	c.watching = true
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.watching, c.cluster, c.gangs = false, nil, nil
		c.mu.Unlock()
	}()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		c.followCluster(ctx, log.Named("events"))
	}()
	go func() {
		defer wg.Done()
		follow(ctx, log.Named("jobs"), func(q *api.QueryOptions) (uint64, error) {
			q.Namespace = "*"
			js, meta, err := c.api.Jobs().ListOptions(&api.JobListOptions{Fields: &api.JobListFields{Meta: true}}, q.WithContext(ctx))
			if err != nil {
				return 0, err
			}
			var gangs []GangJob
			for _, j := range js {
				if j.Meta[jobspec.MetaGang] == "" {
					continue
				}
				gangs = append(gangs, GangJob{Namespace: j.Namespace, ID: j.ID, Stop: j.Stop, Status: j.Status, JobModifyIndex: j.JobModifyIndex})
			}
			c.mu.Lock()
			c.gangs = gangs
			c.mu.Unlock()
			return meta.LastIndex, nil
		})
	}()
	wg.Wait()
}

// GangJobs lists the jobs registered with Nomad that carry the gang meta,
// as the watcher last saw them; nil while no watcher runs.
func (c *Client) GangJobs() []GangJob {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gangs
}

// query is one blocking query from index; it returns the index to wait
// from next.
type query func(*api.QueryOptions) (uint64, error)

// follow repeats a blocking query from the last index it saw.
func follow(ctx context.Context, log hclog.Logger, q query) {
	var index uint64
	var b backoff
	for ctx.Err() == nil {
		next, err := q(&api.QueryOptions{WaitIndex: index, WaitTime: 5 * time.Minute})
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("blocking query failed; retrying", "error", err, "in", b.next())
			b.wait(ctx)
			continue
		}
		b.reset()
		index = nextIndex(index, next)
	}
}

// backoff is the wait between retries: 100 ms, doubling to 5 s.
type backoff struct{ d time.Duration }

// next is the coming wait.
func (b *backoff) next() time.Duration {
	if b.d == 0 {
		b.d = 100 * time.Millisecond
	}
	return b.d
}

// wait sleeps the coming wait (or until ctx ends) and doubles the next.
func (b *backoff) wait(ctx context.Context) {
	select {
	case <-ctx.Done():
	case <-time.After(b.next()):
	}
	b.d = min(2*b.d, 5*time.Second)
}

func (b *backoff) reset() { b.d = 0 }

// nextIndex is the index the next blocking query waits from. Nomad
// blocks only for an index above zero, and a table that was never written
// (no allocation yet on a fresh cluster) reports index 0: waiting from 0
// again would return at once, for ever, so the floor is 1. An index that
// went back (a new cluster) starts over from the floor.
func nextIndex(prev, got uint64) uint64 {
	if got < prev || got == 0 {
		return 1
	}
	return got
}

// Inventory lists ready, eligible nodes with their free capacity: total
// minus the node's reserved share minus every non-terminal allocation,
// except those of the jobs in skip (keyed by placement.Key: cohort's own,
// which the scheduler accounts for from its reservations, placed or not
// yet). It reads the watcher's cache when Watch runs, and asks Nomad
// otherwise.
func (c *Client) Inventory(skip map[string]bool) ([]placement.Node, error) {
	nodes, allocs, err := c.snapshot()
	if err != nil {
		return nil, err
	}
	return FreeNodes(nodes, allocs, skip), nil
}

// Changed is the incremental form of Inventory: the free capacity of
// every node changed since the cursor, of the nodes named, and of every
// node where a job named has allocations, computed without the
// allocations of the jobs skip names; a node that is gone, or that
// placement may not use, maps to the zero Node. It returns the cursor to
// ask from next. all says the caller must read the whole Inventory again
// (the cursor is from another copy, or no watcher keeps one): the cursor
// returned is then the one to ask from after that read.
//
// It computes under the copy's lock, which the event stream's reader
// waits for: a gang of many workers costs one node's allocations per
// worker there, which is short next to decoding the events themselves.
func (c *Client) Changed(since Cursor, nodes, jobs []string, skip func(key string) bool) (free map[string]placement.Node, next Cursor, all bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.watching || c.cluster == nil {
		return nil, Cursor{}, true
	}
	return c.cluster.changedFree(since, nodes, jobs, skip)
}

// Capacity lists ready, eligible nodes as if no allocation ran on them:
// what a job can at most ever get.
func (c *Client) Capacity() ([]placement.Node, error) {
	nodes, _, err := c.snapshot()
	if err != nil {
		return nil, err
	}
	return FreeNodes(nodes, nil, nil), nil
}

// FreeNodes computes the inventory from Nomad's node and allocation lists
// (both read with resources=true). Devices are counted per kind,
// "vendor/type/model", whatever name requests use for them.
func FreeNodes(nodes []*api.NodeListStub, allocs []*api.AllocationListStub, skip map[string]bool) []placement.Node {
	idx := map[string]int{}
	var out []placement.Node
	for _, n := range nodes {
		pn, ok := nodeCapacity(n)
		if !ok {
			continue
		}
		idx[n.ID] = len(out)
		out = append(out, pn)
	}
	for _, a := range allocs {
		i, ok := idx[a.NodeID]
		if !ok || skip[placement.Key(a.Namespace, a.JobID)] {
			continue
		}
		takeAlloc(&out[i], a)
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out
}

// nodeCapacity is what a node offers with nothing running on it, less its
// reserved share; false if placement may not use it (not ready, draining,
// ineligible).
func nodeCapacity(n *api.NodeListStub) (placement.Node, bool) {
	if n.Status != "ready" || n.Drain || n.SchedulingEligibility != "eligible" {
		return placement.Node{}, false
	}
	pn := placement.Node{ID: n.ID, Datacenter: n.Datacenter, Pool: n.NodePool, Devices: map[string]int{}, Drivers: driverSet(n.Drivers)}
	if r := n.NodeResources; r != nil {
		pn.CPU = int(r.Cpu.CpuShares)
		pn.MemoryMB = int(r.Memory.MemoryMB)
		for _, d := range r.Devices {
			healthy := 0
			for _, inst := range d.Instances {
				if inst.Healthy {
					healthy++
				}
			}
			kind := deviceKind(d.Vendor, d.Type, d.Name)
			pn.Devices[kind] += healthy
			if len(d.Attributes) > 0 {
				if pn.DeviceAttrs == nil {
					pn.DeviceAttrs = map[string]map[string]*psstructs.Attribute{}
				}
				attrs := make(map[string]*psstructs.Attribute, len(d.Attributes))
				for k, a := range d.Attributes {
					if a != nil {
						attrs[k] = &psstructs.Attribute{Float: a.FloatVal, Int: a.IntVal, String: a.StringVal, Bool: a.BoolVal, Unit: a.Unit}
					}
				}
				pn.DeviceAttrs[kind] = attrs
			}
		}
	}
	if r := n.ReservedResources; r != nil {
		pn.CPU -= int(r.Cpu.CpuShares)
		pn.MemoryMB -= int(r.Memory.MemoryMB)
	}
	return pn, true
}

// driverSets interns the nodes' driver sets: a cluster has a handful of
// distinct ones, and the inventory is rebuilt from them often.
var driverSets = struct {
	sync.Mutex
	m map[string]string
}{m: map[string]string{}}

// driverSet is placement's set of the drivers Nomad would place a task
// of on the node: detected and healthy, as Nomad's driver checker has
// them. A node that lists none (a client that registered before its
// drivers' first fingerprint) has none: Nomad places nothing there either.
func driverSet(drivers map[string]*api.DriverInfo) string {
	var buf [8]string
	healthy := buf[:0]
	for name, d := range drivers {
		if d != nil && d.Detected && d.Healthy {
			healthy = append(healthy, name)
		}
	}
	set := placement.DriverSet(healthy)
	driverSets.Lock()
	defer driverSets.Unlock()
	if s, ok := driverSets.m[set]; ok {
		return s
	}
	if len(driverSets.m) > 1024 {
		clear(driverSets.m) // bounded: sets that come and go
	}
	driverSets.m[set] = set
	return set
}

// takeAlloc takes what a live allocation holds from its node's free
// capacity.
func takeAlloc(pn *placement.Node, a *api.AllocationListStub) {
	if a.AllocatedResources == nil || terminal(a) {
		return
	}
	// The list does not say which tasks are prestart ones, which Nomad
	// counts as the larger of them and the main tasks; summing every task
	// overstates what other jobs hold, never understates.
	for _, t := range a.AllocatedResources.Tasks {
		pn.CPU -= int(t.Cpu.CpuShares)
		pn.MemoryMB -= int(t.Memory.MemoryMB)
		for _, d := range t.Devices {
			pn.Devices[deviceKind(d.Vendor, d.Type, d.Name)] -= len(d.DeviceIDs)
		}
	}
}

// allocDevices counts the devices an allocation was given, by kind; nil
// when it has none or its resources are not known.
func allocDevices(a *api.AllocationListStub) map[string]int {
	if a.AllocatedResources == nil {
		return nil
	}
	var out map[string]int
	for _, t := range a.AllocatedResources.Tasks {
		for _, d := range t.Devices {
			if len(d.DeviceIDs) == 0 {
				continue
			}
			if out == nil {
				out = map[string]int{}
			}
			out[deviceKind(d.Vendor, d.Type, d.Name)] += len(d.DeviceIDs)
		}
	}
	return out
}

// terminal says whether an allocation no longer holds its resources.
func terminal(a *api.AllocationListStub) bool {
	switch a.DesiredStatus {
	case "stop", "evict":
		return a.ClientStatus != "running" && a.ClientStatus != "pending"
	}
	switch a.ClientStatus {
	case "complete", "failed", "lost":
		return true
	}
	return false
}

// deviceKind names a kind of device as placement counts it.
func deviceKind(vendor, typ, model string) string { return vendor + "/" + typ + "/" + model }

// RefusedError is Nomad answering a request with an error status: the
// request reached Nomad and Nomad said no, as opposed to Nomad being out
// of reach.
type RefusedError struct {
	Status int
	Err    error
}

func (e *RefusedError) Error() string { return e.Err.Error() }
func (e *RefusedError) Unwrap() error { return e.Err }

// refused wraps err as a RefusedError when Nomad answered it with a
// refusal: a 4xx other than a timeout or a rate limit. A 5xx (no cluster
// leader, a proxy in front of Nomad failing) is Nomad out of reach for
// now, not a verdict on the request.
func refused(err error) error {
	status := 0
	var ue api.UnexpectedResponseError
	var uep *api.UnexpectedResponseError
	switch {
	case errors.As(err, &ue):
		status = ue.StatusCode()
	case errors.As(err, &uep):
		status = uep.StatusCode()
	}
	if status >= 400 && status < 500 && status != 408 && status != 429 {
		return &RefusedError{Status: status, Err: err}
	}
	return err
}

// ns is the namespace Nomad is asked about: the job's, or the default one
// by name, never "" (which would mean the namespace the Nomad client
// itself defaults to, from NOMAD_NAMESPACE).
func ns(namespace string) string {
	if namespace == "" {
		return "default"
	}
	return namespace
}

// Validate asks Nomad whether it would accept job, without registering
// it.
func (c *Client) Validate(job *api.Job) error {
	resp, _, err := c.api.Jobs().Validate(job, nil)
	if err != nil {
		return fmt.Errorf("asking nomad to validate %s: %w", deref(job.ID), refused(err))
	}
	if resp.Error != "" {
		return &RefusedError{Status: 400, Err: fmt.Errorf("nomad refuses the job: %s", resp.Error)}
	}
	return nil
}

// Registration identifies one registration of a job: its JobModifyIndex
// and the job version it made, whose allocations are that attempt's.
type Registration struct {
	Index, Version uint64
}

// Register submits a job (pinned by Pin) to Nomad.
func (c *Client) Register(job *api.Job) (Registration, error) {
	namespace := ns(deref(job.Namespace))
	job.Namespace = &namespace
	resp, _, err := c.api.Jobs().Register(job, &api.WriteOptions{Namespace: namespace})
	if err != nil {
		return Registration{}, fmt.Errorf("registering %s with nomad: %w", deref(job.ID), refused(err))
	}
	// The answer has no version. The job as Nomad holds it now says which
	// version the registration made; registering a job identical to the
	// one held changes nothing and answers a newer index than the job's.
	cur, _, err := c.api.Jobs().Info(deref(job.ID), &api.QueryOptions{Namespace: namespace})
	if err != nil {
		return Registration{}, fmt.Errorf("reading %s back: %w", deref(job.ID), err)
	}
	if idx := deref(cur.JobModifyIndex); idx <= resp.JobModifyIndex {
		return Registration{Index: idx, Version: deref(cur.Version)}, nil
	}
	// Changed again since: find this registration among the versions.
	versions, _, _, err := c.api.Jobs().Versions(deref(job.ID), false, &api.QueryOptions{Namespace: namespace})
	if err != nil {
		return Registration{}, fmt.Errorf("reading the versions of %s: %w", deref(job.ID), err)
	}
	for _, v := range versions {
		if deref(v.JobModifyIndex) == resp.JobModifyIndex {
			return Registration{Index: resp.JobModifyIndex, Version: deref(v.Version)}, nil
		}
	}
	return Registration{}, fmt.Errorf("nomad registered %s at index %d but lists no version of it", deref(job.ID), resp.JobModifyIndex)
}

// Allocs summarises a job's state in Nomad and the allocations of its
// current version.
type Allocs struct {
	Running, Pending, Complete, Failed, Lost int
	// Live holds the IDs of the allocations still pending or running:
	// the only ones whose boot reports count toward the start barrier.
	Live map[string]bool
	// Workers is each allocation's state, for progress reports.
	Workers []Worker
	// Missing says Nomad does not know the job (it was never registered,
	// or was purged); Stopped that it is stopped; JobModifyIndex is the
	// index of its latest registration.
	Missing, Stopped bool
	JobModifyIndex   uint64
}

// Worker is one allocation of a gang as Nomad reports it.
type Worker struct {
	Alloc     string
	Name      string // job.group[index]
	TaskGroup string
	Node      string
	NodeName  string
	Status    string // Nomad's client status
	ExitCode  *int   `json:",omitempty"`
	// FinishedAt is when the allocation's last task finished, once it
	// has.
	FinishedAt time.Time `json:",omitempty"`
	// Devices counts the devices Nomad gave the allocation, by kind,
	// where its resources are known (Client.Allocs takes them from the
	// event-fed copy: a job's allocation list does not carry them).
	Devices map[string]int `json:",omitempty"`
}

// ErrNoJob means Nomad does not know the job.
var ErrNoJob = errors.New("no such nomad job")

// Job reads a job as registered with Nomad.
func (c *Client) Job(namespace, id string) (*api.Job, error) {
	j, _, err := c.api.Jobs().Info(id, &api.QueryOptions{Namespace: ns(namespace)})
	if err != nil {
		if e := refused(err); errors.As(e, new(*RefusedError)) && e.(*RefusedError).Status == 404 {
			return nil, fmt.Errorf("%w: %s", ErrNoJob, id)
		}
		return nil, fmt.Errorf("reading nomad job %s: %w", id, err)
	}
	return j, nil
}

// AllocIndex is a job's allocation change marker from the watcher: while
// it stays the same, none of the job's allocations changed. Without a
// running watcher it is 0, which means unknown.
func (c *Client) AllocIndex(namespace, id string) uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.watching || c.cluster == nil {
		return 0
	}
	// A job with no allocations yet still gets a marker, distinct from
	// "unknown".
	return c.cluster.jobIndex[placement.Key(namespace, id)] + 1
}

// Allocs reads the job and counts the allocations of one version of it:
// the one cohort registered (or adopted) for the gang's current attempt.
// A gang that was stopped and registered again keeps the same job ID; the
// allocations of its earlier attempts must not count toward (or against)
// this one, and stopping the job makes a new version without allocations.
func (c *Client) Allocs(namespace, id string, version uint64) (Allocs, error) {
	a := Allocs{Live: map[string]bool{}}
	job, err := c.Job(namespace, id)
	if errors.Is(err, ErrNoJob) {
		a.Missing = true
		return a, nil
	}
	if err != nil {
		return a, err
	}
	a.Stopped = job.Stop != nil && *job.Stop
	a.JobModifyIndex = deref(job.JobModifyIndex)
	stubs, _, err := c.api.Jobs().Allocations(id, false, &api.QueryOptions{Namespace: ns(namespace)})
	if err != nil {
		return a, fmt.Errorf("listing the allocations of %s: %w", id, err)
	}
	return CountAllocs(a, version, c.withResources(stubs)), nil
}

// AllocDevices is the devices Nomad gave one allocation, by kind, read
// from Nomad itself.
func (c *Client) AllocDevices(namespace, id string) (map[string]int, error) {
	a, _, err := c.api.Allocations().Info(id, &api.QueryOptions{Namespace: ns(namespace)})
	if err != nil {
		return nil, fmt.Errorf("reading allocation %s: %w", id, refused(err))
	}
	return allocDevices(&api.AllocationListStub{AllocatedResources: a.AllocatedResources}), nil
}

// withResources gives the stubs of a job's allocation list, which never
// carry their resources, those of the event-fed copy where it has them:
// the devices an adopted gang's workers hold are known only from there.
// The copy's resources are never edited in place (an event replaces a
// stub whole), so they can be shared.
func (c *Client) withResources(stubs []*api.AllocationListStub) []*api.AllocationListStub {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.watching || c.cluster == nil {
		return stubs
	}
	for i, s := range stubs {
		if s.AllocatedResources != nil {
			continue
		}
		if have := c.cluster.allocs[s.ID]; have != nil && have.AllocatedResources != nil {
			cp := *s
			cp.AllocatedResources = have.AllocatedResources
			stubs[i] = &cp
		}
	}
	return stubs
}

// CountAllocs adds the allocations of one job version to a.
func CountAllocs(a Allocs, version uint64, stubs []*api.AllocationListStub) Allocs {
	if a.Live == nil {
		a.Live = map[string]bool{}
	}
	for _, s := range stubs {
		if s.JobVersion != version {
			continue
		}
		w := Worker{Alloc: s.ID, Name: s.Name, TaskGroup: s.TaskGroup, Node: s.NodeID, NodeName: s.NodeName, Status: s.ClientStatus, Devices: allocDevices(s)}
		finished := true
		for task, ts := range s.TaskStates {
			if ts.FinishedAt.IsZero() {
				finished = false
				continue
			}
			if ts.FinishedAt.After(w.FinishedAt) {
				w.FinishedAt = ts.FinishedAt
			}
			if task == jobspec.BarrierTaskName {
				continue // its exit is the release, not the worker's
			}
			for _, ev := range ts.Events {
				if ev.Type == api.TaskTerminated {
					code := ev.ExitCode
					w.ExitCode = &code
				}
			}
		}
		if !finished || len(s.TaskStates) == 0 {
			w.FinishedAt = time.Time{}
		}
		a.Workers = append(a.Workers, w)
		switch s.ClientStatus {
		case "running":
			a.Running++
			a.Live[s.ID] = true
		case "pending":
			a.Pending++
			a.Live[s.ID] = true
		case "complete":
			a.Complete++
		case "failed":
			a.Failed++
		case "lost":
			a.Lost++
		}
	}
	return a
}

// Stop deregisters a job, stopping all its workers. A job Nomad does not
// know is already stopped.
func (c *Client) Stop(namespace, id string) error {
	if _, _, err := c.api.Jobs().Deregister(id, false, &api.WriteOptions{Namespace: ns(namespace)}); err != nil {
		if e := refused(err); errors.As(e, new(*RefusedError)) && e.(*RefusedError).Status == 404 {
			return nil
		}
		return fmt.Errorf("stopping %s: %w", id, refused(err))
	}
	return nil
}

// PutBarrierToken sets a job's barrier token in the job's variable
// (jobspec.BarrierTokenPath), as its one item jobspec.BarrierTokenItem,
// leaving any items of the job's own alone: the variable is the job's,
// and its owner may keep things there too.
func (c *Client) PutBarrierToken(namespace, id, token string) error {
	return c.editBarrierToken(namespace, id, func(items map[string]string) bool {
		if items[jobspec.BarrierTokenItem] == token {
			return false
		}
		items[jobspec.BarrierTokenItem] = token
		return true
	})
}

// DropBarrierToken takes a run's barrier token out of its job's variable
// once the run has ended, and the variable with it if nothing else is
// left. A token of another run (a resubmission's, set meanwhile by a
// newer leader) stays.
func (c *Client) DropBarrierToken(namespace, id, token string) error {
	return c.editBarrierToken(namespace, id, func(items map[string]string) bool {
		if items[jobspec.BarrierTokenItem] != token {
			return false
		}
		delete(items, jobspec.BarrierTokenItem)
		return true
	})
}

// editBarrierToken reads the job's variable, lets edit change its items,
// and writes them back only if the variable did not change meanwhile
// (check-and-set), trying again when it did.
func (c *Client) editBarrierToken(namespace, id string, edit func(items map[string]string) (changed bool)) error {
	path, ok := jobspec.BarrierTokenPath(id)
	if !ok {
		return &RefusedError{Status: 400, Err: fmt.Errorf("job %q cannot name a nomad variable", id)}
	}
	q, w := &api.QueryOptions{Namespace: ns(namespace)}, &api.WriteOptions{Namespace: ns(namespace)}
	for range 5 {
		// Read through Raw: the api's Variables().Read answers a token
		// that may not read the variable as if it did not exist, and a
		// create-only write would then conflict for ever.
		var v api.Variable
		_, err := c.api.Raw().Query("/v1/var/"+path, &v, q)
		var ue api.UnexpectedResponseError
		switch {
		case errors.As(err, &ue) && ue.StatusCode() == 404:
			v = api.Variable{Namespace: ns(namespace), Path: path} // ModifyIndex 0: create only
		case err != nil:
			return fmt.Errorf("reading nomad variable %s: %w", path, refused(err))
		}
		if v.Items == nil {
			v.Items = map[string]string{}
		}
		if !edit(v.Items) {
			return nil
		}
		if len(v.Items) == 0 {
			if v.ModifyIndex == 0 {
				return nil
			}
			_, err = c.api.Variables().CheckedDelete(path, v.ModifyIndex, w)
		} else {
			_, _, err = c.api.Variables().CheckedUpdate(&v, w)
		}
		var conflict api.ErrCASConflict
		if errors.As(err, &conflict) {
			continue
		}
		if err != nil {
			return fmt.Errorf("writing nomad variable %s: %w", path, refused(err))
		}
		return nil
	}
	// Not a refusal: the gang keeps its attempts, and registering is
	// tried again after a back-off.
	return fmt.Errorf("writing nomad variable %s: it changed under every one of 5 tries", path)
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}
