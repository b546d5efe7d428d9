// Package vmtest provides what tests of worker VMs need: the guest kernel,
// the init packed into an initramfs, and a static test program.
package vmtest

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"

	"github.com/cohort-dev/cohort/driver/guest/initramfs"
)

// Assets are the files a test VM boots from.
type Assets struct {
	Kernel string
	Initrd string
	Worker string // static test program, see worker/
	Init   string // the guest init, for tests that pack their own initramfs
}

var (
	once   sync.Once
	assets Assets
	err    error
	dir    string
)

// Get builds the init and test worker once per test binary and finds the
// kernel that `make kernel` built (or $COHORT_KERNEL). Without a kernel the
// test fails, unless COHORT_E2E=0 asks to skip VM tests.
func Get(t testing.TB) Assets {
	t.Helper()
	if os.Getenv("COHORT_E2E") == "0" {
		t.Skip("COHORT_E2E=0: tests that boot VMs are disabled")
	}
	a, err := Build()
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Build builds the assets once per process; benchmarks use it directly.
func Build() (Assets, error) {
	once.Do(build)
	return assets, err
}

func build() {
	assets.Kernel = os.Getenv("COHORT_KERNEL")
	if assets.Kernel == "" {
		assets.Kernel = findUp(filepath.Join(".tools", "kernel", "vmlinux"))
	}
	if assets.Kernel == "" {
		err = errNoKernel
		return
	}
	if dir, err = os.MkdirTemp("", "cohort-vmtest-"); err != nil {
		return
	}
	_, self, _, _ := runtime.Caller(0)
	here := filepath.Dir(self)
	root := filepath.Join(here, "..", "..", "..")
	initBin := filepath.Join(dir, "init")
	assets.Init = initBin
	if err = goBuild(root, initBin, "./driver/guest/init"); err != nil {
		return
	}
	assets.Worker = filepath.Join(dir, "worker")
	if err = goBuild(root, assets.Worker, "./driver/vm/vmtest/worker"); err != nil {
		return
	}
	var b, img []byte
	if b, err = os.ReadFile(initBin); err != nil {
		return
	}
	if img, err = initramfs.Build(b); err != nil {
		return
	}
	assets.Initrd = filepath.Join(dir, "initrd.gz")
	err = os.WriteFile(assets.Initrd, img, 0o644)
}

func goBuild(root, out, pkg string) error {
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		return &buildError{pkg: pkg, out: string(b), err: err}
	}
	return nil
}

type buildError struct {
	pkg, out string
	err      error
}

func (e *buildError) Error() string { return "building " + e.pkg + ": " + e.err.Error() + "\n" + e.out }

type kernelError struct{}

func (kernelError) Error() string {
	return "guest kernel not found: run `make kernel` or set COHORT_KERNEL"
}

var errNoKernel error = kernelError{}

func findUp(rel string) string {
	wd, _ := os.Getwd()
	for d := wd; ; d = filepath.Dir(d) {
		p := filepath.Join(d, rel)
		if _, err := os.Stat(p); err == nil {
			return p
		}
		if d == filepath.Dir(d) {
			return ""
		}
	}
}
