// Package replica runs one member of the scheduler's Raft group: the
// state machine from package state, replicated with hashicorp/raft over
// TCP and stored in a write-ahead log, so nothing accepted is lost across
// leader changes or restarts.
package replica

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// Config describes one replica.
type Config struct {
	ID      string
	Bind    string // host:port for Raft traffic; port 0 picks one
	DataDir string
	// Peers, when set on a replica with no state yet, bootstraps the group
	// with these members (ID -> address), this one included.
	Peers  map[string]string
	Logger hclog.Logger
	// Timeouts are Raft's; zero means DefaultTimeouts.
	Timeouts Timeouts
	// Fast is LANTimeouts, for tests and benchmarks on one host.
	Fast bool
	// InMemory keeps the log, the snapshots and the transport in memory:
	// a group of one for tests that exercise the real Raft library
	// without disks or sockets. DataDir and Bind are then unused.
	InMemory bool
	// TLSServer and TLSClient carry Raft over mutual TLS: both must
	// require and verify a server certificate of the cluster's CA.
	TLSServer, TLSClient *tls.Config
	// Local runs a group of one with nothing listening: its Raft address
	// is Bind, but no other server can reach it (a single server without
	// TLS has no way to tell its peers from anyone else).
	Local bool
	// boltLog keeps the log in BoltDB, as servers before the WAL did:
	// tests use it to make a data directory of that layout.
	boltLog bool
}

// Timeouts are Raft's failure-detection and commit timeouts.
type Timeouts struct {
	Heartbeat, Election, LeaderLease, Commit time.Duration
}

// DefaultTimeouts are hashicorp/raft's own defaults, which Nomad and
// Consul also use: right for servers on separate machines, where a
// missed heartbeat or two must not cost a leader election.
var DefaultTimeouts = Timeouts{Heartbeat: time.Second, Election: time.Second, LeaderLease: 500 * time.Millisecond, Commit: 50 * time.Millisecond}

// LANTimeouts suit servers on one host or a fast, quiet LAN (cohort dev,
// tests, benchmarks): failover in well under a second.
var LANTimeouts = Timeouts{Heartbeat: 300 * time.Millisecond, Election: 300 * time.Millisecond, LeaderLease: 150 * time.Millisecond, Commit: 5 * time.Millisecond}

// Validate checks timeouts as Raft will.
func (t Timeouts) Validate() error {
	switch {
	case t.Heartbeat < 5*time.Millisecond || t.Election < 5*time.Millisecond:
		return fmt.Errorf("raft heartbeat and election timeouts must be at least 5ms; got %s and %s", t.Heartbeat, t.Election)
	case t.LeaderLease < 5*time.Millisecond || t.LeaderLease > t.Heartbeat:
		return fmt.Errorf("raft leader lease timeout must be between 5ms and the heartbeat timeout (%s); got %s", t.Heartbeat, t.LeaderLease)
	case t.Election < t.Heartbeat:
		return fmt.Errorf("raft election timeout (%s) must be at least the heartbeat timeout (%s)", t.Election, t.Heartbeat)
	case t.Commit <= 0:
		return fmt.Errorf("raft commit timeout must be positive; got %s", t.Commit)
	}
	return nil
}

// Replica is one running member.
type Replica struct {
	ID    string
	raft  *raft.Raft
	fsm   *fsm
	trans raft.Transport
	logs  raft.LogStore // for tests that read what was written
	// closers release the transport and the stores after Shutdown.
	closers []func() error
	log     hclog.Logger
	// stopCtx ends watchLeader, which watching waits for, and its
	// probes; cancel ends it.
	stopCtx  context.Context
	cancel   context.CancelFunc
	watching sync.WaitGroup
	// probes counts leaderMaybeGone's probes of a leader, for tests.
	probes atomic.Int64
}

// ErrNotLeader is returned for writes on a follower; Leader says where to
// send them.
var ErrNotLeader = errors.New("not the leader")

// Start opens (or creates) the replica's stores and joins its group.
func Start(cfg Config) (*Replica, error) {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	t := cfg.Timeouts
	if cfg.Fast {
		t = LANTimeouts
	}
	if t == (Timeouts{}) {
		t = DefaultTimeouts
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.Logger = cfg.Logger.Named("raft")
	rc.HeartbeatTimeout, rc.ElectionTimeout, rc.LeaderLeaseTimeout, rc.CommitTimeout = t.Heartbeat, t.Election, t.LeaderLease, t.Commit
	rc.SnapshotThreshold = 4096
	// Larger appends when admissions arrive in bursts. (BatchApplyCh is
	// left off: with it a future queued when the replica shuts down is
	// never answered.)
	rc.MaxAppendEntries = 256

	var (
		logs    raft.LogStore
		stable  raft.StableStore
		snaps   raft.SnapshotStore
		trans   raft.Transport
		closers []func() error
		streamL *stream
	)
	closeAll := func() { closeInReverse(closers) }
	if cfg.InMemory {
		store := raft.NewInmemStore()
		logs, stable, snaps = store, store, raft.NewInmemSnapshotStore()
		_, it := raft.NewInmemTransport(raft.ServerAddress(cfg.ID))
		trans = it
		closers = append(closers, it.Close)
	} else {
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, err
		}
		var err error
		if logs, stable, closers, err = openLog(cfg.DataDir, cfg.boltLog, rc.Logger); err != nil {
			return nil, err
		}
		if snaps, err = raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, rc.Logger); err != nil {
			closeAll()
			return nil, err
		}
		switch {
		case cfg.Local:
			_, it := raft.NewInmemTransport(raft.ServerAddress(cfg.Bind))
			trans = it
			closers = append(closers, it.Close)
		default:
			var st *stream
			var err error
			if cfg.TLSServer != nil || cfg.TLSClient != nil {
				st, err = newTLSStream(cfg.Bind, cfg.TLSServer, cfg.TLSClient, cfg.Logger.Named("raft"))
			} else {
				st, err = newStream(cfg.Bind, nil, nil)
			}
			if err != nil {
				closeAll()
				return nil, err
			}
			nt := raft.NewNetworkTransportWithLogger(st, 8, 2*time.Second, rc.Logger)
			trans = nt
			streamL = st
			closers = append(closers, nt.Close)
		}
	}
	f := &fsm{st: state.New(), changed: make(chan struct{})}
	peers := cfg.Peers
	if cfg.InMemory && len(peers) == 0 {
		peers = map[string]string{cfg.ID: ""}
	}
	if len(peers) > 0 {
		has, err := raft.HasExistingState(logs, stable, snaps)
		if err != nil {
			closeAll()
			return nil, err
		}
		if !has {
			var servers []raft.Server
			for id, a := range peers {
				if id == cfg.ID {
					a = string(trans.LocalAddr())
				}
				servers = append(servers, raft.Server{ID: raft.ServerID(id), Address: raft.ServerAddress(a)})
			}
			if err := raft.BootstrapCluster(rc, logs, stable, snaps, trans, raft.Configuration{Servers: servers}); err != nil {
				closeAll()
				return nil, fmt.Errorf("bootstrapping: %w", err)
			}
		}
	}
	// Replication reads back the entries it sends; the newest ones come
	// from memory instead of the log's files.
	cached, err := raft.NewLogCache(512, logs)
	if err != nil {
		closeAll()
		return nil, err
	}
	r, err := raft.NewRaft(rc, f, cached, stable, snaps, trans)
	if err != nil {
		closeAll()
		return nil, err
	}
	rep := &Replica{ID: cfg.ID, raft: r, fsm: f, trans: trans, logs: cached, closers: closers, log: cfg.Logger}
	rep.stopCtx, rep.cancel = context.WithCancel(context.Background())
	if streamL != nil {
		rep.watching.Add(1)
		go rep.watchLeader(streamL.peerGone)
	}
	return rep, nil
}

// Bootstrap forms a new group of peers (ID -> Raft address). Every member
// may call it with the same peers; on a replica that already has state it
// is a no-op.
func (r *Replica) Bootstrap(peers map[string]string) error {
	var servers []raft.Server
	for id, a := range peers {
		servers = append(servers, raft.Server{ID: raft.ServerID(id), Address: raft.ServerAddress(a)})
	}
	err := r.raft.BootstrapCluster(raft.Configuration{Servers: servers}).Error()
	if errors.Is(err, raft.ErrCantBootstrap) {
		return nil
	}
	return err
}

// AddVoter adds a member to the group; only the leader can.
func (r *Replica) AddVoter(id, addr string, timeout time.Duration) error {
	err := wait(r.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(addr), 0, timeout), timeout)
	if errors.Is(err, raft.ErrNotLeader) {
		return fmt.Errorf("%w: %v", ErrNotLeader, err)
	}
	return err
}

// RemoveServer takes a member out of the group; only the leader can. A
// server that is gone for good must be removed, or the group counts it
// toward its quorum for ever.
func (r *Replica) RemoveServer(id string, timeout time.Duration) error {
	err := wait(r.raft.RemoveServer(raft.ServerID(id), 0, timeout), timeout)
	if errors.Is(err, raft.ErrNotLeader) {
		return fmt.Errorf("%w: %v", ErrNotLeader, err)
	}
	return err
}

// Restore replaces the group's state with a saved one (State.Marshal's
// encoding): the leader restores it into its state machine and installs
// it as a snapshot on every follower. Only the leader can.
func (r *Replica) Restore(b []byte, timeout time.Duration) error {
	if err := state.New().Unmarshal(b); err != nil {
		return err
	}
	// Raft takes the index and term of the restored snapshot from its
	// own log; the meta says only how the data is encoded.
	meta := &raft.SnapshotMeta{Version: raft.SnapshotVersionMax, Size: int64(len(b))}
	err := r.raft.Restore(meta, bytes.NewReader(b), timeout)
	if errors.Is(err, raft.ErrNotLeader) {
		return fmt.Errorf("%w: %v", ErrNotLeader, err)
	}
	return err
}

// Member is one server of the group as Raft knows it.
type Member struct {
	ID, Address string
	Voter       bool
}

// Members lists the group's configuration as this replica knows it.
func (r *Replica) Members() ([]Member, error) {
	f := r.raft.GetConfiguration()
	if err := f.Error(); err != nil {
		return nil, err
	}
	var out []Member
	for _, s := range f.Configuration().Servers {
		out = append(out, Member{ID: string(s.ID), Address: string(s.Address), Voter: s.Suffrage == raft.Voter})
	}
	return out, nil
}

// Configured reports whether this replica belongs to a group yet.
func (r *Replica) Configured() bool {
	m, err := r.Members()
	return err == nil && len(m) > 0
}

// LocalID is the replica's ID.
func (r *Replica) LocalID() string { return r.ID }

// Addr is the replica's Raft address.
func (r *Replica) Addr() string { return string(r.trans.LocalAddr()) }

// IsLeader reports whether this replica leads.
func (r *Replica) IsLeader() bool { return r.raft.State() == raft.Leader }

// Leader returns the leader's Raft address and ID, if known.
func (r *Replica) Leader() (string, string) {
	a, id := r.raft.LeaderWithID()
	return string(a), string(id)
}

// Apply replicates a command and returns its result once committed and
// applied here. On a follower it fails with ErrNotLeader.
func (r *Replica) Apply(c *state.Command, timeout time.Duration) (state.Result, error) {
	b, err := c.EncodeAs(r.LogCodec())
	if err != nil {
		return state.Result{}, err
	}
	f := r.raft.Apply(b, timeout)
	if err := wait(f, timeout); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) || errors.Is(err, raft.ErrLeadershipTransferInProgress) {
			return state.Result{}, fmt.Errorf("%w: %v", ErrNotLeader, err)
		}
		return state.Result{}, err
	}
	return f.Response().(state.Result), nil
}

// LogCodec is the encoding the leader writes: binary once every server
// in the configuration (non-voters receive the log too) has recorded
// (OpMember) that it reads it, JSON while any has not, so that a group
// upgraded one server at a time never hands a server an entry it cannot
// read. A server of an older version cannot join a group after that; as
// with Nomad, servers are upgraded, not downgraded.
func (r *Replica) LogCodec() int {
	members, err := r.Members()
	if err != nil {
		return state.CodecJSON
	}
	ids := make([]string, len(members))
	for i, m := range members {
		ids[i] = m.ID
	}
	r.fsm.mu.RLock()
	defer r.fsm.mu.RUnlock()
	return r.fsm.st.LogCodec(ids)
}

// Barrier waits until everything committed before it is applied here, as a
// new leader must before it acts on the state.
func (r *Replica) Barrier(timeout time.Duration) error { return wait(r.raft.Barrier(timeout), timeout) }

// ErrTimeout means a command was handed to Raft but not answered in time;
// it may still commit.
var ErrTimeout = errors.New("raft did not answer in time")

// wait bounds the wait for a future: Raft's own timeout covers only the
// hand-off of the command, not its commit.
func wait(f raft.Future, timeout time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout + time.Second):
		return ErrTimeout
	}
}

// Read runs fn on the state under a read lock; fn must not keep pointers.
func (r *Replica) Read(fn func(*state.State)) {
	r.fsm.mu.RLock()
	defer r.fsm.mu.RUnlock()
	fn(r.fsm.st)
}

// Changed returns a channel closed when the next command is applied here:
// long-polling readers wait on it instead of polling the state.
func (r *Replica) Changed() <-chan struct{} {
	r.fsm.mu.RLock()
	defer r.fsm.mu.RUnlock()
	return r.fsm.changed
}

// AppliedIndex is the last log index applied here.
func (r *Replica) AppliedIndex() uint64 { return r.raft.AppliedIndex() }

// TransferLeadership hands leadership to the most up-to-date other
// server when this one leads, and waits until it has: a planned stop (an
// upgrade, a restart) then costs the group one round of voting instead
// of the followers' heartbeat and election timeouts, during which no
// admission commits. It does nothing on a follower or in a group of one.
func (r *Replica) TransferLeadership(timeout time.Duration) error {
	if !r.IsLeader() {
		return nil
	}
	members, err := r.Members()
	if err != nil || len(members) < 2 {
		return err
	}
	// Raft picks the follower furthest along, which may be one that has
	// stopped since (servers stopped one after another): then each
	// other voter in turn, round after round, within the time given. A
	// live one can fail once too: the first call on a pooled connection
	// to a server that restarted meets its end (EOF).
	deadline := time.Now().Add(timeout)
	err = wait(r.raft.LeadershipTransfer(), timeout)
	for err != nil && r.IsLeader() && time.Until(deadline) > 0 {
		for _, m := range members {
			left := time.Until(deadline)
			if err == nil || !r.IsLeader() || left <= 0 {
				break
			}
			if m.ID != r.ID && m.Voter {
				err = wait(r.raft.LeadershipTransferToServer(raft.ServerID(m.ID), raft.ServerAddress(m.Address)), left)
			}
		}
		if err != nil {
			time.Sleep(20 * time.Millisecond)
		}
	}
	if err != nil && r.IsLeader() {
		return fmt.Errorf("handing over leadership: %w", err)
	}
	return nil
}

// Shutdown stops the replica and closes its stores; its data stays. To
// the rest of the group it looks like a crash: call TransferLeadership
// first for a planned stop.
func (r *Replica) Shutdown() error {
	r.cancel()
	err := r.raft.Shutdown().Error()
	closeInReverse(r.closers)
	// Raft has closed the transport (a watcher in the middle of an RPC
	// sees its connection close instead of waiting out its timeout).
	r.watching.Wait()
	return err
}

// closeInReverse closes what was opened, the last opened first (the
// transport before the stores, the stores before the data directory's
// lock).
func closeInReverse(closers []func() error) {
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
}

// fsm adapts state.State to raft.FSM. Apply, Snapshot and Restore are
// called by Raft one at a time; the lock is for readers on other
// goroutines (Read).
type fsm struct {
	mu      sync.RWMutex
	st      *state.State
	changed chan struct{} // closed and replaced after every apply
}

// notify wakes everyone waiting on Changed; call with mu held.
func (f *fsm) notify() {
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fsm) Apply(l *raft.Log) interface{} {
	c, err := state.DecodeCommand(l.Data)
	if errors.Is(err, state.ErrUnknownEncoding) {
		// Every other replica may read it: skipping it here would leave
		// this one's state behind theirs without a word. Stop instead.
		panic(fmt.Sprintf("raft log entry %d: %v: this server is older than the one that wrote it; upgrade it", l.Index, err))
	}
	if err != nil {
		// Undecodable alike on every replica: they all skip it.
		return state.Result{Err: "undecodable command: " + err.Error()}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	res := f.st.Apply(c)
	f.notify()
	copyJobs(&res)
	return res
}

// copyJobs copies the jobs a result points to: callers read them after the
// lock is gone.
func copyJobs(res *state.Result) {
	if res.Job != nil {
		cp := res.Job.Clone()
		res.Job = &cp
	}
	if res.Lease != nil {
		cp := *res.Lease
		res.Lease = &cp
	}
	for i := range res.Results {
		copyJobs(&res.Results[i])
	}
}

// Snapshot copies the state under the lock and leaves the encoding to
// Persist, which Raft runs while new commands apply: encoding a large
// state under the lock would stall every admission for its duration.
func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return &snapshot{st: f.st.Clone()}, nil
}

func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	st := state.New()
	if err := st.Unmarshal(b); err != nil {
		return err
	}
	f.mu.Lock()
	f.st = st
	f.notify()
	f.mu.Unlock()
	return nil
}

type snapshot struct{ st *state.State }

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	b, err := s.st.Marshal()
	if err == nil {
		_, err = sink.Write(b)
	}
	if err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *snapshot) Release() {}
