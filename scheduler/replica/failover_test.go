package replica

import (
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
		rc := raft.ReloadableConfig{HeartbeatTimeout: slowTimeouts.Heartbeat, ElectionTimeout: slowTimeouts.Election}
		c := r.raft.ReloadableConfig()
		rc.TrailingLogs, rc.SnapshotInterval, rc.SnapshotThreshold = c.TrailingLogs, c.SnapshotInterval, c.SnapshotThreshold
		if err := r.raft.ReloadConfig(rc); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// TestKilledLeaderReplacedAtOnce: with a 20 s heartbeat timeout, the
// followers of a leader whose process ended (its sockets closed, its port
// refusing) elect a new one within seconds, over plain TCP and over TLS,
// and the group goes on committing.
func TestKilledLeaderReplacedAtOnce(t *testing.T) {
	ca, err := tlsutil.NewCA("raft test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.IssueBundle(t.TempDir(), "server", tlsutil.ServerCert(nil))
	if err != nil {
		t.Fatal(err)
	}
	sc, cc, err := server.RaftConfigs()
	if err != nil {
		t.Fatal(err)
	}
	for name, g := range map[string]*group{"tcp": {}, "tls": {tlsServer: sc, tlsClient: cc}} {
		t.Run(name, func(t *testing.T) {
			old := slowGroup(t, g)
			if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(0)}); res.Err != "" {
				t.Fatal(res.Err)
			}
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
		})
	}
}

// TestLiveLeaderKeepsLeading: a connection to a follower that carried
// bytes and ended, while the leader lives, is looked into and changes
// nothing: no election, the same leader, the same term.
func TestLiveLeaderKeepsLeading(t *testing.T) {
	g := &group{}
	l := slowGroup(t, g)
	term := l.raft.CurrentTerm()
	var f *Replica
	for _, r := range g.live {
		if r != l {
			f = r
		}
	}
	before := f.checks.Load()
	c, err := net.Dial("tcp", g.peers[f.ID])
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte{0}) // the start of an AppendEntries, then nothing
	time.Sleep(50 * time.Millisecond)
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for f.checks.Load() == before && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if f.checks.Load() == before {
		t.Fatal("the follower did not look into the connection that ended")
	}
	time.Sleep(standGrace + 3*standStep)
	if !l.IsLeader() || l.raft.CurrentTerm() != term || f.raft.CurrentTerm() != term {
		t.Errorf("leader %s leads %v, term %d then %d (follower %d)", l.ID, l.IsLeader(), term, l.raft.CurrentTerm(), f.raft.CurrentTerm())
	}
}

func TestStandDelay(t *testing.T) {
	servers := []raft.Server{
		{ID: "c", Suffrage: raft.Voter}, {ID: "a", Suffrage: raft.Voter},
		{ID: "b", Suffrage: raft.Voter}, {ID: "n", Suffrage: raft.Nonvoter},
	}
	for _, tc := range []struct {
		dead, self string
		want       time.Duration
		ok         bool
	}{
		{"a", "b", standGrace, true},
		{"a", "c", standGrace + standStep, true},
		{"b", "a", standGrace, true},
		{"b", "c", standGrace + standStep, true},
		{"c", "b", standGrace + standStep, true},
		{"a", "n", 0, false},
		{"a", "x", 0, false},
	} {
		got, ok := standDelay(servers, tc.dead, tc.self)
		if got != tc.want || ok != tc.ok {
			t.Errorf("standDelay(dead %s, self %s) = %s %v, want %s %v", tc.dead, tc.self, got, ok, tc.want, tc.ok)
		}
	}
}
