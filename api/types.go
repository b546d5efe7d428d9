// Package api is cohort's HTTP API as its callers see it: the request and
// response types (the start barrier's protocol included) and a typed
// client. The CLI, the microvm driver, the barrier task, the e2e tests and
// the servers' forwarding all use it, so escaping, error decoding and the
// wire format live in one place.
//
// It is a leaf: it imports no other cohort package.
package api

import (
	"time"

	nomad "github.com/hashicorp/nomad/api"
)

// DefaultNamespace is the Nomad namespace of a job that names none.
const DefaultNamespace = "default"

// Job statuses, in lifecycle order.
const (
	StatusQueued   = "queued"   // accepted, waiting for room
	StatusReserved = "reserved" // nodes reserved, workers booting
	StatusRunning  = "running"  // every worker booted and released; billing runs
	StatusFinished = "finished" // ended: exited, stopped or deadline
	StatusFailed   = "failed"   // did not start, or a worker failed while it ran
)

// ReasonExited is the reason of a gang whose workers all exited on their
// own, successfully or not.
const ReasonExited = "every worker exited"

// SubmitRequest is the body of POST /v1/jobs.
type SubmitRequest struct {
	Job *nomad.Job
}

// SubmitResponse answers POST /v1/jobs: the job as admitted, and what
// cohort changed to make it a gang (restarts off, names added, ...).
type SubmitResponse struct {
	JobView
	Warnings []string `json:",omitempty"`
}

// JobView is a job as the API shows it.
type JobView struct {
	ID        string
	Namespace string
	Status    string
	Priority  int
	Workers   int
	Nodes     int    `json:",omitempty"`
	Reason    string `json:",omitempty"`
	// Waiting says why a queued gang has not started: what it needs
	// against the most any node has free, or the gang ahead of it.
	Waiting     string    `json:",omitempty"`
	Attempts    int       `json:",omitempty"`
	SubmittedAt time.Time `json:",omitempty"`
	ReservedAt  time.Time `json:",omitempty"`
	StartedAt   time.Time `json:",omitempty"`
	Deadline    time.Time `json:",omitempty"`
	EndedAt     time.Time `json:",omitempty"`
	Adopted     bool      `json:",omitempty"`
	Run         int       `json:",omitempty"`
	// WorkerStates is filled by GET /v1/job/{id}?workers=1.
	WorkerStates []WorkerView `json:",omitempty"`
}

// Ended says whether the job's run is over.
func (v *JobView) Ended() bool { return v.Status == StatusFinished || v.Status == StatusFailed }

// WorkerView is one worker of a gang: where it is in
// queued -> reserved -> booted -> running -> exited (code).
type WorkerView struct {
	Name     string // group[rank]
	Node     string `json:",omitempty"`
	Alloc    string `json:",omitempty"`
	State    string
	ExitCode *int `json:",omitempty"`
}

// Barrier verdicts.
const (
	BarrierWait    = "wait"
	BarrierRelease = "release"
	BarrierAbort   = "abort"
)

// BarrierRequest is a worker's boot report at the start barrier:
// POST /v1/barrier/{job}?namespace=NS.
type BarrierRequest struct {
	// Alloc is the worker's Nomad allocation ID.
	Alloc string
	// Instance names this start of the worker: a restarted task reports
	// a new instance and is refused, so a worker never rejoins a gang
	// mid-run.
	Instance string `json:",omitempty"`
	// Wait is how long the server may hold the call for a verdict.
	Wait string `json:",omitempty"`
	// Token authenticates a barrier task (cohort-barrier) with the
	// servers: the job's barrier token from its environment. The
	// microvm driver authenticates with its node's certificate instead.
	Token string `json:",omitempty"`
	// Started says how the microvm driver started the worker's VM
	// ("restore" or "cold") and StartMillis how long that took, for the
	// servers' metrics.
	Started     string `json:",omitempty"`
	StartMillis int64  `json:",omitempty"`
	// Address is the worker's own IP address, where its driver knows it
	// (the microvm driver does): see BarrierResponse.Peers.
	Address string `json:",omitempty"`
}

// BarrierResponse is the verdict for one worker.
type BarrierResponse struct {
	Status string
	Reason string `json:",omitempty"`
	// Peers, with a release, are the addresses of the gang's workers
	// whose reports gave one, by group and rank: a driver writes them
	// into its worker's hosts file under the workers' names, so that a
	// gang's names resolve the moment it starts, without asking DNS.
	Peers []BarrierPeer `json:",omitempty"`
}

// BarrierPeer is one worker of a released gang and its address.
type BarrierPeer struct {
	Group   string
	Rank    int
	Address string
}

// Bill is a job's ledger and its total.
type Bill struct {
	Job       string
	Namespace string `json:",omitempty"`
	Run       int    `json:",omitempty"`
	Status    string
	Open      bool // still running: the open lines end now
	Lines     []BillLine
	Total     float64
	Currency  string
}

// BillLine is one worker's entry in the ledger.
type BillLine struct {
	Group    string
	Index    int
	Node     string
	StartMs  int64 // unix milliseconds
	EndMs    int64
	CPU      int
	MemoryMB int
	Devices  map[string]int `json:",omitempty"`
	Amount   float64
}

// NodeView is one Nomad node as the scheduler sees it.
type NodeView struct {
	ID, Datacenter, Pool string
	// Capacity is what jobs can use at all; Free what is left after every
	// allocation and every cohort reservation.
	Capacity, Free Resources
}

// Resources is CPU (MHz), memory (MiB) and devices by kind.
type Resources struct {
	CPU      int
	MemoryMB int
	Devices  map[string]int `json:",omitempty"`
}

// Member is one cohort server's addresses, and the newest encoding of
// the replicated log it reads (0: JSON only).
type Member struct {
	ID, RaftAddr, HTTPAddr string
	Codec                  int `json:",omitempty"`
}

// MemberView is one row of GET /v1/members.
type MemberView struct {
	ID, RaftAddr, HTTPAddr string
	Voter, Leader          bool
}

// AgentSelf is what GET /v1/agent/self answers: who this server is and
// whether it belongs to a group yet.
type AgentSelf struct {
	Member     Member
	Configured bool
	LeaderID   string `json:",omitempty"`
}

// Leader is what GET /v1/leader answers.
type Leader struct {
	ID      string
	Address string
}

// LeaseRequest asks for a node's worker subnet: POST /v1/network/lease.
type LeaseRequest struct {
	// Node is the node's stable identity, Address the host address its
	// peers route its subnet through.
	Node, Address string
	// Subnet is the subnet the node routes already, if any: it gets it
	// back if no other node holds it, and is refused otherwise.
	Subnet string `json:",omitempty"`
}

// Lease is a node's worker subnet.
type Lease struct {
	Node, Address string
	Subnet        string // CIDR
	// Range is the whole worker range (every node's subnet lies in it).
	Range string `json:",omitempty"`
	// Active says whether the node renewed its lease lately: peers route
	// only to active subnets.
	Active bool `json:",omitempty"`
}

// LeaseTable is GET /v1/network/leases: every node's subnet.
type LeaseTable struct {
	// Index moves when a subnet is granted, moved or given up; a
	// blocking read waits for it to pass the index it was given.
	Index  uint64
	Range  string
	Leases []Lease
}
