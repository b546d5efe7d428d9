package server

// Operating the server group: saving and restoring its state, and taking
// a server that is gone for good out of it. Each needs a management token
// (or a server's certificate) when Nomad's ACLs are on, as Nomad's own
// operator endpoints do.

import (
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/cohort-dev/cohort/scheduler/replica"
	"github.com/cohort-dev/cohort/scheduler/snapshot"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// handleSnapshotSave answers with the state as the leader has applied it
// once everything committed before the request is applied: a consistent
// point, not whatever a lagging follower holds.
func (s *Server) handleSnapshotSave(w http.ResponseWriter, r *http.Request) {
	if !allowed(w, s.mayOperate(s.callerOf(r))) {
		return
	}
	if err := s.r.Barrier(5 * time.Second); err != nil {
		writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("waiting for the state to be applied: %w", err))
		return
	}
	var (
		b   []byte
		err error
		h   = snapshot.Header{Server: s.r.LocalID(), SavedAt: s.now().UTC()}
	)
	s.r.Read(func(st *state.State) {
		b, err = st.Marshal()
		h.Jobs = len(st.Jobs)
		h.Index = s.r.AppliedIndex()
	})
	if err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("encoding the state: %w", err))
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="cohort.snap"`)
	if err := snapshot.Write(w, h, b); err != nil {
		s.log.Warn("writing a snapshot to a caller", "error", err)
		return
	}
	s.log.Info("state snapshot saved", "index", h.Index, "jobs", h.Jobs, "bytes", len(b))
}

// handleSnapshotRestore replaces the group's state with a saved one. The
// leader loop is held off meanwhile and forgets what it cached of the old
// state; what the restored state says runs and what Nomad runs are then
// reconciled by the next pass as after any change of leader.
func (s *Server) handleSnapshotRestore(w http.ResponseWriter, r *http.Request) {
	if !allowed(w, s.mayOperate(s.callerOf(r))) {
		return
	}
	body := http.MaxBytesReader(w, r.Body, snapshot.MaxSize+64<<10)
	h, b, err := snapshot.Read(body)
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeErr(w, http.StatusRequestEntityTooLarge, fmt.Errorf("a snapshot holds at most %d bytes", snapshot.MaxSize))
			return
		}
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	// Admissions placed against the old state must not commit into the
	// restored one: they hold restoreMu from placement to commit. The
	// leader loop holds schedMu for its passes.
	s.restoreMu.Lock()
	s.schedMu.Lock()
	err = s.r.Restore(b, 30*time.Second)
	s.resetLeaderStateLocked()
	s.schedMu.Unlock()
	s.restoreMu.Unlock()
	s.waitMu.Lock()
	s.waitCache = waitCache{}
	s.waitMu.Unlock()
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, replica.ErrNotLeader) {
			code = http.StatusServiceUnavailable
		}
		writeErr(w, code, fmt.Errorf("restoring the snapshot (if this server lost its leadership meanwhile, the restore may still have applied: check with cohort status): %w", err))
		return
	}
	// The snapshot's record of the servers' addresses may predate this
	// leader: record it again, or followers cannot forward to it.
	if err := s.registerSelf(); err != nil {
		s.log.Warn("recording this server's addresses after a restore", "error", err)
	}
	s.log.Warn("state restored from a snapshot", "saved_by", h.Server, "saved_at", h.SavedAt, "index", h.Index, "jobs", h.Jobs)
	s.wake()
	writeJSON(w, http.StatusOK, h)
}

// handleRemoveMember takes a server out of the Raft group. It is for a
// server that will not come back: one that is only down still counts
// toward the quorum and will rejoin by itself. The leader is not removed:
// it is stopped first, and removed once another leads.
func (s *Server) handleRemoveMember(w http.ResponseWriter, r *http.Request) {
	if !allowed(w, s.mayOperate(s.callerOf(r))) {
		return
	}
	id := r.PathValue("id")
	ms, err := s.r.Members()
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	found := false
	for _, m := range ms {
		found = found || m.ID == id
	}
	switch {
	case !found:
		writeErr(w, http.StatusNotFound, fmt.Errorf("no server %q in the group", id))
		return
	case len(ms) == 1:
		writeErr(w, http.StatusBadRequest, fmt.Errorf("%q is the group's only server", id))
		return
	case id == s.r.LocalID():
		// Raft shuts a removed server's replica down: a leader removing
		// itself would leave a process that answers only errors.
		writeErr(w, http.StatusBadRequest, fmt.Errorf("%q leads the group: stop it first (it is being retired), and remove it once another server leads", id))
		return
	}
	// Forget its addresses first: once the leader has removed itself it
	// can commit nothing more.
	if _, err := s.apply(&state.Command{Op: state.OpForget, At: s.now(), Member: &state.Member{ID: id}}); err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	if err := s.r.RemoveServer(id, 10*time.Second); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("removing %s: %w", id, err))
		return
	}
	s.log.Warn("server removed from the group", "id", id)
	writeJSON(w, http.StatusOK, map[string]string{"Removed": id})
}
