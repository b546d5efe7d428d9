package command

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/billing"
	"github.com/cohort-dev/cohort/scheduler/server"
	"github.com/mitchellh/cli"
)

// RunCommand submits a cluster job to the cohort server.
type RunCommand struct{ UI cli.Ui }

const runHelp = `
Usage: cohort run [options] <file.hcl>

  Submits a cluster job to the gang scheduler and follows it: the gang goes
  queued, reserved, running, and how it ended; each worker goes queued,
  reserved (its node), booted (waiting at the start barrier), running, and
  its exit code. Exits 0 when every worker exited
  successfully, 1 when the job failed, was rejected or was stopped.

Options:

  -address=<url>  cohort server API. Default: $COHORT_ADDR or
                  http://127.0.0.1:4747.
  -detach         Return once the job is accepted.
  -json           Print the final job state as JSON.
`

func (c *RunCommand) Help() string     { return runHelp }
func (c *RunCommand) Synopsis() string { return "Run a cluster job" }

func address(flagVal string) string {
	if flagVal != "" {
		return strings.TrimRight(flagVal, "/")
	}
	if v := os.Getenv("COHORT_ADDR"); v != "" {
		return strings.TrimRight(v, "/")
	}
	return "http://127.0.0.1:4747"
}

func (c *RunCommand) Run(args []string) int {
	fs := flagSet("run")
	addr := fs.String("address", "", "")
	detach := fs.Bool("detach", false, "")
	asJSON := fs.Bool("json", false, "")
	if ok, code := parse(c.UI, fs, args, 1, runHelp); !ok {
		return code
	}
	job, err := jobspec.ParseFile(fs.Arg(0))
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	body, _ := json.Marshal(map[string]any{"Job": jobspec.ToNomad(job)})
	base := address(*addr)
	var v server.JobView
	if err := call(http.MethodPost, base+"/v1/jobs", body, &v); err != nil {
		c.UI.Error(fmt.Sprintf("Error submitting %s: %v", job.Name, err))
		return ExitError
	}
	if *detach {
		if *asJSON {
			printJSON(c.UI, v)
		} else {
			c.UI.Output(fmt.Sprintf("gang %s: accepted (%d workers)", v.ID, v.Workers))
		}
		return ExitOK
	}
	start := time.Now()
	last := ""
	workers := map[string]string{}
	call(http.MethodGet, base+"/v1/job/"+v.ID+"?workers=1", nil, &v) // each worker's first state
	for {
		since := time.Since(start).Seconds()
		line := progress(&v)
		if line != last {
			if !*asJSON {
				c.UI.Output(fmt.Sprintf("gang %s: %s (t+%.1f s)", v.ID, line, since))
			}
			last = line
		}
		for _, w := range v.WorkerStates {
			st := workerState(w)
			if workers[w.Name] != st && !*asJSON {
				c.UI.Output(fmt.Sprintf("  %-16s %-10s %s(t+%.1f s)", w.Name, st, nodeNote(w.Node), since))
			}
			workers[w.Name] = st
		}
		if v.Status == "finished" || v.Status == "failed" {
			break
		}
		time.Sleep(100 * time.Millisecond)
		if err := call(http.MethodGet, base+"/v1/job/"+v.ID+"?workers=1", nil, &v); err != nil {
			c.UI.Error(fmt.Sprintf("Error following %s: %v", v.ID, err))
			return ExitError
		}
	}
	if *asJSON {
		printJSON(c.UI, v)
	}
	if v.Status == "finished" && v.Reason == "every worker exited" {
		return ExitOK
	}
	return ExitError
}

// workerState is one worker's progress word: queued, reserved, booted,
// running, or its exit code.
func workerState(w server.WorkerView) string {
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

func progress(v *server.JobView) string {
	switch v.Status {
	case "reserved":
		return fmt.Sprintf("reserved %d workers on %d nodes", v.Workers, v.Nodes)
	case "running":
		return fmt.Sprintf("running %d workers until %s", v.Workers, v.Deadline.Format(time.TimeOnly))
	case "finished", "failed":
		return fmt.Sprintf("%s: %s", v.Status, v.Reason)
	case "queued":
		if v.Reason != "" {
			return "queued (" + v.Reason + ")"
		}
	}
	return string(v.Status)
}

// call does one API request and decodes the answer or its error.
func call(method, url string, body []byte, out any) error {
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s", e.Error)
		}
		return fmt.Errorf("%s: %s", resp.Status, strings.TrimSpace(string(b)))
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// StatusCommand shows jobs.
type StatusCommand struct{ UI cli.Ui }

const statusHelp = `
Usage: cohort status [options] [job]

  Lists the cluster jobs, or shows one.

Options:

  -address=<url>  cohort server API. Default: $COHORT_ADDR or
                  http://127.0.0.1:4747.
  -json           Print JSON.
`

func (c *StatusCommand) Help() string     { return statusHelp }
func (c *StatusCommand) Synopsis() string { return "Show cluster jobs" }

func (c *StatusCommand) Run(args []string) int {
	fs := flagSet("status")
	addr := fs.String("address", "", "")
	asJSON := fs.Bool("json", false, "")
	if err := fs.Parse(args); err != nil || fs.NArg() > 1 {
		c.UI.Error(strings.TrimSpace(statusHelp))
		return ExitUsage
	}
	base := address(*addr)
	if fs.NArg() == 1 {
		var v server.JobView
		if err := call(http.MethodGet, base+"/v1/job/"+fs.Arg(0), nil, &v); err != nil {
			c.UI.Error(err.Error())
			return ExitError
		}
		if *asJSON {
			printJSON(c.UI, v)
		} else {
			c.UI.Output(fmt.Sprintf("%s: %s", v.ID, progress(&v)))
		}
		return ExitOK
	}
	var vs []server.JobView
	if err := call(http.MethodGet, base+"/v1/jobs", nil, &vs); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if *asJSON {
		printJSON(c.UI, vs)
		return ExitOK
	}
	for i := range vs {
		c.UI.Output(fmt.Sprintf("%-24s %-9s %3d workers  %s", vs[i].ID, vs[i].Status, vs[i].Workers, vs[i].Reason))
	}
	return ExitOK
}

// BillCommand prints a job's bill.
type BillCommand struct{ UI cli.Ui }

const billHelp = `
Usage: cohort bill [options] <job>

  Prints a job's ledger: one line per worker with the milliseconds it was
  billed for, what it reserved, and the amount; then the total. A running
  job's bill is open and ends now.

Options:

  -address=<url>  cohort server API. Default: $COHORT_ADDR or
                  http://127.0.0.1:4747.
  -run=<n>        Bill run n of a job run several times. Default: the
                  latest run.
  -json           Print JSON.
`

func (c *BillCommand) Help() string     { return billHelp }
func (c *BillCommand) Synopsis() string { return "Show what a job costs, per worker" }

func (c *BillCommand) Run(args []string) int {
	fs := flagSet("bill")
	addr := fs.String("address", "", "")
	asJSON := fs.Bool("json", false, "")
	run := fs.Int("run", 0, "")
	if ok, code := parse(c.UI, fs, args, 1, billHelp); !ok {
		return code
	}
	path := "/v1/job/" + fs.Arg(0) + "/bill"
	if *run != 0 {
		path += fmt.Sprintf("?run=%d", *run)
	}
	var b billing.Bill
	if err := call(http.MethodGet, address(*addr)+path, nil, &b); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if *asJSON {
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
	for d, n := range ds {
		out += fmt.Sprintf(", %d× %s", n, d)
	}
	return out
}

// StopCommand stops a job.
type StopCommand struct{ UI cli.Ui }

const stopHelp = `
Usage: cohort stop [options] <job>

  Stops a cluster job: its Nomad job is deregistered, its reservation
  freed and its bill closed.

Options:

  -address=<url>  cohort server API. Default: $COHORT_ADDR or
                  http://127.0.0.1:4747.
`

func (c *StopCommand) Help() string     { return stopHelp }
func (c *StopCommand) Synopsis() string { return "Stop a cluster job" }

func (c *StopCommand) Run(args []string) int {
	fs := flagSet("stop")
	addr := fs.String("address", "", "")
	if ok, code := parse(c.UI, fs, args, 1, stopHelp); !ok {
		return code
	}
	if err := call(http.MethodDelete, address(*addr)+"/v1/job/"+fs.Arg(0), nil, nil); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	c.UI.Output("stopped " + fs.Arg(0))
	return ExitOK
}

// QueueCommand lists queued jobs in the order they will be considered.
type QueueCommand struct{ UI cli.Ui }

const queueHelp = `
Usage: cohort queue [options]

  Lists the queued cluster jobs in scheduling order: priority, then
  submission. A job waiting behind the head may still start first by
  backfill when it cannot delay the head.

Options:

  -address=<url>  cohort server API. Default: $COHORT_ADDR or
                  http://127.0.0.1:4747.
  -json           Print JSON.
`

func (c *QueueCommand) Help() string     { return queueHelp }
func (c *QueueCommand) Synopsis() string { return "List queued cluster jobs" }

func (c *QueueCommand) Run(args []string) int {
	fs := flagSet("queue")
	addr := fs.String("address", "", "")
	asJSON := fs.Bool("json", false, "")
	if ok, code := parse(c.UI, fs, args, 0, queueHelp); !ok {
		return code
	}
	var vs []server.JobView
	if err := call(http.MethodGet, address(*addr)+"/v1/queue", nil, &vs); err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	if *asJSON {
		printJSON(c.UI, vs)
		return ExitOK
	}
	for i, v := range vs {
		c.UI.Output(fmt.Sprintf("%3d. %-24s priority %3d  %3d workers  %s", i+1, v.ID, v.Priority, v.Workers, v.Reason))
	}
	return ExitOK
}
