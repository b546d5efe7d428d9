package driver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/hashicorp/go-hclog"
)

// templates keeps one saved template VM per shape. A task of a shape with
// no template yet cold-boots while the template is built in the
// background; later tasks of that shape restore from it.
//
// Builds are safe against other instances of the plugin on the host (Nomad
// starts more than one): a shape is built by one builder at a time under a
// lock file, each build maps RAM files of its own, and a template VM runs
// in a run directory the orphan collector owns, so one whose builder died
// is stopped.
type templates struct {
	dir     string // the state directory: snapshots go under it
	runRoot string // where template VMs run, beside the workers
	backend vm.Backend
	log     hclog.Logger
	ctx     context.Context
	// live is the driver's set of run directories in use.
	live *sync.Map
	// retry is how long to wait before the next try after failures
	// failed builds in a row.
	retry func(failures int) time.Duration

	mu    sync.Mutex
	state map[string]*template
}

type template struct {
	path     string
	ready    bool
	building bool
	err      error
	failures int
	took     time.Duration
}

func newTemplates(ctx context.Context, dir string, backend vm.Backend, build string, log hclog.Logger) *templates {
	t := &templates{dir: dir, runRoot: filepath.Join(dir, "run"), backend: backend, log: log, ctx: ctx,
		live: &sync.Map{}, retry: retryAfter, state: map[string]*template{}}
	t.pruneStale(build)
	return t
}

// pruneStale removes what templates of another guest build (build: see
// vm.Shape.Build; cohort upgraded) or another version of the backend
// (the VMM upgraded) left in the snapshots directory: none can be
// restored now, and each holds a snapshot and a RAM file of its shape's
// size on the node's disk for good otherwise. Files are told apart by
// name: a shape's key, ".snap", and what follows (the RAM file, a lock,
// a failed build's console and leftovers).
func (t *templates) pruneStale(build string) {
	version := t.backend.Version()
	if version == "" || build == "" {
		return // what is current cannot be told
	}
	dir := filepath.Join(t.dir, "snapshots")
	entries, _ := os.ReadDir(dir)
	removed := 0
	for _, e := range entries {
		i := strings.Index(e.Name(), ".snap")
		if i < 0 {
			continue // not a template's
		}
		key := e.Name()[:i]
		if strings.HasPrefix(key, build+"-") && strings.HasSuffix(key, "-"+t.backend.Name()+version) {
			continue
		}
		if os.RemoveAll(filepath.Join(dir, e.Name())) == nil {
			removed++
		}
	}
	if removed > 0 {
		t.log.Info("removed the files of templates no longer usable (another guest build or vmm version)", "files", removed, "vmm", t.backend.Name()+" "+version)
	}
}

// retryAfter backs off from 10 s, doubling to at most 10 minutes: a node
// never stays on cold boots for good because of a bad moment.
func retryAfter(failures int) time.Duration {
	d := 10 * time.Second
	for i := 1; i < failures && d < 10*time.Minute; i++ {
		d *= 2
	}
	return min(d, 10*time.Minute)
}

func (t *templates) key(s vm.Shape) string {
	return s.Key() + "-" + t.backend.Name() + t.backend.Version()
}

// get returns the snapshot for shape if one is ready; otherwise it starts
// building one (once) and returns "".
func (t *templates) get(s vm.Shape) string {
	key := t.key(s)
	t.mu.Lock()
	defer t.mu.Unlock()
	tp := t.state[key]
	if tp == nil {
		tp = &template{path: filepath.Join(t.dir, "snapshots", key+".snap")}
		t.state[key] = tp
		if _, err := os.Stat(tp.path); err == nil {
			tp.ready = true
		}
	}
	if tp.ready {
		return tp.path
	}
	if !tp.building && tp.err == nil {
		tp.building = true
		go t.build(s, tp)
	}
	return ""
}

// status summarizes the templates for the fingerprint: "building",
// "ready", "failed: <reason>" (tried again later) or "none".
func (t *templates) status() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	ready, building := 0, 0
	for _, tp := range t.state {
		switch {
		case tp.ready:
			ready++
		case tp.building:
			building++
		case tp.err != nil:
			return "failed: " + tp.err.Error()
		}
	}
	switch {
	case building > 0:
		return "building"
	case ready > 0:
		return "ready"
	}
	return "none"
}

func (t *templates) build(s vm.Shape, tp *template) {
	start := time.Now()
	err := t.snapshot(s, tp.path)
	t.mu.Lock()
	defer t.mu.Unlock()
	tp.building = false
	if err == nil {
		tp.ready, tp.err, tp.failures, tp.took = true, nil, 0, time.Since(start)
		t.log.Info("template snapshot ready", "shape", s.Key(), "took", tp.took)
		return
	}
	if t.ctx.Err() != nil {
		return
	}
	tp.err = err
	tp.failures++
	// A loaded host can make a build fail (the guest's timer checks, a
	// slow boot): tasks of the shape cold-boot meanwhile, and the build
	// is tried again, later each time.
	wait := t.retry(tp.failures)
	t.log.Warn("building template snapshot failed; tasks of this shape cold-boot until a try succeeds", "shape", s.Key(), "tries", tp.failures, "next_try_in", wait, "error", err)
	time.AfterFunc(wait, func() {
		t.mu.Lock()
		defer t.mu.Unlock()
		if t.ctx.Err() != nil || tp.ready || tp.building {
			return
		}
		tp.building = true
		go t.build(s, tp)
	})
}

func (t *templates) snapshot(s vm.Shape, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	if err := os.MkdirAll(t.runRoot, 0o700); err != nil {
		return err
	}
	// The wait for another builder does not eat into this build's time.
	unlock, err := lockFile(t.ctx, dst+".lock", true)
	if err != nil {
		return fmt.Errorf("waiting for another build of this template: %w", err)
	}
	defer unlock()
	if _, err := os.Stat(dst); err == nil {
		return nil // another instance of the plugin built it meanwhile
	}
	// Under the lock, any build's leftovers are a dead builder's.
	stale, _ := filepath.Glob(dst + "*.tmp")
	for _, f := range stale {
		os.Remove(f)
	}
	run := filepath.Join(t.runRoot, fmt.Sprintf("tmpl-%d-%d", os.Getpid(), time.Now().UnixNano()))
	release, err := claimRunDir(t.live, run)
	if err != nil {
		return err
	}
	defer func() {
		os.RemoveAll(run)
		release()
	}()
	empty := filepath.Join(run, "empty")
	if err := os.MkdirAll(empty, 0o755); err != nil {
		return err
	}
	spec := &vm.Spec{
		Shape:  s,
		RunDir: run,
		Stdout: os.DevNull,
		Stderr: os.DevNull,
		Shares: map[string]string{},
	}
	for _, tag := range proto.MountTags {
		spec.Shares[tag] = empty
	}
	ctx, cancel := context.WithTimeout(t.ctx, 2*time.Minute)
	defer cancel()
	err = t.backend.Snapshot(ctx, spec, dst)
	console := dst + ".console.log"
	if err != nil {
		// Keep the failed template's console for whoever looks into it.
		if b, rerr := os.ReadFile(filepath.Join(run, "console.log")); rerr == nil {
			os.WriteFile(console, b, 0o600)
		}
		return err
	}
	os.Remove(console)
	return nil
}
