package driver

// The driver's half of the start barrier (the server's half and the
// protocol are described in scheduler/server/barrier.go). A task of a job
// carrying cohort's gang meta boots with Assignment.Barrier set: the guest
// init applies its identity and then holds the program. The handle
// reports the boot to the cohort servers and long-polls until the leader
// releases the gang (CmdRelease to the guest) or aborts it (the VM is
// killed and the task fails with the reason). With no server answering,
// the worker gives up after its gang timeout plus a grace period, so a
// lost server never leaves a VM parked forever.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// metaEnv finds a meta key in a task's environment. Nomad hands drivers
// NOMAD_META_<key> as written and upper-cased; the task itself sees the
// dots turned into underscores.
func metaEnv(env map[string]string, key string) string {
	for _, k := range []string{key, strings.ToUpper(key), strings.ReplaceAll(key, ".", "_"), strings.ToUpper(strings.ReplaceAll(key, ".", "_"))} {
		if v, ok := env["NOMAD_META_"+k]; ok {
			return v
		}
	}
	return ""
}

// barrierGrace is how long past its gang timeout a worker still waits for
// a verdict: the server decides at the gang timeout, and may need a leader
// election first.
const barrierGrace = 30 * time.Second

// barrierPoll is how long one report call may wait for the verdict.
const barrierPoll = 30 * time.Second

// gangTask says whether a task belongs to a cohort gang, and its gang
// timeout.
func gangTask(env map[string]string) (bool, time.Duration) {
	v := metaEnv(env, jobspec.MetaGang)
	if v == "" || v == "0" || v == "false" {
		return false, 0
	}
	timeout := jobspec.DefaultGangTimeout
	if d, err := time.ParseDuration(metaEnv(env, jobspec.MetaGangTimeout)); err == nil && d > 0 {
		timeout = d
	}
	return true, timeout
}

// barrier follows the worker through the start barrier. Its instance is
// the task's ID, new at every start of the task and kept across a plugin
// restart, so the server tells a restarted task from a repeated report.
func (h *taskHandle) barrier(servers []string, gangTimeout time.Duration) {
	began := time.Now()
	h.event("Waiting at the start barrier for the whole gang")
	ctx, cancel := context.WithTimeout(h.d.ctx, gangTimeout+barrierGrace)
	defer cancel()
	go func() { // end the reports as soon as the VM is gone
		select {
		case <-h.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	// The worker reports only once its name resolves: every worker's name
	// then resolves, from every worker, before the gang is released.
	if err := h.awaitName(ctx); err != nil {
		if h.d.ctx.Err() != nil || isClosed(h.done) {
			return
		}
		h.abort(err.Error())
		return
	}
	req := api.BarrierRequest{Alloc: h.cfg.AllocID, Instance: instanceOf(h.cfg.ID), Wait: barrierPoll.String(),
		Started: "cold", StartMillis: h.startTook.Milliseconds()}
	if h.snapshot {
		req.Started = "restore"
	}
	if h.lease != nil && h.d.net != nil {
		req.Address = h.lease.IP
	}
	backoff := 100 * time.Millisecond
	for i := 0; ; i++ {
		if h.programStarted() {
			return // released before a restart of the plugin
		}
		server := servers[i%len(servers)]
		v, err := h.d.cohortClient(server).Barrier(ctx, h.cfg.Namespace, h.cfg.JobID, req)
		switch {
		case ctx.Err() != nil:
			if h.d.ctx.Err() != nil || isClosed(h.done) {
				return
			}
			h.abort(fmt.Sprintf("the start barrier was not released within the gang timeout (%s) plus %s; last error: %v", gangTimeout, barrierGrace, err))
			return
		case api.IsStatus(err, 403):
			h.abort("the cohort servers refused this node's boot report: " + err.Error())
			return
		case err != nil:
			h.d.log.Debug("start barrier: server not answering", "server", server, "error", err)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		switch v.Status {
		case api.BarrierRelease:
			rel := &proto.Command{Kind: proto.CmdRelease, Hosts: gangHosts(h.cfg.Env[jobspec.EnvPeers], v.Peers)}
			if err := h.sendStamped(rel, func() { rel.UnixNano = time.Now().UnixNano() }); err != nil {
				h.abort("releasing the worker: " + err.Error())
				return
			}
			h.event(fmt.Sprintf("Released by the start barrier after %d ms", time.Since(began).Milliseconds()))
			return
		case api.BarrierAbort:
			h.abort("the gang did not start: " + v.Reason)
			return
		}
	}
}

// gangHosts names the released gang's workers whose addresses the servers
// know: each peer's name is the one the worker's own COHORT_PEERS gives
// its group and rank.
func gangHosts(peersEnv string, peers []api.BarrierPeer) []proto.Host {
	var groups []jobspec.Peer
	if len(peers) == 0 || json.Unmarshal([]byte(peersEnv), &groups) != nil {
		return nil
	}
	names := map[string][]string{}
	for _, g := range groups {
		names[g.Group] = g.Names
	}
	var hosts []proto.Host
	for _, p := range peers {
		if ns := names[p.Group]; p.Rank >= 0 && p.Rank < len(ns) && net.ParseIP(p.Address) != nil {
			hosts = append(hosts, proto.Host{Name: ns[p.Rank], Address: p.Address})
		}
	}
	return hosts
}

// instanceOf bounds a task ID to what the barrier accepts as an instance.
func instanceOf(taskID string) string {
	if len(taskID) > 64 {
		return taskID[len(taskID)-64:]
	}
	return taskID
}

// abort ends a worker that must not run: the VM is killed and the task
// fails with why.
func (h *taskHandle) abort(why string) {
	h.d.log.Warn("start barrier: worker aborted", "task", h.cfg.Name, "alloc", h.cfg.AllocID, "reason", why)
	h.event("Aborted at the start barrier: " + why)
	h.killFor(why)
}

// killFor ends a worker that must not go on: the VM is killed and the
// task fails with why.
func (h *taskHandle) killFor(why string) {
	h.mu.Lock()
	h.abortReason = why
	h.mu.Unlock()
	h.killWith(int(unix.SIGKILL))
}

func (h *taskHandle) event(msg string) {
	h.d.eventer.EmitEvent(&drivers.TaskEvent{
		TaskID: h.cfg.ID, AllocID: h.cfg.AllocID, TaskName: h.cfg.Name, Timestamp: time.Now(), Message: msg,
	})
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// awaitName waits until the worker's name, w<rank>.<address>.service.consul,
// resolves to its address through the node's Consul, when the worker has
// both a name and a network.
func (h *taskHandle) awaitName(ctx context.Context) error {
	rank, address := h.cfg.Env[jobspec.EnvRank], h.cfg.Env[jobspec.EnvAddress]
	if h.lease == nil || h.d.net == nil || rank == "" || address == "" {
		return nil
	}
	name := fmt.Sprintf("w%s.%s.service.consul.", rank, address)
	began := time.Now()
	for {
		ok, err := resolvesTo(consulDNS(h.d.net.cfg), name, h.lease.IP)
		if ok {
			h.d.log.Debug("worker name resolves", "name", name, "after", time.Since(began))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the worker's name %s did not resolve to %s in time (last: %v)", name, h.lease.IP, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// resolvesTo asks the DNS server at server whether name has the A record
// ip.
func resolvesTo(server, name, ip string) (bool, error) {
	m := new(dns.Msg)
	m.SetQuestion(name, dns.TypeA)
	c := &dns.Client{Timeout: time.Second}
	r, _, err := c.Exchange(m, server)
	if err != nil {
		return false, err
	}
	for _, rr := range r.Answer {
		if a, ok := rr.(*dns.A); ok && a.A.String() == ip {
			return true, nil
		}
	}
	return false, fmt.Errorf("%s: %d answers, none %s", name, len(r.Answer), ip)
}
