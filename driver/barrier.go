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
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/hashicorp/nomad/plugins/drivers"
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

type barrierVerdict struct {
	Status string
	Reason string
}

// barrier follows the worker through the start barrier.
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
	body, _ := json.Marshal(map[string]string{"Alloc": h.cfg.AllocID, "Wait": barrierPoll.String()})
	backoff := 100 * time.Millisecond
	for i := 0; ; i++ {
		if h.programStarted() {
			return // released before a restart of the plugin
		}
		base := strings.TrimRight(servers[i%len(servers)], "/")
		v, err := reportBoot(ctx, base+"/v1/barrier/"+url.PathEscape(h.cfg.JobID), body)
		switch {
		case ctx.Err() != nil:
			if h.d.ctx.Err() != nil || isClosed(h.done) {
				return
			}
			h.abort(fmt.Sprintf("the start barrier was not released within the gang timeout (%s) plus %s; last error: %v", gangTimeout, barrierGrace, err))
			return
		case err != nil:
			h.d.log.Debug("start barrier: server not answering", "server", base, "error", err)
			select {
			case <-ctx.Done():
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		switch v.Status {
		case "release":
			if err := h.send(&proto.Command{Kind: proto.CmdRelease}); err != nil {
				h.abort("releasing the worker: " + err.Error())
				return
			}
			h.event(fmt.Sprintf("Released by the start barrier after %d ms", time.Since(began).Milliseconds()))
			return
		case "abort":
			h.abort("the gang did not start: " + v.Reason)
			return
		}
	}
}

func reportBoot(ctx context.Context, endpoint string, body []byte) (*barrierVerdict, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := barrierClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		json.NewDecoder(resp.Body).Decode(&e)
		return nil, fmt.Errorf("%s: %s", resp.Status, e.Error)
	}
	var v barrierVerdict
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		return nil, err
	}
	return &v, nil
}

var barrierClient = &http.Client{Timeout: barrierPoll + 10*time.Second}

// abort ends a worker that must not run: the VM is killed and the task
// fails with why.
func (h *taskHandle) abort(why string) {
	h.d.log.Warn("start barrier: worker aborted", "task", h.cfg.Name, "alloc", h.cfg.AllocID, "reason", why)
	h.mu.Lock()
	h.abortReason = why
	h.mu.Unlock()
	h.event("Aborted at the start barrier: " + why)
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
