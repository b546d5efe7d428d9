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
)

func (r *Replica) watchLeader(gone <-chan struct{}) {
	defer r.watching.Done()
	for {
		select {
		case <-r.stop:
			return
		case <-gone:
		}
		r.leaderMaybeGone()
	}
}

// leaderMaybeGone runs when a connection to this server ended from the
// other side.
func (r *Replica) leaderMaybeGone() {
	r.checks.Add(1)
	if r.raft.State() != raft.Follower {
		return
	}
	addr, id := r.raft.LeaderWithID()
	if addr == "" || string(id) == r.ID || !refuses(string(addr)) {
		return
	}
	f := r.raft.GetConfiguration()
	if f.Error() != nil {
		return
	}
	delay, ok := standDelay(f.Configuration().Servers, string(id), r.ID)
	if !ok {
		return
	}
	select {
	case <-r.stop:
		return
	case <-time.After(delay):
	}
	// Stand only while the dead leader is still the last one known: a
	// new one that has made itself known, or an election under way,
	// wins without this server's help.
	if r.raft.State() != raft.Follower {
		return
	}
	if _, cur := r.raft.LeaderWithID(); cur != "" && cur != id {
		return
	}
	r.log.Info("the leader's Raft port refuses connections; standing for election", "leader", string(id))
	// Raft starts an election at once when told to by a TimeoutNow; the
	// follower sends it to itself, through its own transport.
	self := r.trans.LocalAddr()
	req := &raft.TimeoutNowRequest{RPCHeader: raft.RPCHeader{
		ProtocolVersion: raft.ProtocolVersionMax,
		ID:              []byte(r.ID),
		Addr:            r.trans.EncodePeer(raft.ServerID(r.ID), self),
	}}
	if err := r.trans.TimeoutNow(raft.ServerID(r.ID), self, req, &raft.TimeoutNowResponse{}); err != nil {
		r.log.Warn("could not start an election; the heartbeat timeout will", "error", err)
	}
}

// standDelay says how long a follower waits before it stands for
// election once the leader dead is gone: ok is false for a server that
// has no vote.
func standDelay(servers []raft.Server, dead, self string) (time.Duration, bool) {
	var voters []string
	for _, s := range servers {
		if s.Suffrage == raft.Voter && string(s.ID) != dead {
			voters = append(voters, string(s.ID))
		}
	}
	slices.Sort(voters)
	rank := slices.Index(voters, self)
	if rank < 0 {
		return 0, false
	}
	return standGrace + time.Duration(rank)*standStep, true
}

// refuses reports whether nothing listens at addr any more: the host
// answered, and refused.
func refuses(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, probeTimeout)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}
