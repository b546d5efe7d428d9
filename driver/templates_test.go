package driver

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/hashicorp/go-hclog"
)

// fakeBackend builds templates by writing the snapshot file, failing the
// first fails builds.
type fakeBackend struct {
	vm.Backend
	fails            int32
	calls, now, most atomic.Int32
	runDirs          sync.Map
}

func (f *fakeBackend) Name() string    { return "fake" }
func (f *fakeBackend) Version() string { return "1" }
func (f *fakeBackend) Snapshot(ctx context.Context, spec *vm.Spec, dst string) error {
	n := f.calls.Add(1)
	f.runDirs.Store(spec.RunDir, true)
	cur := f.now.Add(1)
	defer f.now.Add(-1)
	for {
		most := f.most.Load()
		if cur <= most || f.most.CompareAndSwap(most, cur) {
			break
		}
	}
	time.Sleep(100 * time.Millisecond)
	if n <= f.fails {
		return errors.New("template vm: waiting for \"ready\": context deadline exceeded")
	}
	return os.WriteFile(dst, []byte("snapshot"), 0o600)
}

func waitStatus(t *testing.T, ts *templates, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for ts.status() != want {
		if time.Now().After(deadline) {
			t.Fatalf("template status %q, want %q", ts.status(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Two instances of the plugin on one host (Nomad starts more than one)
// never build the same template at once: the second waits for the first
// and takes what it built.
func TestTemplateBuiltOncePerHost(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fb := &fakeBackend{}
	a := newTemplates(ctx, dir, fb, "", hclog.NewNullLogger())
	b := newTemplates(ctx, dir, fb, "", hclog.NewNullLogger())
	shape := vm.Shape{Kernel: "/k", Initrd: "/i", MemoryMB: 128, VCPUs: 1, Accel: "tcg"}
	if a.get(shape) != "" || b.get(shape) != "" {
		t.Fatal("a template was ready before any build")
	}
	waitStatus(t, a, "ready")
	waitStatus(t, b, "ready")
	if fb.most.Load() != 1 || fb.calls.Load() != 1 {
		t.Errorf("%d builds, %d at once; want one", fb.calls.Load(), fb.most.Load())
	}
	if a.get(shape) == "" || a.get(shape) != b.get(shape) {
		t.Errorf("snapshots %q and %q", a.get(shape), b.get(shape))
	}
	// The template ran in a run directory of the collector's, gone now.
	fb.runDirs.Range(func(k, _ any) bool {
		if !strings.HasPrefix(k.(string), a.runRoot+"/tmpl-") {
			t.Errorf("template ran in %s, outside the collector's %s", k, a.runRoot)
		}
		if _, err := os.Stat(k.(string)); err == nil {
			t.Errorf("%s left behind", k)
		}
		return true
	})
}

// A failing build is tried again, later each time, and never given up:
// the node says "failed: <reason>" meanwhile and "ready" once a try
// succeeds.
func TestTemplateRetriedUntilReady(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fb := &fakeBackend{fails: 4}
	ts := newTemplates(ctx, t.TempDir(), fb, "", hclog.NewNullLogger())
	ts.retry = func(int) time.Duration { return 20 * time.Millisecond }
	shape := vm.Shape{Kernel: "/k", Initrd: "/i", MemoryMB: 128, VCPUs: 1, Accel: "tcg"}
	ts.get(shape)
	deadline := time.Now().Add(10 * time.Second)
	sawFailed := false
	for ts.status() != "ready" {
		if strings.HasPrefix(ts.status(), "failed: template vm:") {
			sawFailed = true
		}
		if time.Now().After(deadline) {
			t.Fatalf("status %q after %d builds", ts.status(), fb.calls.Load())
		}
		time.Sleep(2 * time.Millisecond)
	}
	if !sawFailed || fb.calls.Load() != 5 {
		t.Errorf("ready after %d builds (want 5), failure shown: %v", fb.calls.Load(), sawFailed)
	}
	for f, want := range map[int]time.Duration{1: 10 * time.Second, 2: 20 * time.Second, 4: 80 * time.Second, 9: 10 * time.Minute, 50: 10 * time.Minute} {
		if got := retryAfter(f); got != want {
			t.Errorf("retryAfter(%d) = %s, want %s", f, got, want)
		}
	}
}

// What templates of another guest build or another version of the VMM
// left is removed when the driver starts (none can be restored now),
// failed builds' leftovers included; this build's templates stay, and
// files that are no template's.
func TestStaleTemplatesPruned(t *testing.T) {
	dir := t.TempDir()
	snaps := filepath.Join(dir, "snapshots")
	os.MkdirAll(snaps, 0o700)
	keep := []string{"b1-m512-c1-tcg-fake1.snap", "b1-m512-c1-tcg-fake1.snap.ram", "b1-m1024-c2-tcg-fake1.snap",
		"b1-m512-c1-tcg-fake1.snap.lock", "notes.txt"}
	drop := []string{
		"b1-m512-c1-tcg-fake0.9.snap", "b1-m512-c1-tcg-fake0.9.snap.ram", "b1-m512-c1-tcg-fake0.9.snap.console.log",
		"b1-m512-c1-tcg-fake0.9.snap.lock", "b1-m512-c1-tcg-fake0.9.snap.ram.123-456.tmp",
		"b0-m512-c1-tcg-fake1.snap", "b0-m512-c1-tcg-fake1.snap.ram", "b0-m512-c1-tcg-fake1.snap.ram.9-9.tmp",
	}
	for _, f := range append(append([]string(nil), keep...), drop...) {
		if err := os.WriteFile(filepath.Join(snaps, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	newTemplates(context.Background(), dir, &fakeBackend{}, "b1", hclog.NewNullLogger())
	for _, f := range keep {
		if _, err := os.Stat(filepath.Join(snaps, f)); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	for _, f := range drop {
		if _, err := os.Stat(filepath.Join(snaps, f)); err == nil {
			t.Errorf("%s is still there", f)
		}
	}
}
