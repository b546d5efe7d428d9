package replica

import (
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/state"
)

func marshalled(r *Replica) string {
	var b []byte
	r.Read(func(s *state.State) { b, _ = s.Marshal() })
	return string(b)
}

// A restore on the leader reaches every follower over Raft, and outlives a
// restart of the leader; a removed server no longer counts.
func TestRestoreAndRemoveOverTCP(t *testing.T) {
	g := newGroup(t, 3)
	for i := 0; i < 5; i++ {
		g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)})
	}
	l := g.waitLeader("")
	if err := l.Barrier(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	saved := marshalled(l)
	for i := 5; i < 9; i++ {
		g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)})
	}
	if err := l.Restore([]byte("{not json"), time.Second); err == nil {
		t.Fatal("an undecodable state was restored")
	}
	if err := l.Restore([]byte(saved), 10*time.Second); err != nil {
		t.Fatalf("restore: %v", err)
	}
	// Every replica converges on the saved state.
	deadline := time.Now().Add(10 * time.Second)
	for {
		same := 0
		g.mu.Lock()
		for _, r := range g.live {
			if marshalled(r) == saved {
				same++
			}
		}
		g.mu.Unlock()
		if same == 3 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of 3 replicas hold the restored state after 10s", same)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// And commands go on from it.
	g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(100)})

	// The leader restarts on its own data and still holds it.
	id := l.ID
	g.kill(id)
	g.start(id)
	g.mu.Lock()
	back := g.live[id]
	g.mu.Unlock()
	deadline = time.Now().Add(10 * time.Second)
	for {
		n := 0
		back.Read(func(s *state.State) { n = len(s.Jobs) })
		if n == 6 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s holds %d jobs after a restart, want the 5 restored and 1 after", id, n)
		}
		time.Sleep(20 * time.Millisecond)
	}

	l = g.waitLeader("")
	var follower string
	for p := range g.peers {
		if p != l.ID {
			follower = p
			break
		}
	}
	if err := l.RemoveServer(follower, 5*time.Second); err != nil {
		t.Fatalf("removing %s: %v", follower, err)
	}
	ms, err := l.Members()
	if err != nil || len(ms) != 2 {
		t.Fatalf("members after removing %s: %v %v", follower, ms, err)
	}
	for _, m := range ms {
		if m.ID == follower {
			t.Fatalf("%s still a member", follower)
		}
	}
	// The group goes on committing with the two it has.
	g.kill(follower)
	g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(101)})
}
