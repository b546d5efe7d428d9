package e2e

import (
	"context"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/placement"
	"github.com/hashicorp/go-hclog"
	nomadapi "github.com/hashicorp/nomad/api"
)

// TestInventoryFollowsEventStream: the scheduler's copy of Nomad's nodes
// and allocations, kept by the event stream, shows a job Nomad placed
// behind cohort's back taking its CPU and memory, and giving them back
// when it stops, on a real Nomad agent; and the node and allocation lists
// are read once, at the start, not again on each change.
func TestInventoryFollowsEventStream(t *testing.T) {
	c, _ := cluster(t)
	proxy, lists := countingProxy(t, c.NomadAddr(), "/v1/nodes", "/v1/allocations")
	nc, err := nomad.New(nomad.Config{Address: proxy, Token: c.NomadToken()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	logs := &strings.Builder{}
	var logMu sync.Mutex
	go nc.Watch(ctx, hclog.New(&hclog.LoggerOptions{Output: lockedWriter{&logMu, logs}, Level: hclog.Debug}))
	free := func() placement.Node {
		nodes, err := nc.Inventory(nil)
		if err != nil || len(nodes) == 0 {
			return placement.Node{}
		}
		return nodes[0]
	}
	waitFor(t, "a ready node in the inventory", func() bool { return free().ID != "" })
	// Its task drivers, as placement matches them: the dev cluster's
	// nodes run raw_exec, and this one no microvm driver.
	waitFor(t, "the node's raw_exec driver in the inventory", func() bool {
		return strings.Contains(free().Drivers, ",raw_exec,")
	})
	if d := free().Drivers; strings.Contains(d, ",microvm,") {
		t.Errorf("the node's drivers %q name microvm, which this cluster does not load", d)
	}
	before := free()
	// Until the watcher's first read, Inventory reads the lists itself.
	waitFor(t, "the watcher's first read of the lists", func() bool { return nc.AllocIndex("", "none") != 0 })
	listed := lists.Load()

	api, err := nomadapi.NewClient(&nomadapi.Config{Address: c.NomadAddr(), SecretID: c.NomadToken()})
	if err != nil {
		t.Fatal(err)
	}
	job := nomadapi.NewServiceJob("outsider", "outsider", "global", 50)
	job.Datacenters = []string{"*"}
	tg := nomadapi.NewTaskGroup("g", 1)
	task := nomadapi.NewTask("t", "raw_exec").SetConfig("command", "/bin/sleep").SetConfig("args", []string{"600"})
	cpu, mem := 333, 77
	task.Resources = &nomadapi.Resources{CPU: &cpu, MemoryMB: &mem}
	tg.AddTask(task)
	job.AddTaskGroup(tg)
	if _, _, err := api.Jobs().Register(job, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the outside job's allocation taken from the inventory", func() bool {
		n := free()
		return n.CPU == before.CPU-cpu && n.MemoryMB == before.MemoryMB-mem
	})
	if _, _, err := api.Jobs().Deregister("outsider", true, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "its resources given back", func() bool {
		n := free()
		return n.CPU == before.CPU && n.MemoryMB == before.MemoryMB
	})
	if n := lists.Load() - listed; n != 0 {
		logMu.Lock()
		t.Errorf("the node and allocation lists were read %d more times while the job ran and stopped; events should have carried it:\n%s", n, logs)
		logMu.Unlock()
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(b)
}
