package devcluster

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
)

// agent is one running Consul or Nomad agent.
type agent struct {
	name string // e.g. "nomad-n1"
	log  string // its log file
	cmd  *exec.Cmd
	done chan struct{}
}

// agents are the cluster's agents.
type agents struct {
	mu  sync.Mutex
	all []*agent
	dir string
	log hclog.Logger
}

func (as *agents) isAgent(pid int) bool {
	as.mu.Lock()
	defer as.mu.Unlock()
	for _, a := range as.all {
		if a.cmd.Process != nil && a.cmd.Process.Pid == pid {
			return true
		}
	}
	return false
}

// spawn starts an agent, inside the network namespace netns when it is
// set, with its output in <dir>/<name>.log.
func (as *agents) spawn(name, netns, bin string, args ...string) (*agent, error) {
	if bin == "" {
		return nil, fmt.Errorf("no binary configured for %s", name)
	}
	path := filepath.Join(as.dir, name+".log")
	logf, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening %s log: %w", name, err)
	}
	cmd := exec.Command(bin, args...)
	if netns != "" {
		// ip netns exec enters the namespace and execs the agent: the
		// process is the agent itself.
		cmd = exec.Command("ip", append([]string{"netns", "exec", netns, bin}, args...)...)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// Its own process group, so a Ctrl-C at the terminal reaches only us and
	// we stop the agents in order.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	a := &agent{name: name, log: path, cmd: cmd, done: make(chan struct{})}
	as.mu.Lock()
	as.all = append(as.all, a)
	as.mu.Unlock()
	go func() {
		cmd.Wait()
		logf.Close()
		close(a.done)
	}()
	as.log.Info("started agent", "name", name, "pid", cmd.Process.Pid, "log", path)
	return a, nil
}

// waitFor polls ready until it succeeds, the agent exits, or a minute
// passes.
func (a *agent) waitFor(ctx context.Context, what string, ready func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	var lastErr error
	for {
		ok, err := ready()
		if ok {
			return nil
		}
		lastErr = err
		select {
		case <-a.done:
			return fmt.Errorf("waiting for %s: %s exited (%v); the end of %s:\n%s", what, a.name, a.cmd.ProcessState, a.log, tail(a.log, 8))
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w (last error: %v); see %s", what, ctx.Err(), lastErr, a.log)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop stops an agent as an operator would (SIGINT), and kills it if it
// has not exited after 15 s. A Nomad client restarted over live tasks
// sometimes never finishes its shutdown; that is Nomad's, not a leak of
// ours (Stop still kills every task process and checks nothing is left),
// so it is logged with a goroutine dump in the agent's log, not returned
// as an error.
func (a *agent) stop(log hclog.Logger) {
	a.cmd.Process.Signal(os.Interrupt)
	select {
	case <-a.done:
		return
	case <-time.After(15 * time.Second):
	}
	a.cmd.Process.Signal(syscall.SIGQUIT) // Go agents dump their goroutines
	select {
	case <-a.done:
	case <-time.After(2 * time.Second):
		a.cmd.Process.Kill()
		<-a.done
	}
	log.Warn("agent did not stop within 15s of SIGINT and was killed; its goroutines are in its log", "agent", a.name, "log", a.log)
}

// tail is the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
