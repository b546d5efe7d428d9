package command

import (
	"fmt"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/jobspec"
)

// RunCommand submits a cluster job to the cohort server.
type RunCommand struct{ Meta }

const runHelp = `
Usage: cohort run [options] <file.hcl>

  Submits a cluster job to the gang scheduler and follows it: the gang goes
  queued, reserved, running, and how it ended; each worker goes queued,
  reserved (its node), booted (waiting at the start barrier), running, and
  its exit code. Exits 0 when every worker exited successfully, 1 when the
  job failed, was rejected or was stopped.

Options:
` + metaHelp + jsonHelp + `
  -detach           Return once the job is accepted.
`

func (c *RunCommand) Help() string     { return runHelp }
func (c *RunCommand) Synopsis() string { return "Run a cluster job" }

func (c *RunCommand) Run(args []string) int {
	fs := c.FlagSet("run", true)
	detach := fs.Bool("detach", false, "")
	if ok, code := parse(c.UI, fs, args, 1, runHelp); !ok {
		return code
	}
	job, err := jobspec.ParseFile(fs.Arg(0))
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	nj := jobspec.ToNomad(job)
	if ns := c.Namespace(); ns != "" {
		nj.Namespace = &ns
	}
	client := c.Client()
	sub, err := client.Submit(nj)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error submitting %s: %v", job.Name, err))
		return ExitError
	}
	if !c.json {
		for _, w := range sub.Warnings {
			c.UI.Warn("Warning: " + w)
		}
	}
	v := sub.JobView
	if *detach {
		if c.json {
			printJSON(c.UI, sub)
		} else {
			c.UI.Output(fmt.Sprintf("gang %s: accepted (%d workers)", v.ID, v.Workers))
		}
		return ExitOK
	}
	start := time.Now()
	last := ""
	workers := map[string]string{}
	if w, err := client.Job(v.Namespace, v.ID, true); err == nil { // each worker's first state
		v = w
	}
	for {
		since := time.Since(start).Seconds()
		line := progress(&v)
		if line != last {
			if !c.json {
				c.UI.Output(fmt.Sprintf("gang %s: %s (t+%.1f s)", v.ID, line, since))
			}
			last = line
		}
		for _, w := range v.WorkerStates {
			st := workerState(w)
			if workers[w.Name] != st && !c.json {
				c.UI.Output(fmt.Sprintf("  %-16s %-10s %s(t+%.1f s)", w.Name, st, nodeNote(w.Node), since))
			}
			workers[w.Name] = st
		}
		if v.Ended() {
			break
		}
		time.Sleep(100 * time.Millisecond)
		next, err := client.Job(v.Namespace, v.ID, true)
		if err != nil {
			c.UI.Error(fmt.Sprintf("Error following %s: %v", v.ID, err))
			return ExitError
		}
		v = next
	}
	if c.json {
		printJSON(c.UI, v)
	}
	if v.Status == api.StatusFinished && v.Reason == api.ReasonExited {
		for _, w := range v.WorkerStates {
			if w.ExitCode != nil && *w.ExitCode != 0 {
				return ExitError
			}
		}
		return ExitOK
	}
	return ExitError
}

// workerState is one worker's progress word: queued, reserved, booted,
// running, or its exit code.
func workerState(w api.WorkerView) string {
	if w.ExitCode != nil {
		return fmt.Sprintf("exit %d", *w.ExitCode)
	}
	return w.State
}

func nodeNote(node string) string {
	if len(node) > 8 {
		node = node[:8]
	}
	if node == "" {
		return ""
	}
	return "on " + node + " "
}

func progress(v *api.JobView) string {
	switch v.Status {
	case api.StatusReserved:
		return fmt.Sprintf("reserved %d workers on %d nodes", v.Workers, v.Nodes)
	case api.StatusRunning:
		return fmt.Sprintf("running %d workers until %s", v.Workers, v.Deadline.Format(time.TimeOnly))
	case api.StatusFinished, api.StatusFailed:
		return fmt.Sprintf("%s: %s", v.Status, v.Reason)
	case api.StatusQueued:
		why := strings.Join(nonEmpty(v.Reason, v.Waiting), "; ")
		if why != "" {
			return "queued (" + why + ")"
		}
	}
	return v.Status
}

// StatusCommand shows jobs.
type StatusCommand struct{ Meta }

const statusHelp = `
Usage: cohort status [options] [job]

  Lists the cluster jobs, or shows one.

Options:
` + metaHelp + jsonHelp + `
`

func (c *StatusCommand) Help() string     { return statusHelp }
func (c *StatusCommand) Synopsis() string { return "Show cluster jobs" }

func (c *StatusCommand) Run(args []string) int {
	fs := c.FlagSet("status", true)
	if err := fs.Parse(args); err != nil || fs.NArg() > 1 {
		c.UI.Error(strings.TrimSpace(statusHelp))
		return ExitUsage
	}
	client := c.Client()
	if fs.NArg() == 1 {
		v, err := client.Job(c.Namespace(), fs.Arg(0), false)
		if err != nil {
			c.UI.Error(err.Error())
			return ExitError
		}
		if c.json {
			printJSON(c.UI, v)
		} else {
			c.UI.Output(fmt.Sprintf("%s: %s", v.ID, progress(&v)))
		}
		return ExitOK
	}
	vs, err := client.Jobs()
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if c.json {
		printJSON(c.UI, vs)
		return ExitOK
	}
	for i := range vs {
		id := vs[i].ID
		if vs[i].Namespace != "" && vs[i].Namespace != api.DefaultNamespace {
			id = vs[i].Namespace + "/" + id
		}
		c.UI.Output(fmt.Sprintf("%-24s %-9s %3d workers  %s", id, vs[i].Status, vs[i].Workers, vs[i].Reason))
	}
	return ExitOK
}

// BillCommand prints a job's bill.
type BillCommand struct{ Meta }

const billHelp = `
Usage: cohort bill [options] <job>

  Prints a job's ledger: one line per worker with the milliseconds it was
  billed for, what it reserved, and the amount; then the total. A worker
  is billed from the moment its whole gang ran until its own end. A
  running job's bill is open and ends now.

Options:
` + metaHelp + jsonHelp + `
  -run=<n>          Bill run n of a job run several times. Default: the
                    latest run.
`

func (c *BillCommand) Help() string     { return billHelp }
func (c *BillCommand) Synopsis() string { return "Show what a job costs, per worker" }

func (c *BillCommand) Run(args []string) int {
	fs := c.FlagSet("bill", true)
	run := fs.Int("run", 0, "")
	if ok, code := parse(c.UI, fs, args, 1, billHelp); !ok {
		return code
	}
	b, err := c.Client().Bill(c.Namespace(), fs.Arg(0), *run)
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if c.json {
		printJSON(c.UI, b)
		return ExitOK
	}
	for _, l := range b.Lines {
		c.UI.Output(fmt.Sprintf("%s[%d] on %s: %d ms × %d MHz, %d MiB%s = %.6f %s",
			l.Group, l.Index, l.Node, l.EndMs-l.StartMs, l.CPU, l.MemoryMB, deviceList(l.Devices), l.Amount, b.Currency))
	}
	open := ""
	if b.Open {
		open = " (running: so far)"
	}
	runNote := ""
	if b.Run > 1 {
		runNote = fmt.Sprintf(" (run %d)", b.Run)
	}
	c.UI.Output(fmt.Sprintf("total %s%s: %.6f %s%s", b.Job, runNote, b.Total, b.Currency, open))
	return ExitOK
}

func deviceList(ds map[string]int) string {
	out := ""
	for _, d := range sortedKeys(ds) {
		out += fmt.Sprintf(", %d× %s", ds[d], d)
	}
	return out
}

// StopCommand stops a job.
type StopCommand struct{ Meta }

const stopHelp = `
Usage: cohort stop [options] <job>

  Stops a cluster job at whatever stage it is (queued, reserved, booting
  or running): its Nomad job is deregistered, its reservation freed and
  its bill closed.

Options:
` + metaHelp + `
`

func (c *StopCommand) Help() string     { return stopHelp }
func (c *StopCommand) Synopsis() string { return "Stop a cluster job" }

func (c *StopCommand) Run(args []string) int {
	fs := c.FlagSet("stop", false)
	if ok, code := parse(c.UI, fs, args, 1, stopHelp); !ok {
		return code
	}
	if err := c.Client().Stop(c.Namespace(), fs.Arg(0)); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	c.UI.Output("stopped " + fs.Arg(0))
	return ExitOK
}

// QueueCommand lists queued jobs in the order they will be considered.
type QueueCommand struct{ Meta }

const queueHelp = `
Usage: cohort queue [options]

  Lists the queued cluster jobs in scheduling order: priority, then
  submission. A job waiting behind the head may still start first by
  backfill when it cannot delay the head.

Options:
` + metaHelp + jsonHelp + `
`

func (c *QueueCommand) Help() string     { return queueHelp }
func (c *QueueCommand) Synopsis() string { return "List queued cluster jobs" }

func (c *QueueCommand) Run(args []string) int {
	fs := c.FlagSet("queue", true)
	if ok, code := parse(c.UI, fs, args, 0, queueHelp); !ok {
		return code
	}
	vs, err := c.Client().Queue()
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if c.json {
		printJSON(c.UI, vs)
		return ExitOK
	}
	for i, v := range vs {
		c.UI.Output(fmt.Sprintf("%3d. %-24s priority %3d  %3d workers  %s", i+1, v.ID, v.Priority, v.Workers, strings.Join(nonEmpty(v.Reason, v.Waiting), "; ")))
	}
	return ExitOK
}

func nonEmpty(ss ...string) []string {
	var out []string
	for _, s := range ss {
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}
