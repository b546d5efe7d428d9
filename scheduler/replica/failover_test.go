package replica

import (
	"crypto/tls"
	"net"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/raft"
)

// slowTimeouts make a heartbeat timeout far longer than any failover the
// tests accept, so a new leader in time can only come from the followers
// noticing the dead leader's connections.
var slowTimeouts = Timeouts{Heartbeat: 20 * time.Second, Election: 20 * time.Second, LeaderLease: 150 * time.Millisecond, Commit: 5 * time.Millisecond}

// slowGroup starts a group on LAN timeouts, for a quick first election,
// and then gives every member slowTimeouts.
func slowGroup(t *testing.T, g *group) *Replica {
	g = startGroup(t, 3, g)
	l := g.waitLeader("")
	for _, r := range g.live {
		slow(t, r)
	}
	return l
}

func slow(t *testing.T, r *Replica) {
	rc := r.raft.ReloadableConfig()
	rc.HeartbeatTimeout, rc.ElectionTimeout = slowTimeouts.Heartbeat, slowTimeouts.Election
	if err := r.raft.ReloadConfig(rc); err != nil {
		t.Fatal(err)
	}
}

// raftTLS returns Raft's TLS configurations for a new CA's server.
func raftTLS(t *testing.T) (server, client *tls.Config) {
	ca, err := tlsutil.NewCA("raft test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, err := ca.IssueBundle(t.TempDir(), "server", tlsutil.ServerCert(nil))
	if err != nil {
		t.Fatal(err)
	}
	sc, cc, err := b.RaftConfigs()
	if err != nil {
		t.Fatal(err)
	}
	return sc, cc
}

// TestKilledLeaderReplacedAtOnce: with a 20 s heartbeat timeout, the
// followers of a leader whose process ended (its sockets closed, its port
// refusing) elect a new one within seconds, over plain TCP and over TLS,
// and keeps it (the second follower does not stand after the first has
// won), and the group goes on committing.
func TestKilledLeaderReplacedAtOnce(t *testing.T) {
	sc, cc := raftTLS(t)
	for name, g := range map[string]*group{"tcp": {}, "tls": {tlsServer: sc, tlsClient: cc}} {
		t.Run(name, func(t *testing.T) {
			old := slowGroup(t, g)
			if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(0)}); res.Err != "" {
				t.Fatal(res.Err)
			}
			term := old.raft.CurrentTerm()
			t0 := time.Now()
			g.kill(old.ID)
			var next *Replica
			for next == nil && time.Since(t0) < 5*time.Second {
				if next = g.leader(); next == nil {
					time.Sleep(time.Millisecond)
				}
			}
			if next == nil {
				t.Fatalf("no leader %s after the leader was killed (the heartbeat timeout is %s)", time.Since(t0), slowTimeouts.Heartbeat)
			}
			t.Logf("%s leads %s after %s was killed", next.ID, time.Since(t0).Round(time.Millisecond), old.ID)
			if res, err := next.Apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(1)}, 2*time.Second); err != nil || res.Err != "" {
				t.Fatalf("the new leader: %v %s", err, res.Err)
			}
			// The first follower to stand may lose, when its log is behind
			// the other's (as when the leader died just after committing
			// an entry on the other alone); the second then stands and
			// wins, one term later. Nobody stands against a winner.
			time.Sleep(standGrace + 3*standStep)
			if got := next.raft.CurrentTerm(); !next.IsLeader() || got < term+1 || got > term+2 {
				t.Errorf("%s leads: %v; term %d, want it to lead in term %d or %d", next.ID, next.IsLeader(), got, term+1, term+2)
			}
		})
	}
}

// TestHandOverThenStop: a leader that hands over and stops at once, as
// cohort server does, leaves the leader it chose leading: the follower
// that sees the old leader's connections end does not stand against it.
func TestHandOverThenStop(t *testing.T) {
	g := &group{}
	slowGroup(t, g)
	for i := 0; i < 5; i++ {
		old := g.waitLeader("")
		term := old.raft.CurrentTerm()
		if err := old.TransferLeadership(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		g.kill(old.ID)
		next := g.waitLeader(old.ID)
		time.Sleep(standGrace + 3*standStep)
		if !next.IsLeader() || next.raft.CurrentTerm() != term+1 {
			t.Fatalf("round %d: %s leads: %v; term %d, want %d (one election)", i, next.ID, next.IsLeader(), next.raft.CurrentTerm(), term+1)
		}
		g.start(old.ID)
		// The restarted server takes the long heartbeat timeout too.
		g.mu.Lock()
		slow(t, g.live[old.ID])
		g.mu.Unlock()
	}
}

// TestLiveLeaderKeepsLeading: a connection to a follower that carried
// bytes and ended, while the leader lives, is looked into and changes
// nothing: no election, the same leader, the same term.
func TestLiveLeaderKeepsLeading(t *testing.T) {
	sc, cc := raftTLS(t)
	for name, g := range map[string]*group{"tcp": {}, "tls": {tlsServer: sc, tlsClient: cc}} {
		t.Run(name, func(t *testing.T) {
			l := slowGroup(t, g)
			term := l.raft.CurrentTerm()
			var f *Replica
			for _, r := range g.live {
				if r != l {
					f = r
				}
			}
			before := f.probes.Load()
			var c net.Conn
			var err error
			if g.tlsClient != nil {
				c, err = tls.Dial("tcp", g.peers[f.ID], g.tlsClient)
			} else {
				c, err = net.Dial("tcp", g.peers[f.ID])
			}
			if err != nil {
				t.Fatal(err)
			}
			c.Write([]byte{0}) // the start of an AppendEntries, then nothing
			time.Sleep(50 * time.Millisecond)
			c.Close()
			deadline := time.Now().Add(5 * time.Second)
			for f.probes.Load() == before && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			if f.probes.Load() == before {
				t.Fatal("the follower did not probe the leader after the connection ended")
			}
			time.Sleep(standGrace + 3*standStep)
			if !l.IsLeader() || l.raft.CurrentTerm() != term || f.raft.CurrentTerm() != term {
				t.Errorf("leader %s leads %v, term %d then %d (follower %d)", l.ID, l.IsLeader(), term, l.raft.CurrentTerm(), f.raft.CurrentTerm())
			}
		})
	}
}

func TestStandOrder(t *testing.T) {
	servers := []raft.Server{
		{ID: "c", Suffrage: raft.Voter}, {ID: "a", Suffrage: raft.Voter},
		{ID: "b", Suffrage: raft.Voter}, {ID: "n", Suffrage: raft.Nonvoter},
	}
	for _, tc := range []struct {
		dead, self string
		want       int
		ok         bool
	}{
		{"a", "b", 0, true},
		{"a", "c", 1, true},
		{"b", "a", 0, true},
		{"b", "c", 1, true},
		{"c", "b", 1, true},
		{"a", "n", -1, false},
		{"a", "x", -1, false},
	} {
		got, ok := standOrder(servers, tc.dead, tc.self)
		if got != tc.want || ok != tc.ok {
			t.Errorf("standOrder(dead %s, self %s) = %d %v, want %d %v", tc.dead, tc.self, got, ok, tc.want, tc.ok)
		}
	}
}
