package server

// Worker subnets: each node's microvm driver leases its subnet from the
// servers (one Raft commit), renews it every 15 s, and watches the table
// to route every other active node's subnet through that node's address.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// maxLeaseWait bounds a blocking read of the lease table.
const maxLeaseWait = 55 * time.Second

// leaseRange is the worker range the servers hand subnets from.
func (s *Server) leaseRange() (string, int) {
	if s.workerRange == "" {
		return state.DefaultWorkerRange, state.DefaultWorkerPrefix
	}
	return s.workerRange, s.workerPrefix
}

// Lease grants or renews a node's subnet. It must run on the leader.
func (s *Server) Lease(req api.LeaseRequest) (api.Lease, error) {
	rng, prefix := s.leaseRange()
	res, err := s.batch.Apply(&state.Command{Op: state.OpLease, At: s.now(), Lease: &state.Lease{Node: req.Node, Address: req.Address, Subnet: req.Subnet}, Range: rng, Prefix: prefix})
	if err != nil {
		return api.Lease{}, err
	}
	if res.Err != "" {
		return api.Lease{}, errors.New(res.Err)
	}
	var r string
	s.r.Read(func(st *state.State) { r = st.Leases.Range })
	return api.Lease{Node: res.Lease.Node, Address: res.Lease.Address, Subnet: res.Lease.Subnet, Range: r, Active: true}, nil
}

// hostAddress checks that an address can be a node's: one its peers can
// route to, outside the worker range.
func (s *Server) hostAddress(a string) error {
	ip := net.ParseIP(a).To4()
	if ip == nil || ip.IsLoopback() || ip.IsUnspecified() || ip.IsMulticast() || ip.IsLinkLocalUnicast() || ip.Equal(net.IPv4bcast) {
		return fmt.Errorf("%s cannot be a node's address: its peers could not route to it", a)
	}
	var rng string
	s.r.Read(func(st *state.State) {
		if st.Leases != nil {
			rng = st.Leases.Range
		}
	})
	if rng == "" {
		rng, _ = s.leaseRange()
	}
	if _, n, err := net.ParseCIDR(rng); err == nil && n.Contains(ip) {
		return fmt.Errorf("%s is in the worker range %s: a node's address must be outside it", a, rng)
	}
	return nil
}

// leaseTable is the table as of now.
func (s *Server) leaseTable() api.LeaseTable {
	now := s.now()
	var t api.LeaseTable
	s.r.Read(func(st *state.State) {
		if st.Leases == nil {
			return
		}
		t.Index, t.Range = st.Leases.Index, st.Leases.Range
		for _, l := range st.LeaseList() {
			t.Leases = append(t.Leases, api.Lease{Node: l.Node, Address: l.Address, Subnet: l.Subnet, Active: l.ActiveAt(now, state.DefaultLeaseTerms)})
		}
	})
	return t
}

func (s *Server) handleLease(w http.ResponseWriter, r *http.Request) {
	var req api.LeaseRequest
	if !decodeBody(w, r, maxSmallBody, &req) {
		return
	}
	if req.Node == "" || len(req.Node) > 64 || net.ParseIP(req.Address).To4() == nil || len(req.Subnet) > 32 {
		writeErr(w, http.StatusBadRequest, errors.New(`body must be {"Node": "<up to 64 bytes>", "Address": "<IPv4 address>", "Subnet": "<CIDR, optional>"}`))
		return
	}
	if !allowed(w, s.mayNode(s.callerOf(r), req.Node)) {
		return
	}
	if err := s.hostAddress(req.Address); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	l, err := s.Lease(req)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("leasing a subnet for %s: %w", req.Node, err))
		return
	}
	writeJSON(w, http.StatusOK, l)
}

func (s *Server) handleReleaseLease(w http.ResponseWriter, r *http.Request) {
	node := r.PathValue("node")
	if node == "" || len(node) > 64 {
		writeErr(w, http.StatusBadRequest, errors.New("a node ID of up to 64 bytes"))
		return
	}
	// The node itself gives its subnet up, or an operator does.
	c := s.callerOf(r)
	if s.tls == nil || c.node != node {
		if !allowed(w, s.mayOperate(c)) {
			return
		}
	}
	if _, err := s.apply(&state.Command{Op: state.OpRelease, At: s.now(), Lease: &state.Lease{Node: node}}); err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, http.StatusOK, map[string]string{"released": node})
}

// handleLeases answers the table, and with ?index= waits (up to ?wait=)
// until it moves past that index.
func (s *Server) handleLeases(w http.ResponseWriter, r *http.Request) {
	if c := s.callerOf(r); s.tls != nil && c.node == "" && !allowed(w, s.mayOperate(c)) {
		return
	}
	q := r.URL.Query()
	var index uint64
	wait := time.Duration(0)
	if v := q.Get("index"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("index must be a number; got %.32q", v))
			return
		}
		index, wait = n, 15*time.Second
		if v := q.Get("wait"); v != "" {
			d, err := time.ParseDuration(v)
			if err != nil || d < 0 {
				writeErr(w, http.StatusBadRequest, fmt.Errorf("wait must be a duration; got %.32q", v))
				return
			}
			wait = min(d, maxLeaseWait)
		}
	}
	ctx, cancel := context.WithTimeout(r.Context(), wait)
	defer cancel()
	for {
		changed := s.r.Changed()
		// Most commands are not about leases: look at the index alone
		// before building the table.
		var cur uint64
		s.r.Read(func(st *state.State) {
			if st.Leases != nil {
				cur = st.Leases.Index
			}
		})
		if index == 0 || cur > index {
			writeJSON(w, http.StatusOK, s.leaseTable())
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			writeJSON(w, http.StatusOK, s.leaseTable())
			return
		}
	}
}
