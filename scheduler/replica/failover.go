package replica

// A leader whose process dies is replaced without waiting out Raft's
// heartbeat timeout. When a process ends, its host's kernel closes its
// sockets, so the followers' connections from it end at once; a follower
// that sees one end checks that the leader's Raft port now refuses
// connections, and then one follower, chosen the same way by each, stands
// for election at once, as a leader's hand-over target would. Leaders lost
// in other ways (the host gone, the network cut) are still found by the
// heartbeat timeout.
//
// This changes when an election starts, never what it decides: votes still
// go only to a candidate whose log is up to date, so a wrong guess costs
// one election, not an entry.

import (
	"context"
	"errors"
	"net"
	"slices"
	"syscall"
	"time"

	"github.com/hashicorp/raft"
)

const (
	// probeTimeout bounds the dial that asks whether the leader's port
	// still listens. Only a refusal counts; a dial that times out says
	// nothing.
	probeTimeout = 250 * time.Millisecond
	// standGrace lets a leader the group already has make itself known:
	// after a planned hand-over the old leader's connections close just
	// as its successor takes over.
	standGrace = 25 * time.Millisecond
	// standStep spaces the followers, in the order of their IDs, so that
	// one stands at a time; the next stands only if the one before it
	// has not won (its log was behind, or it is down too).
	standStep = 100 * time.Millisecond
	// standPatience bounds how long a later follower waits for an
	// election under way to produce a leader or go quiet; after it, the
	// heartbeat timeout decides.
	standPatience = time.Second
)

func (r *Replica) watchLeader(gone <-chan struct{}) {
	defer r.watching.Done()
	for {
		select {
		case <-r.stopCtx.Done():
			return
		case <-gone:
		}
		r.leaderMaybeGone()
	}
}

// leaderMaybeGone runs when a connection to this server ended from the
// other side.
func (r *Replica) leaderMaybeGone() {
	if r.raft.State() != raft.Follower {
		return
	}
	_, id := r.raft.LeaderWithID()
	if id == "" || string(id) == r.ID {
		return
	}
	f := r.raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	servers := f.Configuration().Servers
	// The address the group dials, not the one the leader says it has:
	// behind NAT, or on a host of several addresses, the second may be
	// one this server cannot reach, where a refusal means nothing.
	addr := ""
	for _, s := range servers {
		if s.ID == id {
			addr = string(s.Address)
		}
	}
	rank, ok := standOrder(servers, string(id), r.ID)
	if addr == "" || !ok {
		return
	}
	if !r.refusedWhileLeading(id, addr) {
		return
	}
	select {
	case <-r.stopCtx.Done():
		return
	case <-time.After(standGrace + time.Duration(rank)*standStep):
	}
	if !r.mayStand(id, rank) {
		return
	}
	r.log.Info("the leader's Raft port refuses connections; standing for election", "leader", string(id))
	// Raft starts an election at once when told to by a TimeoutNow; the
	// follower sends it to itself, through its own transport. Raft acts
	// on it in whatever state it reads it in: the checks above run just
	// before, so what could change in between is what a self-dial's few
	// milliseconds allow.
	self := r.trans.LocalAddr()
	req := &raft.TimeoutNowRequest{RPCHeader: raft.RPCHeader{
		ProtocolVersion: raft.ProtocolVersionMax,
		ID:              []byte(r.ID),
		Addr:            r.trans.EncodePeer(raft.ServerID(r.ID), self),
	}}
	if err := r.trans.TimeoutNow(raft.ServerID(r.ID), self, req, &raft.TimeoutNowResponse{}); err != nil {
		select {
		case <-r.stopCtx.Done():
		default:
			r.log.Warn("could not start an election; the heartbeat timeout will", "error", err)
		}
	}
}

// refusedWhileLeading probes the leader's port until it refuses, for as
// long as this server still follows that leader, a few times over a
// third of a second: a stopping leader may close some connections before
// its listener (Raft ends its replication first), and a dying process's
// sockets close one after another.
func (r *Replica) refusedWhileLeading(id raft.ServerID, addr string) bool {
	for _, wait := range probeBackoff {
		select {
		case <-r.stopCtx.Done():
			return false
		case <-time.After(wait):
		}
		if r.raft.State() != raft.Follower {
			return false
		}
		if _, cur := r.raft.LeaderWithID(); cur != id {
			return false
		}
		gone := r.refuses(addr)
		r.probes.Add(1)
		if gone {
			return true
		}
	}
	return false
}

// probeBackoff are the waits before each probe.
var probeBackoff = []time.Duration{0, 20 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 200 * time.Millisecond}

// mayStand says whether this follower, rank-th in the order of those
// left, may still stand for election in place of the dead leader. A
// TimeoutNow makes its candidate skip the pre-vote and ask for votes that
// a voter gives even while it follows a leader, so standing beside a
// leader the group already has would depose it. What this server knows
// of the leader tells it enough: a new leader's first message names it,
// and a vote request of a newer term clears the leader it knew.
//   - The dead leader still known: no election has begun; stand.
//   - Another leader known: it won; leave it.
//   - None known: an election has begun. The first in the order leaves it
//     alone (after a planned hand-over it is the successor's, and the
//     successor may simply not have been heard from yet). A later one
//     waits until nobody has contacted it for a full step: Raft counts a
//     vote this server granted as contact, and a leader's messages, but
//     not a vote it refused. So it stands when the one before it stood
//     with a log behind and lost (this server refused it), and not while
//     the candidate it voted for is still making itself known.
func (r *Replica) mayStand(dead raft.ServerID, rank int) bool {
	deadline := time.Now().Add(standPatience)
	for {
		if r.raft.State() != raft.Follower {
			return false
		}
		_, cur := r.raft.LeaderWithID()
		switch {
		case cur == dead:
			return true
		case cur != "" || rank == 0:
			return false
		case time.Since(r.raft.LastContact()) >= standStep:
			return true
		case time.Now().After(deadline):
			return false
		}
		select {
		case <-r.stopCtx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// standOrder says where a follower stands in the order of those that
// may replace the dead leader: ok is false for a server that has no
// vote.
func standOrder(servers []raft.Server, dead, self string) (rank int, ok bool) {
	var voters []string
	for _, s := range servers {
		if s.Suffrage == raft.Voter && string(s.ID) != dead {
			voters = append(voters, string(s.ID))
		}
	}
	slices.Sort(voters)
	rank = slices.Index(voters, self)
	return rank, rank >= 0
}

// refuses reports whether nothing listens at addr any more: the host
// answered, and refused.
func (r *Replica) refuses(addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	stop := context.AfterFunc(r.stopCtx, cancel)
	defer stop()
	c, err := (&net.Dialer{}).DialContext(ctx, "tcp", addr)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}
