package server

// Server membership: forming a group with -bootstrap-expect/-join,
// joining an existing one, and forwarding writes from followers to the
// leader's HTTP API.

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// forwardedHeader marks a request a follower passed on, so that two
// servers that each think the other leads cannot bounce it forever.
const forwardedHeader = "X-Cohort-Forwarded"

// Advertise sets the HTTP address other servers and drivers reach this
// server at; it is recorded in the replicated state.
func (s *Server) Advertise(httpAddr string) {
	if !strings.Contains(httpAddr, "://") {
		httpAddr = s.scheme() + httpAddr
	}
	s.self = state.Member{ID: s.r.LocalID(), RaftAddr: s.r.Addr(), HTTPAddr: strings.TrimRight(httpAddr, "/"), Codec: state.CodecNewest}
}

// leaderURL is the leader's HTTP address, if the state knows it.
func (s *Server) leaderURL() string {
	_, id := s.r.Leader()
	var addr string
	s.r.Read(func(st *state.State) { addr = st.Members[id].HTTPAddr })
	return addr
}

// awaitLeaderURL waits a little for the leader's address: just after an
// election, or just after a group formed, a follower may know who leads
// before the leader's address reaches it.
func (s *Server) awaitLeaderURL(ctx context.Context, d time.Duration) string {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		changed := s.r.Changed()
		if u := s.leaderURL(); u != "" || s.r.IsLeader() {
			return u
		}
		select {
		case <-changed:
		case <-time.After(50 * time.Millisecond): // a leader change applies no command
		case <-ctx.Done():
			return ""
		}
	}
}

// leaderOnly runs h on the leader and forwards the request to the leader
// from a follower.
func (s *Server) leaderOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if s.r.IsLeader() {
			h(w, r)
			return
		}
		target := s.leaderURL()
		if target == "" && r.Header.Get(forwardedHeader) == "" {
			target = s.awaitLeaderURL(r.Context(), 3*time.Second)
			if s.r.IsLeader() {
				h(w, r)
				return
			}
		}
		if target == "" || r.Header.Get(forwardedHeader) != "" {
			s.writeNotLeader(w)
			return
		}
		u, err := url.Parse(target)
		if err != nil {
			writeErr(w, http.StatusInternalServerError, fmt.Errorf("leader address %q: %w", target, err))
			return
		}
		p := httputil.NewSingleHostReverseProxy(u)
		if s.peerHTTP != nil {
			p.Transport = s.peerHTTP.Transport
		}
		p.ErrorHandler = func(w http.ResponseWriter, r *http.Request, err error) {
			writeErr(w, http.StatusBadGateway, fmt.Errorf("forwarding to the leader at %s: %w", target, err))
		}
		// The leader sees this server's certificate, not the caller's:
		// it is told which node's certificate this server verified.
		c := s.callerOf(r)
		r.Header.Del(nodeHeader)
		r.Header.Del(serverHeader)
		if c.node != "" {
			r.Header.Set(nodeHeader, c.node)
		}
		if c.server {
			r.Header.Set(serverHeader, "1")
		}
		r.Header.Set(forwardedHeader, s.self.ID)
		p.ServeHTTP(w, r)
	}
}

func (s *Server) handleAgentSelf(w http.ResponseWriter, r *http.Request) {
	if !allowed(w, s.mayOperate(s.callerOf(r))) {
		return
	}
	_, leader := s.r.Leader()
	writeJSON(w, http.StatusOK, api.AgentSelf{Member: api.Member(s.self), Configured: s.r.Configured(), LeaderID: leader})
}

func (s *Server) handleMembers(w http.ResponseWriter, r *http.Request) {
	if !allowed(w, s.mayOperate(s.callerOf(r))) {
		return
	}
	out, err := s.members()
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// members is the server group as the Raft configuration has it, with the
// API addresses the servers recorded.
func (s *Server) members() ([]api.MemberView, error) {
	ms, err := s.r.Members()
	if err != nil {
		return nil, err
	}
	_, leader := s.r.Leader()
	known := map[string]state.Member{}
	s.r.Read(func(st *state.State) {
		for id, m := range st.Members {
			known[id] = m
		}
	})
	out := make([]api.MemberView, 0, len(ms))
	for _, m := range ms {
		out = append(out, api.MemberView{ID: m.ID, RaftAddr: m.Address, HTTPAddr: known[m.ID].HTTPAddr, Voter: m.Voter, Leader: m.ID == leader})
	}
	sort.Slice(out, func(a, b int) bool { return out[a].ID < out[b].ID })
	return out, nil
}

// handleJoin adds a server to the group (leader only) and records its
// addresses.
func (s *Server) handleJoin(w http.ResponseWriter, r *http.Request) {
	if !s.callerOf(r).server {
		refuse(w, s.errNotServer("joining the server group"))
		return
	}
	var m state.Member
	if !decodeBody(w, r, maxSmallBody, &m) {
		return
	}
	if m.ID == "" || m.RaftAddr == "" {
		writeErr(w, http.StatusBadRequest, errors.New(`body must be {"ID", "RaftAddr", "HTTPAddr"}`))
		return
	}
	if err := s.memberAddr(m); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if err := s.readsLog(m); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	// The record first: from the moment the server is in the
	// configuration, the leader chooses the log's encoding by it.
	if _, err := s.apply(&state.Command{Op: state.OpMember, At: s.now(), Member: &m}); err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	if err := s.r.AddVoter(m.ID, m.RaftAddr, 5*time.Second); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("adding %s: %w", m.ID, err))
		return
	}
	s.log.Info("server joined", "id", m.ID, "raft", m.RaftAddr, "http", m.HTTPAddr)
	writeJSON(w, http.StatusOK, m)
}

// readsLog refuses a server that cannot read the log the group writes
// (only JSON when the group writes binary, or an older binary version):
// it would stop at the first entry it cannot read, and its record would
// take the group back to the older encoding.
func (s *Server) readsLog(m state.Member) error {
	switch group := s.r.LogCodec(); {
	case m.Codec < state.CodecBinary && group >= state.CodecBinary:
		return fmt.Errorf("server %s reads only the JSON log, and this group writes its log in the binary encoding: upgrade it to this version", m.ID)
	case m.Codec < group:
		return fmt.Errorf("server %s reads the binary log up to version %d, and this group writes version %d: upgrade it to this version", m.ID, m.Codec, group)
	}
	return nil
}

// handleRegister records a member's addresses (leader only).
func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request) {
	if !s.callerOf(r).server {
		refuse(w, s.errNotServer("registering a server's addresses"))
		return
	}
	var m state.Member
	if !decodeBody(w, r, maxSmallBody, &m) {
		return
	}
	if m.ID == "" {
		writeErr(w, http.StatusBadRequest, errors.New(`body must be {"ID", "RaftAddr", "HTTPAddr"}`))
		return
	}
	if err := s.memberAddr(m); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	// Only a server of an older version, put back on a member's address,
	// is refused here: it is in the group already.
	if err := s.readsLog(m); err != nil {
		s.log.Error("a server that cannot read the log this group writes is in the group: stop it, remove it (cohort operator raft remove-peer) and upgrade it", "id", m.ID, "raft", m.RaftAddr, "error", err)
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	if _, err := s.apply(&state.Command{Op: state.OpMember, At: s.now(), Member: &m}); err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, m)
}

// memberAddr checks a member's API address: with TLS, followers forward
// callers' tokens there, so it must be https.
func (s *Server) memberAddr(m state.Member) error {
	if s.tls != nil && m.HTTPAddr != "" && !strings.HasPrefix(m.HTTPAddr, "https://") {
		return fmt.Errorf("member %s: API address %q must be https:// in a group with TLS", m.ID, m.HTTPAddr)
	}
	if len(m.ID) > 128 || len(m.HTTPAddr) > 256 || len(m.RaftAddr) > 256 {
		return errors.New("member ID or addresses too long")
	}
	return nil
}

// registerSelf makes sure the replicated state holds this server's
// addresses: the leader writes its own; a follower asks the leader.
func (s *Server) registerSelf() error {
	if s.self.ID == "" {
		return nil
	}
	var have state.Member
	s.r.Read(func(st *state.State) { have = st.Members[s.self.ID] })
	if have == s.self {
		return nil
	}
	// A leader of the version before drops the Codec it does not know:
	// ask it again now and then, not every second, until a leader that
	// keeps it takes over.
	onlyCodec := have.ID == s.self.ID && have.RaftAddr == s.self.RaftAddr && have.HTTPAddr == s.self.HTTPAddr
	if last := s.codecAsked.Load(); onlyCodec && last != 0 && time.Since(time.Unix(0, last)) < time.Minute && !s.r.IsLeader() {
		return nil
	}
	if s.r.IsLeader() {
		_, err := s.apply(&state.Command{Op: state.OpMember, At: s.now(), Member: &s.self})
		return err
	}
	target := s.leaderURL()
	if target == "" {
		return nil // the leader registers itself first
	}
	if err := s.peer(target, "").RegisterMember(api.Member(s.self)); err != nil {
		return err
	}
	if onlyCodec {
		s.codecAsked.Store(time.Now().UnixNano())
	}
	return nil
}

// Join makes this server a member of a group: it asks the servers at
// addrs (HTTP addresses) who they are; if one belongs to a group with a
// leader, it asks to be added; otherwise, once expect servers (this one
// included) are known, every one of them bootstraps the same group. It
// returns when this replica is configured or ctx ends.
func (s *Server) Join(ctx context.Context, expect int, addrs []string) error {
	for {
		if s.r.Configured() {
			return nil
		}
		peers := map[string]string{s.self.ID: s.self.RaftAddr}
		for _, a := range addrs {
			if !strings.Contains(a, "://") {
				a = s.scheme() + a
			}
			self, err := s.peer(a, "").AgentSelf()
			if err != nil {
				s.log.Debug("join: peer not answering", "addr", a, "error", err)
				continue
			}
			if self.Member.ID == s.self.ID {
				continue
			}
			if self.Configured && self.LeaderID != "" {
				if err := s.peer(a, "").Join(api.Member(s.self)); err != nil {
					s.log.Warn("join: asking the group to add this server", "via", a, "error", err)
					continue
				}
				s.log.Info("joined an existing group", "via", a)
				return nil
			}
			peers[self.Member.ID] = self.Member.RaftAddr
		}
		if expect > 1 && len(peers) >= expect {
			s.log.Info("bootstrapping the group", "servers", len(peers))
			return s.r.Bootstrap(peers)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// peer is a client for another server's API, showing this server's
// certificate and, where the call is made for a caller, its token.
func (s *Server) peer(addr, token string) *api.Client {
	return api.NewClient(api.Config{Address: addr, Timeout: 10 * time.Second, HTTPClient: s.peerHTTP, Token: token})
}

// scheme is how this server's group speaks to each other.
func (s *Server) scheme() string {
	if s.tls != nil {
		return "https://"
	}
	return "http://"
}
