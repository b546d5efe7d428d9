package replica

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/state"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// boltDir makes a data directory of the BoltDB layout holding entries
// 1..300 of the given terms, less those in gap, with term 7 and a vote.
func boltDir(t *testing.T, gap [2]uint64) (string, []*raft.Log) {
	t.Helper()
	dir := t.TempDir()
	old, err := openBolt(filepath.Join(dir, boltFile))
	if err != nil {
		t.Fatal(err)
	}
	var logs []*raft.Log
	for i := uint64(1); i <= 300; i++ {
		logs = append(logs, &raft.Log{Index: i, Term: 1 + i/100, Type: raft.LogCommand, Data: []byte(fmt.Sprintf(`{"Op":"submit","JobID":"j%d"}`, i))})
	}
	must(t, old.StoreLogs(logs))
	// Raft compacts the head of its log after a snapshot.
	must(t, old.DeleteRange(1, 20))
	if gap[0] > 0 {
		must(t, old.DeleteRange(gap[0], gap[1]))
	}
	must(t, old.SetUint64([]byte("CurrentTerm"), 7))
	must(t, old.SetUint64([]byte("LastVoteTerm"), 6))
	must(t, old.Set([]byte("LastVoteCand"), []byte("10.0.0.2:4649")))
	must(t, old.Close())
	return dir, logs
}

// snapshotAt records a snapshot of index in dir, as Raft's file store does.
func snapshotAt(t *testing.T, dir string, index uint64) {
	t.Helper()
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, 2, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	_, trans := raft.NewInmemTransport("")
	sink, err := snaps.Create(raft.SnapshotVersionMax, index, 2, raft.Configuration{}, 1, trans)
	if err != nil {
		t.Fatal(err)
	}
	sink.Write([]byte("{}"))
	must(t, sink.Close())
}

// checkMoved opens dir as a server does and checks that the WAL holds
// entries from..300 as written, with the term and vote, and that the old
// file was kept and its name taken by the placeholder.
func checkMoved(t *testing.T, dir string, logs []*raft.Log, from uint64) {
	t.Helper()
	logStore, stable, closers, err := openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	defer closeInReverse(closers)
	first, _ := logStore.FirstIndex()
	last, _ := logStore.LastIndex()
	if first != from || last != 300 {
		t.Fatalf("the WAL holds %d..%d, want %d..300", first, last, from)
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
	for name, want := range map[string]bool{boltMovedTo: true, walDir + ".migrating": false, walDir: true} {
		if _, err := os.Stat(filepath.Join(dir, name)); (err == nil) != want {
			t.Errorf("%s exists = %v, want %v", name, err == nil, want)
		}
	}
	// An older server would open this, and fail.
	if fi, err := os.Stat(filepath.Join(dir, boltFile)); err != nil || !fi.IsDir() {
		t.Errorf("%s is not the placeholder directory: %v", boltFile, err)
	}
	if _, err := openBolt(filepath.Join(dir, boltFile)); err == nil {
		t.Error("BoltDB opened the placeholder")
	}
}

// A data directory of the BoltDB layout moves into the WAL: every log
// entry, and Raft's term and vote (which the two stores encode
// differently), come across; a copy left half made by a crash is made
// again; the old file is kept under another name.
func TestMigrateBoltKeepsLogTermAndVote(t *testing.T) {
	dir, logs := boltDir(t, [2]uint64{})
	// A crash during an earlier copy left a partial WAL behind, of other
	// entries than the log's.
	w, err := openWAL(filepath.Join(dir, walDir+".migrating"), hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	var partial []*raft.Log
	for i := uint64(21); i <= 50; i++ {
		partial = append(partial, &raft.Log{Index: i, Term: 9, Data: []byte("partial")})
	}
	must(t, w.StoreLogs(partial))
	must(t, w.Close())
	checkMoved(t, dir, logs, 21)
	// Started again, it keeps what it has.
	checkMoved(t, dir, logs, 21)
}

// Raft leaves a gap in a BoltDB log below a restored or installed
// snapshot; the WAL takes the entries above it, and only when a snapshot
// covers the rest.
func TestMigrateBoltAcrossAGap(t *testing.T) {
	dir, logs := boltDir(t, [2]uint64{150, 160})
	snapshotAt(t, dir, 160)
	checkMoved(t, dir, logs, 161)

	dir, _ = boltDir(t, [2]uint64{150, 160})
	_, _, _, err := openLog(dir, false, hclog.NewNullLogger())
	if err == nil || !strings.Contains(err.Error(), "gap before entry 161") {
		t.Fatalf("a gap no snapshot covers: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, boltFile)); err != nil {
		t.Fatal("the refused move lost the old log:", err)
	}
}

// A snapshot past the BoltDB log's end (installed on a follower that
// lagged, or restored): Raft goes on after the snapshot, so the WAL
// starts empty and takes the entry after it; a move cut short there is
// finished, not refused.
func TestMigrateBoltBelowSnapshot(t *testing.T) {
	dir, _ := boltDir(t, [2]uint64{})
	snapshotAt(t, dir, 310)
	logStore, stable, closers, err := openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	if last, _ := logStore.LastIndex(); last != 0 {
		t.Fatalf("the WAL holds entries up to %d below the snapshot", last)
	}
	if v, _ := stable.GetUint64([]byte("CurrentTerm")); v != 7 {
		t.Fatalf("CurrentTerm = %d", v)
	}
	if err := logStore.StoreLogs([]*raft.Log{{Index: 311, Term: 7, Data: []byte("next")}}); err != nil {
		t.Fatal("the entry after the snapshot:", err)
	}
	closeInReverse(closers)

	// The crash window: both renames undone but the WAL in place.
	dir, _ = boltDir(t, [2]uint64{})
	snapshotAt(t, dir, 310)
	_, _, closers, err = openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	closeInReverse(closers)
	must(t, os.RemoveAll(filepath.Join(dir, boltFile)))
	must(t, os.Rename(filepath.Join(dir, boltMovedTo), filepath.Join(dir, boltFile)))
	_, _, closers, err = openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal("finishing a move cut short:", err)
	}
	closeInReverse(closers)
}

// A BoltDB log beside a WAL: the last step of a move that a crash cut
// short is finished; a BoltDB log ahead of the WAL, or a second one
// beside the kept one, is refused rather than forgotten.
func TestMigrateBoltBesideWAL(t *testing.T) {
	// The crash came after the WAL was in place: the two agree.
	dir, logs := boltDir(t, [2]uint64{})
	w, err := openWAL(filepath.Join(dir, walDir), hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	must(t, w.StoreLogs(logs[20:]))
	must(t, w.SetUint64([]byte("CurrentTerm"), 7))
	must(t, w.SetUint64([]byte("LastVoteTerm"), 6))
	must(t, w.Set([]byte("LastVoteCand"), []byte("10.0.0.2:4649")))
	must(t, w.Close())
	checkMoved(t, dir, logs, 21)

	// An older server wrote a BoltDB log after the move (and removed the
	// placeholder): it is ahead.
	must(t, os.RemoveAll(filepath.Join(dir, boltFile)))
	must(t, os.Rename(filepath.Join(dir, boltMovedTo), filepath.Join(dir, "kept")))
	old, err := openBolt(filepath.Join(dir, boltFile))
	if err != nil {
		t.Fatal(err)
	}
	must(t, old.StoreLogs([]*raft.Log{{Index: 301, Term: 8, Data: []byte("newer")}}))
	must(t, old.SetUint64([]byte("CurrentTerm"), 8))
	must(t, old.Close())
	if _, _, _, err := openLog(dir, false, hclog.NewNullLogger()); err == nil || !strings.Contains(err.Error(), "differs from the write-ahead log") {
		t.Fatalf("a BoltDB log ahead of the WAL: %v", err)
	}
	// Not ahead, but not the same: a vote the WAL does not hold.
	old, err = openBolt(filepath.Join(dir, boltFile))
	if err != nil {
		t.Fatal(err)
	}
	must(t, old.DeleteRange(301, 301))
	must(t, old.SetUint64([]byte("CurrentTerm"), 7))
	must(t, old.SetUint64([]byte("LastVoteTerm"), 7))
	must(t, old.Set([]byte("LastVoteCand"), []byte("10.0.0.3:4649")))
	must(t, old.Close())
	if _, _, _, err := openLog(dir, false, hclog.NewNullLogger()); err == nil || !strings.Contains(err.Error(), "differs from the write-ahead log") {
		t.Fatalf("a BoltDB log with another vote: %v", err)
	}
	// And beside a kept one.
	must(t, os.Rename(filepath.Join(dir, "kept"), filepath.Join(dir, boltMovedTo)))
	if _, _, _, err := openLog(dir, false, hclog.NewNullLogger()); err == nil || !strings.Contains(err.Error(), "move one of them away") {
		t.Fatalf("a second BoltDB log: %v", err)
	}
}

// Two servers on one data directory: the second is refused at once,
// instead of waiting for ever on the WAL's files.
func TestDataDirLocked(t *testing.T) {
	dir := t.TempDir()
	_, _, closers, err := openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := openLog(dir, false, hclog.NewNullLogger()); err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("a second open of the data directory: %v", err)
	}
	closeInReverse(closers)
	_, _, closers, err = openLog(dir, false, hclog.NewNullLogger())
	if err != nil {
		t.Fatal("after the first closed:", err)
	}
	closeInReverse(closers)
}

// A running group of servers of the BoltDB layout, a restore behind it,
// restarted as servers with the WAL, keeps every accepted job and goes on
// admitting.
func TestGroupMovesFromBoltToWAL(t *testing.T) {
	g := startGroup(t, 3, &group{bolt: true})
	for i := 0; i < 40; i++ {
		if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)}); res.Err != "" {
			t.Fatal(res.Err)
		}
		// A restore half way leaves a gap in every BoltDB log.
		if i == 19 {
			l := g.waitLeader("")
			saved := marshalled(l)
			must(t, l.Restore([]byte(saved), 10*time.Second))
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
	if c := l.LogCodec(); c != state.CodecJSON {
		t.Fatalf("no server recorded: codec %d", c)
	}
	member("r1", state.CodecBinary)
	member("r2", state.CodecBinary)
	member("r3", state.CodecJSON) // a server of the version before
	if c := l.LogCodec(); c != state.CodecJSON {
		t.Fatalf("r3 reads only JSON, but the leader writes codec %d", c)
	}
	// An entry encoded now, with r3's record in place.
	if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(99)}); res.Err != "" {
		t.Fatal(res.Err)
	}
	if b := lastEntry(t, g); b[0] != '{' {
		t.Fatalf("an entry written while r3 reads only JSON: %q", b)
	}
	member("r3", state.CodecBinary) // upgraded
	if c := g.waitLeader("").LogCodec(); c != state.CodecBinary {
		t.Fatalf("every server reads binary, but the leader writes codec %d", c)
	}
	// Written in the version every server reads (1), not the newest.
	if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(98)}); res.Err != "" {
		t.Fatal(res.Err)
	}
	if e := lastEntry(t, g); e[0] != 0xc1 || e[1] != state.CodecBinary {
		t.Fatalf("an entry written while servers read binary version 1 only: % x", e[:2])
	}
	for _, id := range []string{"r1", "r2", "r3"} {
		member(id, state.CodecNewest)
	}
	if c := g.waitLeader("").LogCodec(); c != state.CodecNewest {
		t.Fatalf("every server reads the newest binary version, but the leader writes codec %d", c)
	}
	for i := range 20 {
		if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(i)}); res.Err != "" {
			t.Fatal(res.Err)
		}
	}
	if b := lastEntry(t, g); b[0] != 0xc1 || b[1] != state.CodecNewest {
		t.Fatalf("an entry written once every server reads binary: %q", b)
	}
	g.waitJobs(22)
}

// lastEntry is the data of the last command entry in the leader's log.
func lastEntry(t *testing.T, g *group) []byte {
	t.Helper()
	l := g.waitLeader("")
	last, err := l.logs.LastIndex()
	if err != nil {
		t.Fatal(err)
	}
	for i := last; i > 0; i-- {
		var e raft.Log
		must(t, l.logs.GetLog(i, &e))
		if e.Type == raft.LogCommand {
			return e.Data
		}
	}
	t.Fatal("no command in the log")
	return nil
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

	// The hand-over of a leader whose followers are one stopped and one
	// live: Raft may pick the stopped one (they are equally far along);
	// the live one takes over all the same.
	g.start(old.ID)
	next = g.waitLeader("")
	if res, _ := g.apply(&state.Command{Op: state.OpSubmit, At: time.Now(), Job: gang(0)}); res.Err != "" {
		t.Fatal(res.Err)
	}
	g.waitJobs(1)
	var stopped string
	for id, r := range g.live {
		if r != next {
			stopped = id
			break
		}
	}
	g.kill(stopped)
	if err := next.TransferLeadership(5 * time.Second); err != nil {
		t.Fatalf("with %s stopped: %v", stopped, err)
	}
	if next.IsLeader() {
		t.Fatal("still leading after handing over")
	}
	next = g.waitLeader(next.ID)
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
