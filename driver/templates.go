package driver

import (
	"context"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/hashicorp/go-hclog"
)

// templates keeps one saved template VM per shape. A task of a shape with
// no template yet cold-boots while the template is built in the
// background; later tasks of that shape restore from it.
type templates struct {
	dir     string
	backend vm.Backend
	log     hclog.Logger
	ctx     context.Context

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

// maxTemplateTries bounds the builds of one template.
const maxTemplateTries = 3

func newTemplates(ctx context.Context, dir string, backend vm.Backend, log hclog.Logger) *templates {
	return &templates{dir: dir, backend: backend, log: log, ctx: ctx, state: map[string]*template{}}
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

// status summarizes the templates for the fingerprint.
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
	if err != nil {
		tp.err = err
		tp.failures++
		if tp.failures >= maxTemplateTries || t.ctx.Err() != nil {
			t.log.Error("building template snapshot failed; tasks of this shape cold-boot", "shape", s.Key(), "tries", tp.failures, "error", err)
			return
		}
		// A loaded host can make one build fail (the guest's timer
		// checks, a slow boot): try again, after a pause.
		wait := time.Duration(tp.failures) * 10 * time.Second
		t.log.Warn("building template snapshot failed; trying again", "shape", s.Key(), "in", wait, "error", err)
		time.AfterFunc(wait, func() {
			t.mu.Lock()
			defer t.mu.Unlock()
			if t.ctx.Err() != nil || tp.ready || tp.building {
				return
			}
			tp.err, tp.building = nil, true
			go t.build(s, tp)
		})
		return
	}
	tp.ready, tp.took = true, time.Since(start)
	t.log.Info("template snapshot ready", "shape", s.Key(), "took", tp.took)
}

func (t *templates) snapshot(s vm.Shape, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
		return err
	}
	run, err := os.MkdirTemp(t.dir, "tmpl-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(run)
	empty := filepath.Join(run, "empty")
	os.MkdirAll(empty, 0o755)
	spec := &vm.Spec{
		Shape:  s,
		RunDir: filepath.Join(run, "r"),
		Stdout: os.DevNull,
		Stderr: os.DevNull,
		Shares: map[string]string{},
	}
	for _, tag := range proto.MountTags {
		spec.Shares[tag] = empty
	}
	ctx, cancel := context.WithTimeout(t.ctx, 2*time.Minute)
	defer cancel()
	return t.backend.Snapshot(ctx, spec, dst)
}
