package command

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/jobspec"
	nomadapi "github.com/hashicorp/nomad/api"
)

// LogsCommand prints every worker's output, prefixed by group and rank.
type LogsCommand struct{ Meta }

const logsHelp = `
Usage: cohort logs [options] <job>

  Prints the output of every worker of a cluster job's current run,
  each line prefixed with its worker's group and rank ("sorter[3] ...").
  Standard output goes to standard output and standard error to standard
  error. With -f it follows the workers until every one of them has
  ended, picking up the workers of a run that starts while it follows.

  Logs are read from Nomad, as nomad alloc logs reads them, with the
  caller's own token: $NOMAD_ADDR, $NOMAD_TOKEN (or -token), $NOMAD_CACERT,
  $NOMAD_CLIENT_CERT and $NOMAD_CLIENT_KEY. cohort's Nomad-compatible
  endpoint serves them too.

Options:

  -f                Follow the output live.
  -group=<name>     Only this group's workers.
  -rank=<n>         Only the worker of this rank (within -group, or in
                    every group).
` + metaHelp + `
`

func (c *LogsCommand) Help() string     { return logsHelp }
func (c *LogsCommand) Synopsis() string { return "Print the output of a job's workers" }

func (c *LogsCommand) Run(args []string) int {
	fs := c.FlagSet("logs", false)
	follow := fs.Bool("f", false, "")
	group := fs.String("group", "", "")
	rank := fs.Int("rank", -1, "")
	if ok, code := parse(c.UI, fs, args, 1, logsHelp); !ok {
		return code
	}
	cfg := nomadapi.DefaultConfig()
	if c.token != "" {
		cfg.SecretID = c.token
	}
	if ns := c.Namespace(); ns != "" {
		cfg.Namespace = ns
	}
	client, err := nomadapi.NewClient(cfg)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error reaching Nomad: %v", err))
		return ExitError
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	l := &logStreamer{nomad: client, job: fs.Arg(0), group: *group, rank: *rank, follow: *follow,
		stdout: os.Stdout, stderr: os.Stderr, started: map[string]bool{}}
	if err := l.run(ctx); err != nil {
		c.UI.Error(fmt.Sprintf("Error: %v", err))
		return ExitError
	}
	return ExitOK
}

// logStreamer streams the logs of a job's workers.
type logStreamer struct {
	nomad          *nomadapi.Client
	job, group     string
	rank           int
	follow         bool
	stdout, stderr io.Writer

	mu      sync.Mutex // serializes lines to the writers
	started map[string]bool
	wg      sync.WaitGroup
}

var allocName = regexp.MustCompile(`\.([^.\[]+)\[(\d+)\]$`)

// worker is an allocation as a worker of the gang: its group and rank.
type worker struct {
	alloc      *nomadapi.AllocationListStub
	group      string
	rank       int
	terminal   bool
	jobVersion uint64
	task       string
}

// workers lists the allocations of the job's newest version that the
// filters select: earlier versions are earlier runs of the gang.
func (l *logStreamer) workers() ([]worker, error) {
	stubs, _, err := l.nomad.Jobs().Allocations(l.job, true, nil)
	if err != nil {
		return nil, fmt.Errorf("listing the workers of %s: %w", l.job, err)
	}
	var newest uint64
	for _, a := range stubs {
		newest = max(newest, a.JobVersion)
	}
	var out []worker
	for _, a := range stubs {
		m := allocName.FindStringSubmatch(a.Name)
		if a.JobVersion != newest || m == nil {
			continue
		}
		r, _ := strconv.Atoi(m[2])
		if (l.group != "" && m[1] != l.group) || (l.rank >= 0 && r != l.rank) {
			continue
		}
		term := a.ClientStatus == "complete" || a.ClientStatus == "failed" || a.ClientStatus == "lost"
		// The worker's task is the group's one task besides the barrier
		// task ("worker" in jobs cohort writes; anything in hand-written
		// ones).
		task := jobspec.TaskName
		for name := range a.TaskStates {
			if name != jobspec.BarrierTaskName {
				task = name
			}
		}
		out = append(out, worker{alloc: a, group: m[1], rank: r, terminal: term, jobVersion: a.JobVersion, task: task})
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].group != out[j].group {
			return out[i].group < out[j].group
		}
		return out[i].rank < out[j].rank
	})
	return out, nil
}

func (l *logStreamer) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ws, err := l.workers()
	if err != nil {
		return err
	}
	if len(ws) == 0 && !l.follow {
		return fmt.Errorf("job %s has no workers on Nomad yet (a queued gang has none; try -f)", l.job)
	}
	for _, w := range ws {
		l.start(ctx, w)
	}
	if !l.follow {
		l.wg.Wait()
		return nil
	}
	// Following: new workers (a requeued or freshly placed run) join;
	// the command ends once every worker of the newest run has ended
	// and its output has been read.
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			l.wg.Wait()
			return nil
		case <-t.C:
		}
		ws, err := l.workers()
		if err != nil {
			continue // Nomad unreachable for a moment: keep following
		}
		done := len(ws) > 0
		for _, w := range ws {
			l.start(ctx, w)
			done = done && w.terminal
		}
		if done {
			// A followed log of a task that ended stays open; give it a
			// moment to deliver its last lines, then end.
			time.Sleep(time.Second)
			cancel()
			l.wg.Wait()
			return nil
		}
	}
}

// start streams one worker's stdout and stderr, once.
func (l *logStreamer) start(ctx context.Context, w worker) {
	l.mu.Lock()
	seen := l.started[w.alloc.ID]
	l.started[w.alloc.ID] = true
	l.mu.Unlock()
	if seen {
		return
	}
	prefix := fmt.Sprintf("%s[%d] ", w.group, w.rank)
	for _, stream := range []struct {
		kind string
		out  io.Writer
	}{{"stdout", l.stdout}, {"stderr", l.stderr}} {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.stream(ctx, w.alloc.ID, w.task, stream.kind, prefix, stream.out)
		}()
	}
}

// stream copies one task's stdout or stderr, line by line. A task that
// has not started yet (a worker held at the barrier) has no log: without
// -f there is nothing to print; with -f the stream is opened again until
// it has, and a stream that breaks is resumed where it stopped.
func (l *logStreamer) stream(ctx context.Context, allocID, task, kind, prefix string, out io.Writer) {
	alloc := &nomadapi.Allocation{ID: allocID}
	var partial []byte
	var offset int64
	flush := func(final bool) {
		for {
			i := bytes.IndexByte(partial, '\n')
			if i < 0 {
				break
			}
			l.line(out, prefix, partial[:i])
			partial = partial[i+1:]
		}
		if final && len(partial) > 0 {
			l.line(out, prefix, partial)
			partial = nil
		}
	}
	defer flush(true)
	for {
		cancel := make(chan struct{})
		stop := context.AfterFunc(ctx, func() { close(cancel) })
		frames, errs := l.nomad.AllocFS().Logs(alloc, l.follow, task, kind, "start", offset, cancel, nil)
		err := l.copyFrames(ctx, frames, errs, func(data []byte) {
			offset += int64(len(data))
			partial = append(partial, data...)
			flush(false)
		})
		if !stop() {
			return // ctx ended
		}
		close(cancel)
		switch {
		case err == nil:
			return // the log ended
		case !l.follow:
			if !notStarted(err) {
				l.line(l.stderr, prefix, []byte("(reading "+kind+": "+strings.TrimSpace(err.Error())+")"))
			}
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// copyFrames hands each frame's data to add until the stream ends (nil)
// or fails.
func (l *logStreamer) copyFrames(ctx context.Context, frames <-chan *nomadapi.StreamFrame, errs <-chan error, add func([]byte)) error {
	for {
		select {
		case f, ok := <-frames:
			if !ok {
				select {
				case err := <-errs:
					return err
				default:
					return nil
				}
			}
			add(f.Data)
		case err := <-errs:
			return err
		case <-ctx.Done():
			// Take what already arrived before ending.
			for {
				select {
				case f, ok := <-frames:
					if ok {
						add(f.Data)
						continue
					}
				default:
				}
				return nil
			}
		}
	}
}

// notStarted says Nomad has no log for a task because it has not run.
func notStarted(err error) bool {
	return strings.Contains(err.Error(), "not started yet")
}

func (l *logStreamer) line(out io.Writer, prefix string, b []byte) {
	l.mu.Lock()
	defer l.mu.Unlock()
	fmt.Fprintf(out, "%s%s\n", prefix, b)
}
