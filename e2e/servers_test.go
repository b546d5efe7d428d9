package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/devcluster"
)

// TestNomadEndpoint: with NOMAD_ADDR at cohort's Nomad-compatible
// endpoint, `nomad job run` of a gang goes through gang admission (and its
// monitor ends cleanly); other jobs, job status and the UI pass through to
// Nomad; an impossible gang is refused with the reason.
func TestNomadEndpoint(t *testing.T) {
	c, _ := cluster(t)
	listen := freeAddr(t)
	api := cohortServerAt(t, c, freePort(t), "-nomad-listen", listen)
	endpoint := "http://" + listen
	nomad, _ := devcluster.FindBinary("nomad")
	dir := t.TempDir()
	viaCohort := func(wantOK bool, args ...string) string {
		t.Helper()
		cmd := exec.Command(nomad, args...)
		cmd.Env = append(os.Environ(), "NOMAD_ADDR="+endpoint)
		out, err := cmd.CombinedOutput()
		if (err == nil) != wantOK {
			t.Fatalf("nomad %s via cohort: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	plan := func(name, spec string) string {
		src := filepath.Join(dir, name+".hcl")
		writeFile(t, src, spec)
		out := run(t, c, cohortBin, "plan", src)
		dst := filepath.Join(dir, name+".nomad.hcl")
		writeFile(t, dst, out)
		return dst
	}

	out := viaCohort(true, "job", "run", plan("viaendpoint", sleepGang("viaendpoint", 2, 64, "1m", 1)))
	if !strings.Contains(out, "admitted for gang scheduling") {
		t.Errorf("nomad job run output does not say the gang was admitted:\n%s", out)
	}
	v := waitStatus(t, api, "viaendpoint", "finished")
	if v.Reason != "every worker exited" || v.Workers != 2 {
		t.Errorf("gang: %+v", v)
	}
	if out := viaCohort(true, "job", "status", "viaendpoint"); !strings.Contains(out, "viaendpoint") {
		t.Errorf("nomad job status through the endpoint:\n%s", out)
	}

	// A job without gang meta goes to Nomad as it is.
	plain := filepath.Join(dir, "plain.nomad.hcl")
	writeFile(t, plain, `job "plain" {
  type = "batch"
  group "g" {
    task "t" {
      driver = "raw_exec"
      config { command = "/bin/true" }
      resources {
        cpu    = 20
        memory = 32
      }
    }
  }
}
`)
	viaCohort(true, "job", "run", "-detach", plain)
	var nj struct{ ID string }
	getJSON(t, c.NomadAddr()+"/v1/job/plain", &nj)
	if resp, err := http.Get(api + "/v1/job/plain"); err != nil || resp.StatusCode != 404 {
		t.Errorf("a job without gang meta went through cohort: %v %v", err, resp)
	}

	// An impossible gang is refused, saying why.
	out = viaCohort(false, "job", "run", plan("huge", sleepGang("huge", 2, 10_000_000, "1m", 1)))
	if !strings.Contains(out, "cannot fit") {
		t.Errorf("impossible gang refusal:\n%s", out)
	}

	// The UI is served through the endpoint.
	resp, err := http.Get(endpoint + "/ui/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.Contains(string(body), "nomad-ui") {
		t.Errorf("UI through the endpoint: %s %.200s", resp.Status, body)
	}
}

type serverProc struct {
	id, http, raft, data string
	cmd                  *exec.Cmd
	log                  string
}

func (s *serverProc) start(t *testing.T, c *devcluster.Cluster, join []string) {
	t.Helper()
	args := []string{"server", "-node-id", s.id, "-data-dir", s.data, "-http-addr", s.http, "-raft-addr", s.raft,
		"-bootstrap-expect", "3", "-nomad-addr", c.NomadAddr(),
		// One host: the LAN timeouts, as cohort dev uses.
		"-raft-heartbeat-timeout", "300ms", "-raft-election-timeout", "300ms", "-raft-leader-lease-timeout", "150ms"}
	for _, j := range join {
		args = append(args, "-join", j)
	}
	args = append(args, serverTLSArgs(c)...)
	s.cmd = exec.Command(cohortBin, args...)
	f, err := os.OpenFile(s.log, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stdout, s.cmd.Stderr = f, f
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
}

type member struct {
	ID, HTTPAddr string
	Voter        bool
	Leader       bool
}

func members(t *testing.T, addr string) ([]member, error) {
	t.Helper()
	out, err := cohortCmd("server", "members", "-json", "-address", scheme()+addr).CombinedOutput()
	if err != nil {
		return nil, err
	}
	var ms []member
	return ms, json.Unmarshal(out, &ms)
}

// TestServerGroup: three `cohort server` processes form a Raft group with
// -bootstrap-expect/-join; `cohort server members` lists them; a job sent
// to a follower is forwarded to the leader; with the leader killed the
// survivors elect another and keep scheduling; the killed server comes
// back with its data and catches up.
func TestServerGroup(t *testing.T) {
	c := startCluster(t, clusterOpts{tls: true})
	secure(t, c, "")
	dir := t.TempDir()
	servers := make([]*serverProc, 3)
	for i := range servers {
		id := string(rune('a' + i))
		// On the cluster's server address: the nodes' barrier tasks
		// report there.
		servers[i] = &serverProc{id: "s" + id, http: fmt.Sprintf("%s:%d", c.ServerIP(), freePort(t)), raft: fmt.Sprintf("%s:%d", c.ServerIP(), freePort(t)),
			data: filepath.Join(dir, id), log: filepath.Join(dir, id+".log")}
	}
	for i, s := range servers {
		var join []string
		for j, o := range servers {
			if j != i {
				join = append(join, o.http)
			}
		}
		s.start(t, c, join)
	}
	t.Cleanup(func() {
		for _, s := range servers {
			if s.cmd.ProcessState == nil {
				s.cmd.Process.Signal(syscall.SIGTERM)
				s.cmd.Wait()
			}
			if t.Failed() {
				b, _ := os.ReadFile(s.log)
				t.Logf("server %s log:\n%s", s.id, b)
			}
		}
	})

	leaderOf := func(via *serverProc) (leader *serverProc, follower *serverProc) {
		ms, err := members(t, via.http)
		if err != nil {
			return nil, nil
		}
		var lid string
		for _, m := range ms {
			if m.Leader && m.HTTPAddr != "" {
				lid = m.ID
			}
		}
		for _, s := range servers {
			if s.id == lid {
				leader = s
			} else if s.cmd.ProcessState == nil && follower == nil {
				follower = s
			}
		}
		return leader, follower
	}
	var leader, follower *serverProc
	waitFor(t, "three servers with a leader", func() bool {
		ms, err := members(t, servers[0].http)
		if err != nil || len(ms) != 3 {
			return false
		}
		leader, follower = leaderOf(servers[0])
		return leader != nil
	})
	out, err := cohortCmd("server", "members", "-address", scheme()+follower.http).CombinedOutput()
	if err != nil {
		t.Fatalf("cohort server members: %v\n%s", err, out)
	}
	t.Logf("cohort server members:\n%s", out)
	refuseOutsiders(t, leader, follower, servers)

	// A job sent to a follower runs: the follower forwards it.
	cohortRun(t, scheme()+follower.http, sleepGang("first", 2, 64, "1m", 1))
	waitStatus(t, scheme()+leader.http, "first", "finished")

	// A running gang's deadline survives the leader: the new leader stops
	// it at its max_runtime.
	cohortRun(t, scheme()+follower.http, sleepGang("deadline", 2, 64, "4s", 60))
	waitStatus(t, scheme()+leader.http, "deadline", "running")

	// Kill the leader; the others elect a new one and go on.
	killedAt := time.Now()
	leader.cmd.Process.Kill()
	leader.cmd.Wait()
	old := leader
	var survivor *serverProc
	for _, s := range servers {
		if s != old {
			survivor = s
			break
		}
	}
	waitFor(t, "a new leader", func() bool {
		leader, follower = leaderOf(survivor)
		return leader != nil && leader != old
	})
	t.Logf("new leader %s after %s", leader.id, time.Since(killedAt).Round(time.Millisecond))
	v := waitStatus(t, scheme()+leader.http, "deadline", "finished")
	var late int
	if _, err := fmt.Sscanf(v.Reason, "max_runtime reached (stopped %d ms after the deadline)", &late); err != nil {
		t.Fatalf("deadline gang ended: %q", v.Reason)
	}
	t.Logf("the new leader stopped the gang %d ms after its max_runtime (ran %s)", late, v.EndedAt.Sub(v.StartedAt))
	if late > 1000 {
		t.Errorf("the deadline was enforced %d ms late across a leader change", late)
	}
	cohortRun(t, scheme()+follower.http, sleepGang("second", 2, 64, "1m", 1))
	waitStatus(t, scheme()+leader.http, "second", "finished")

	// The killed server restarts on its data and catches up.
	old.start(t, c, nil)
	waitFor(t, "restarted server has both jobs", func() bool {
		jobs, err := client(scheme() + old.http).Jobs()
		if err != nil {
			return false
		}
		done := 0
		for _, j := range jobs {
			if (j.ID == "first" || j.ID == "second") && j.Status == "finished" {
				done++
			}
		}
		return done == 2
	})
	// The group is the same three after the restart.
	if ms, err := members(t, old.http); err != nil || len(ms) != 3 {
		t.Errorf("members after the restart: %v %+v", err, ms)
	}
	operateGroup(t, servers, leaderOf)
}

// operateGroup does what docs/operating.md says, through a follower (which
// forwards to the leader): a back-up saved and restored with the CLI, and
// a server taken out of the group for good.
func operateGroup(t *testing.T, servers []*serverProc, leaderOf func(*serverProc) (*serverProc, *serverProc)) {
	t.Helper()
	var leader, follower *serverProc
	waitFor(t, "a leader", func() bool {
		leader, follower = leaderOf(servers[0])
		return leader != nil && follower != nil
	})
	snap := filepath.Join(t.TempDir(), "group.snap")
	if out, err := cohortCmd("operator", "snapshot", "save", "-address", scheme()+follower.http, snap).CombinedOutput(); err != nil {
		t.Fatalf("snapshot save: %v\n%s", err, out)
	} else {
		t.Logf("%s", out)
	}
	cohortRun(t, scheme()+follower.http, sleepGang("after-save", 1, 64, "1m", 1))
	waitStatus(t, scheme()+leader.http, "after-save", "finished")
	if out, err := cohortCmd("operator", "snapshot", "restore", "-address", scheme()+follower.http, snap).CombinedOutput(); err != nil {
		t.Fatalf("snapshot restore: %v\n%s", err, out)
	}
	// Every server forgets the job accepted after the save and keeps the
	// ones before it.
	for _, s := range servers {
		waitFor(t, s.id+" holds the restored state", func() bool {
			jobs, err := client(scheme() + s.http).Jobs()
			if err != nil {
				return false
			}
			ids := map[string]bool{}
			for _, j := range jobs {
				ids[j.ID] = true
			}
			return ids["first"] && ids["second"] && !ids["after-save"]
		})
	}

	// A follower that will not come back, removed with the CLI.
	gone := follower
	gone.cmd.Process.Kill()
	gone.cmd.Wait()
	waitFor(t, "a leader without "+gone.id, func() bool {
		for _, s := range servers {
			if s != gone {
				leader, _ = leaderOf(s)
				return leader != nil && leader != gone
			}
		}
		return false
	})
	if out, err := cohortCmd("operator", "raft", "remove-peer", "-address", scheme()+leader.http, gone.id).CombinedOutput(); err != nil {
		t.Fatalf("remove-peer %s: %v\n%s", gone.id, err, out)
	}
	if ms, err := members(t, leader.http); err != nil || len(ms) != 2 {
		t.Fatalf("members after removing %s: %v %+v", gone.id, err, ms)
	}
	if out, err := cohortCmd("operator", "raft", "remove-peer", "-address", scheme()+leader.http, gone.id).CombinedOutput(); err == nil || !strings.Contains(string(out), "no server") {
		t.Errorf("removing %s again: %v %s", gone.id, err, out)
	}
	cohortRun(t, scheme()+leader.http, sleepGang("two-left", 1, 64, "1m", 1))
	waitStatus(t, scheme()+leader.http, "two-left", "finished")
}

// refuseOutsiders: a join or a member registration without a server
// certificate, sent to the leader or to a follower (which forwards it), is
// refused with 403 and leaves the group and its leader as they were; a
// plain TCP connection to a Raft port gets nothing back.
func refuseOutsiders(t *testing.T, leader, follower *serverProc, servers []*serverProc) {
	t.Helper()
	bogus := `{"ID":"x","RaftAddr":"127.0.0.1:9","HTTPAddr":"https://127.0.0.1:9"}`
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: sec.tls}, Timeout: 10 * time.Second}
	for _, s := range []*serverProc{leader, follower} {
		for _, path := range []string{"/v1/members/join", "/v1/members/register"} {
			resp, err := hc.Post("https://"+s.http+path, "application/json", strings.NewReader(bogus))
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 403 {
				t.Errorf("%s to %s without a certificate: %s %s", path, s.id, resp.Status, b)
			}
		}
	}
	ms, err := members(t, follower.http)
	if err != nil || len(ms) != 3 {
		t.Fatalf("members after the refused joins: %v %+v", err, ms)
	}
	for _, m := range ms {
		if m.Leader && m.ID != leader.id {
			t.Errorf("the leader changed to %s", m.ID)
		}
	}
	for _, s := range servers {
		conn, err := net.DialTimeout("tcp", s.raft, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		conn.SetDeadline(time.Now().Add(15 * time.Second))
		conn.Write([]byte{0, 0x83, 0xa4, 'T', 'e', 'r', 'm', 1})
		b, err := io.ReadAll(conn) // the TLS handshake fails: closed
		conn.Close()
		if len(b) != 0 || err != nil {
			t.Errorf("plain TCP to %s's raft port: %d bytes back, %v; want it closed at once", s.id, len(b), err)
		}
	}
}
