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

	"github.com/cohort-dev/cohort/api"
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
	go func() {
		<-ctx.Done()
		stop() // a second Ctrl-C kills at once
	}()
	cohort := c.Client()
	ns := c.Namespace()
	l := &logStreamer{nomad: client, job: fs.Arg(0), group: *group, rank: *rank, follow: *follow,
		stdout: os.Stdout, stderr: os.Stderr, started: map[string]bool{},
		// Whether the gang has ended is cohort's to say: a gang sent back
		// to the queue has no workers on Nomad for a while, yet goes on.
		ended: func() (bool, error) {
			v, err := cohort.Job(ns, fs.Arg(0), false)
			if err != nil {
				return false, err
			}
			return v.Status == api.StatusFinished || v.Status == api.StatusFailed, nil
		}}
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

	// ended says whether the job's gang has ended for good; it is asked
	// only when following.
	ended func() (bool, error)

	mu      sync.Mutex // serializes lines to the writers
	started map[string]bool
	errs    map[string]bool // errors already shown
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
func (l *logStreamer) workers(ctx context.Context) ([]worker, error) {
	stubs, _, err := l.nomad.Jobs().Allocations(l.job, true, (&nomadapi.QueryOptions{}).WithContext(ctx))
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
		// Until Nomad has set the allocation's tasks up, its task is
		// unknown (a hand-written job names it as it likes): it is
		// picked up at a later look.
		task := ""
		for name := range a.TaskStates {
			if name != jobspec.BarrierTaskName && (task == "" || name < task) {
				task = name
			}
		}
		if task == "" {
			if !term {
				continue
			}
			task = jobspec.TaskName
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
	if l.errs == nil {
		l.errs = map[string]bool{}
	}
	if l.follow && l.ended != nil {
		if _, err := l.ended(); err != nil {
			return fmt.Errorf("reading job %s: %w", l.job, err)
		}
	}
	// follow ends the live streams; ctx (the user's Ctrl-C) ends all.
	follow, stopFollowing := context.WithCancel(ctx)
	defer stopFollowing()
	ws, err := l.workers(ctx)
	if err != nil {
		return err
	}
	if len(ws) == 0 && !l.follow {
		return fmt.Errorf("job %s has no workers on Nomad yet (a queued gang has none; try -f)", l.job)
	}
	for _, w := range ws {
		l.start(ctx, follow, w)
	}
	if !l.follow {
		l.wg.Wait()
		return nil
	}
	// Following: the workers of a new run join as they appear; once the
	// gang has ended and every worker of its last run has, the live
	// streams stop and each is read to its end.
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			l.wg.Wait()
			return nil
		case <-t.C:
		}
		ws, err := l.workers(ctx)
		if err != nil {
			l.note("", "listing workers", err)
			continue
		}
		done := true
		for _, w := range ws {
			l.start(ctx, follow, w)
			done = done && w.terminal
		}
		if done && l.ended != nil {
			ended, err := l.ended()
			if err != nil {
				l.note("", "reading the job", err)
			}
			done = ended
		}
		if done {
			stopFollowing()
			l.wg.Wait()
			return nil
		}
	}
}

// note shows an error once: a following loop meets the same one again.
func (l *logStreamer) note(prefix, what string, err error) {
	msg := fmt.Sprintf("(%s: %s)", what, strings.TrimSpace(err.Error()))
	l.mu.Lock()
	seen := l.errs[prefix+msg]
	l.errs[prefix+msg] = true
	l.mu.Unlock()
	if !seen {
		l.line(l.stderr, prefix, []byte(msg))
	}
}

// start streams one worker's stdout and stderr, once.
func (l *logStreamer) start(ctx, follow context.Context, w worker) {
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
			l.stream(ctx, follow, w.alloc.ID, w.task, stream.kind, prefix, stream.out)
		}()
	}
}

// stream copies one task's stdout or stderr, line by line. A task that
// has not started yet (a worker held at the barrier) has no log: without
// -f there is nothing to print. With -f the stream is opened again until
// it has, a stream that breaks or ends is resumed where it stopped, and
// when follow ends the log is read once more, to its end, so nothing
// written before the end is lost.
func (l *logStreamer) stream(ctx, follow context.Context, allocID, task, kind, prefix string, out io.Writer) {
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
	add := func(data []byte) {
		offset += int64(len(data))
		partial = append(partial, data...)
		flush(false)
	}
	// read streams once, live or to the end, and ends with ctx.
	read := func(ctx context.Context, live bool) error {
		cancel := make(chan struct{})
		stop := context.AfterFunc(ctx, func() { close(cancel) })
		defer func() {
			if stop() {
				close(cancel)
			}
		}()
		q := (&nomadapi.QueryOptions{}).WithContext(ctx)
		frames, errs := l.nomad.AllocFS().Logs(alloc, live, task, kind, "start", offset, cancel, q)
		return copyFrames(ctx, frames, errs, add)
	}
	if !l.follow {
		if err := read(ctx, false); err != nil && !notStarted(err) {
			l.note(prefix, "reading "+kind, err)
		}
		return
	}
	for follow.Err() == nil {
		err := read(follow, true)
		if err != nil && !notStarted(err) && follow.Err() == nil {
			l.note(prefix, "reading "+kind, err)
		}
		select {
		case <-follow.Done():
		case <-time.After(500 * time.Millisecond):
		}
	}
	if ctx.Err() == nil {
		if err := read(ctx, false); err != nil && !notStarted(err) {
			l.note(prefix, "reading "+kind, err)
		}
	}
}

// copyFrames hands each frame's data to add until the stream ends (nil),
// fails, or ctx ends; frames that arrived before an error or the end are
// all handed over.
func copyFrames(ctx context.Context, frames <-chan *nomadapi.StreamFrame, errs <-chan error, add func([]byte)) error {
	drain := func() {
		for {
			select {
			case f, ok := <-frames:
				if !ok {
					return
				}
				add(f.Data)
			default:
				return
			}
		}
	}
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
			drain()
			return err
		case <-ctx.Done():
			drain()
			return nil
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
