package replica

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// A data directory of the BoltDB layout moves into the WAL: every log
// entry, and Raft's term and vote (which the two stores encode
// differently), come across; a copy left half made by a crash is made
// again; the old file is kept under another name.
func TestMigrateBoltKeepsLogTermAndVote(t *testing.T) {
	dir := t.TempDir()
	old, err := openBolt(filepath.Join(dir, boltFile))
	if err != nil {
		t.Fatal(err)
	}
	var logs []*raft.Log
	for i := uint64(1); i <= 300; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 1 + i/100, Type: raft.LogCommand, Data: []byte(fmt.Sprintf(`{"Op":"submit","JobID":"j%d"}`, i))})
	}
	if err := old.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
	// Raft compacts the head of its log after a snapshot.
	if err := old.DeleteRange(1, 20); err != nil {
		t.Fatal(err)
	}
	must(t, old.SetUint64([]byte("CurrentTerm"), 7))
	must(t, old.SetUint64([]byte("LastVoteTerm"), 6))
	must(t, old.Set([]byte("LastVoteCand"), []byte("10.0.0.2:4649")))
	must(t, old.Close())
	// A crash during an earlier copy left this behind.
	must(t, os.MkdirAll(filepath.Join(dir, walDir+".migrating"), 0o700))
	must(t, os.WriteFile(filepath.Join(dir, walDir+".migrating", "junk"), []byte("x"), 0o600))

	logStore, stable, closers, err := openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		for _, c := range closers {
			c()
		}
	}()
	first, _ := logStore.FirstIndex()
	last, _ := logStore.LastIndex()
	if first != 21 || last != 300 {
		t.Fatalf("the WAL holds %d..%d, want 21..300", first, last)
	}
	for i := first; i <= last; i++ {
		var l raft.Log
		if err := logStore.GetLog(i, &l); err != nil {
			t.Fatalf("entry %d: %v", i, err)
		}
		if want := logs[i-1]; l.Term != want.Term || string(l.Data) != string(want.Data) {
			t.Fatalf("entry %d = term %d %q, want term %d %q", i, l.Term, l.Data, want.Term, want.Data)
		}
	}
	if v, err := stable.GetUint64([]byte("CurrentTerm")); err != nil || v != 7 {
		t.Fatalf("CurrentTerm = %d, %v; want 7", v, err)
	}
	if v, err := stable.GetUint64([]byte("LastVoteTerm")); err != nil || v != 6 {
		t.Fatalf("LastVoteTerm = %d, %v; want 6", v, err)
	}
	if v, err := stable.Get([]byte("LastVoteCand")); err != nil || string(v) != "10.0.0.2:4649" {
		t.Fatalf("LastVoteCand = %q, %v", v, err)
	}
	for name, want := range map[string]bool{boltFile: false, boltMovedTo: true, walDir + ".migrating": false, walDir: true} {
		if _, err := os.Stat(filepath.Join(dir, name)); (err == nil) != want {
			t.Errorf("%s exists = %v, want %v", name, err == nil, want)
		}
	}
}

// A server that died after the WAL was in place but before the old file
// was renamed keeps the WAL it has and does not copy again.
func TestMigrateBoltAfterCrashKeepsWAL(t *testing.T) {
	dir := t.TempDir()
	w, err := openWAL(filepath.Join(dir, walDir), hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	must(t, w.StoreLogs([]*raft.Log{{Index: 1, Term: 3, Data: []byte("new")}}))
	must(t, w.Close())
	old, err := openBolt(filepath.Join(dir, boltFile))
	if err != nil {
		t.Fatal(err)
	}
	must(t, old.StoreLogs([]*raft.Log{{Index: 1, Term: 1, Data: []byte("old")}, {Index: 2, Term: 1, Data: []byte("old")}}))
	must(t, old.Close())

	logStore, _, closers, err := openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer closers[0]()
	var l raft.Log
	if last, _ := logStore.LastIndex(); last != 1 {
		t.Fatalf("last index %d: the old log was copied over the WAL", last)
	}
	if err := logStore.GetLog(1, &l); err != nil || string(l.Data) != "new" {
		t.Fatalf("entry 1 = %q, %v", l.Data, err)
	}
	if _, err := os.Stat(filepath.Join(dir, boltMovedTo)); err != nil {
		t.Fatal("the old file was not renamed:", err)
	}
}

// A running group of servers of the BoltDB layout, restarted as servers
// with the WAL, keeps every accepted job and goes on admitting.
func TestGroupMovesFromBoltToWAL(t *testing.T) {
	g := startGroup(t, 3, &group{bolt: true})
	for i := 0; i < 40; i++ {
		if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)}); res.Err != "" {
			t.Fatal(res.Err)
		}
	}
	for id := range g.peers {
		g.kill(id)
	}
	g.bolt = false
	for id := range g.peers {
		g.start(id)
	}
	if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(40)}); res.Err != "" {
		t.Fatal(res.Err)
	}
	g.waitJobs(41)
	for id := range g.live {
		if _, err := os.Stat(filepath.Join(g.dirs[id], boltMovedTo)); err != nil {
			t.Errorf("%s: %v", id, err)
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// The leader writes the binary log only once every server of the group
// has recorded that it reads it; the followers apply what it writes.
func TestLogCodecWaitsForEveryServer(t *testing.T) {
	g := newGroup(t, 3)
	l := g.waitLeader("")
	member := func(id string, codec int) {
		m := state.Member{ID: id, RaftAddr: g.peers[id], Codec: codec}
		if res, _ := g.apply(&state.Command{Op: state.OpMember, At: time.Now(), Member: &m}); res.Err != "" {
			t.Fatal(res.Err)
		}
	}
	if c := l.logCodec(); c != state.CodecJSON {
		t.Fatalf("no server recorded: codec %d", c)
	}
	member("r1", state.CodecBinary)
	member("r2", state.CodecBinary)
	member("r3", state.CodecJSON) // a server of the version before
	if c := l.logCodec(); c != state.CodecJSON {
		t.Fatalf("r3 reads only JSON, but the leader writes codec %d", c)
	}
	member("r3", state.CodecBinary) // upgraded
	if c := l.logCodec(); c != state.CodecBinary {
		t.Fatalf("every server reads binary, but the leader writes codec %d", c)
	}
	for i := range 20 {
		if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)}); res.Err != "" {
			t.Fatal(res.Err)
		}
	}
	g.waitJobs(20)
}

// waitJobs waits until every live replica holds n jobs.
func (g *group) waitJobs(n int) {
	g.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	g.mu.Lock()
	defer g.mu.Unlock()
	for id, r := range g.live {
		for {
			have := 0
			r.Read(func(s *state.State) { have = len(s.Jobs) })
			if have == n {
				break
			}
			if time.Now().After(deadline) {
				g.t.Fatalf("%s holds %d jobs, want %d", id, have, n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// A leader that hands over before it stops leaves a leader behind it
// that admits at once; a follower's or a lone server's hand-over is a
// no-op.
func TestTransferLeadership(t *testing.T) {
	g := newGroup(t, 3)
	old := g.waitLeader("")
	for id, r := range g.live {
		if r != old {
			if err := r.TransferLeadership(time.Second); err != nil || !old.IsLeader() {
				t.Fatalf("a follower (%s) handing over: %v; the leader still leads: %v", id, err, old.IsLeader())
			}
		}
	}
	if err := old.TransferLeadership(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if old.IsLeader() {
		t.Fatal("the old leader still leads after handing over")
	}
	g.kill(old.ID)
	next := g.waitLeader(old.ID)
	if res, err := next.Apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(1)}, 2*time.Second); err != nil || res.Err != "" {
		t.Fatalf("the new leader %s: %v %s", next.ID, err, res.Err)
	}

	solo, err := Start(Config{ID: "solo", InMemory: true, Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	defer solo.Shutdown()
	for !solo.IsLeader() {
		time.Sleep(5 * time.Millisecond)
	}
	if err := solo.TransferLeadership(time.Second); err != nil || !solo.IsLeader() {
		t.Fatalf("a group of one handing over: %v, leads: %v", err, solo.IsLeader())
	}
}
