package devcluster

// Task processes outlive the Nomad agent by design (so an agent restart
// does not kill them). The process that starts a cluster becomes their
// child subreaper: it reaps the ones reparented to it while the cluster
// runs (a restarted agent mistakes a zombie for a live task and waits on
// it for ever) and kills whatever is left when the cluster stops.

import (
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// reap collects the task processes (executors, log collectors, VMs) that
// were reparented to us when an agent or plugin exited. Only zombies
// outside our own process group are reaped: the rest are this program's
// own children, whose exit status belongs to whoever started them; the
// agents are skipped for the same reason.
func (c *Cluster) reap() {
	own := syscall.Getpgrp()
	for {
		select {
		case <-c.stopped:
			return
		case <-time.After(200 * time.Millisecond):
		}
		for _, z := range zombies(os.Getpid()) {
			if z.pgid == own || c.agents.isAgent(z.pid) {
				continue
			}
			var ws syscall.WaitStatus
			syscall.Wait4(z.pid, &ws, syscall.WNOHANG, nil)
		}
	}
}

// killOrphans kills every remaining descendant of this process: as the
// child subreaper, orphaned task executors were reparented to us.
func killOrphans(log hclog.Logger) {
	for attempt := 0; attempt < 50; attempt++ {
		kids := children(os.Getpid())
		if len(kids) == 0 {
			return
		}
		sig := syscall.SIGTERM
		if attempt > 20 {
			sig = syscall.SIGKILL
		}
		for _, pid := range kids {
			log.Debug("stopping orphaned process", "pid", pid, "signal", sig)
			syscall.Kill(pid, sig)
		}
		// Reap the ones that were reparented to us.
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type proc struct{ pid, pgid int }

// children lists the live direct children of pid.
func children(pid int) []int {
	var out []int
	for _, p := range childrenIn(pid, false) {
		out = append(out, p.pid)
	}
	return out
}

// zombies lists the direct children of pid that have exited unreaped.
func zombies(pid int) []proc { return childrenIn(pid, true) }

func childrenIn(pid int, zombie bool) []proc {
	ents, _ := os.ReadDir("/proc")
	var out []proc
	for _, e := range ents {
		child, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// The command name may hold spaces and parens; fields follow the last ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 3 || (f[0] == "Z") != zombie {
			continue
		}
		if ppid, _ := strconv.Atoi(f[1]); ppid == pid {
			pgid, _ := strconv.Atoi(f[2])
			out = append(out, proc{pid: child, pgid: pgid})
		}
	}
	return out
}

// BecomeSubreaper makes this process the reaper of its orphaned
// descendants (task executors and VMs an agent leaves behind), so that
// KillDescendants finds them.
func BecomeSubreaper() error { return unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }

// KillDescendants stops every process this one started or inherited as
// subreaper: for tests that run agents themselves.
func KillDescendants(log hclog.Logger) { killOrphans(log) }
