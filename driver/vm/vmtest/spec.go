package vmtest

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
)

// NewSpec lays out one test VM under dir: its run directory (dir/r), its
// stdout and stderr files, and a host directory per share with the test
// worker in local/ as /local/worker. The bench and the tests both start
// their VMs from it, so a figure and a test describe the same VM. dir's
// path must be short: the run directory holds unix sockets.
func NewSpec(dir string, a Assets, accel string) (*vm.Spec, error) {
	s := &vm.Spec{
		Shape:  vm.Shape{Kernel: a.Kernel, Initrd: a.Initrd, MemoryMB: 128, VCPUs: 1, Accel: accel},
		RunDir: filepath.Join(dir, "r"),
		Stdout: filepath.Join(dir, "stdout"),
		Stderr: filepath.Join(dir, "stderr"),
		Shares: map[string]string{},
	}
	for _, tag := range proto.MountTags {
		d := filepath.Join(dir, tag)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
		s.Shares[tag] = d
	}
	if err := os.MkdirAll(s.RunDir, 0o700); err != nil {
		return nil, err
	}
	for _, f := range []string{s.Stdout, s.Stderr} {
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			return nil, err
		}
	}
	worker, err := os.ReadFile(a.Worker)
	if err != nil {
		return nil, fmt.Errorf("test worker: %w", err)
	}
	if err := os.WriteFile(filepath.Join(s.Shares["local"], "worker"), worker, 0o755); err != nil {
		return nil, err
	}
	return s, nil
}

// Spec is NewSpec in a short temporary directory removed when the test
// ends.
func Spec(t testing.TB, a Assets, accel string) *vm.Spec {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "vmt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s, err := NewSpec(dir, a, accel)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Assignment runs the test worker with args under hostname.
func Assignment(hostname string, args ...string) *proto.Assignment {
	seed := make([]byte, 32)
	rand.Read(seed)
	return &proto.Assignment{
		Hostname: hostname,
		Entropy:  seed,
		UnixNano: time.Now().UnixNano(),
		Mounts:   proto.MountTags,
		Program:  "/local/worker",
		Args:     args,
		Env:      []string{"PATH=/local"},
	}
}
