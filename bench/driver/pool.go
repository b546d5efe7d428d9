package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	"golang.org/x/sys/unix"
)

// The warm pool's figures, with the driver's pool steps at the VM level:
// a pooled VM is restored with empty shares and warmed up (entropy,
// network, mounts) before any task exists; taking it mounts the task's
// directories into its shares, redirects its output and sends the
// assignment, timed until the program runs.

type pooledVM struct {
	m    *vm.Machine
	ctl  *vm.Ctl
	dir  string
	task *vm.Spec // the task's directories, once taken
}

// fill makes one pooled VM: what the pool does in the background.
func (b *bench) fill(snap string) (*pooledVM, time.Duration, error) {
	t0 := time.Now()
	spec := b.spec("pool")
	p := &pooledVM{dir: filepath.Dir(spec.RunDir)}
	for _, tag := range proto.MountTags {
		spec.Shares[tag] = filepath.Join(p.dir, "9p", tag)
		if err := os.MkdirAll(filepath.Join(spec.Shares[tag], "task"), 0o755); err != nil {
			return nil, 0, err
		}
	}
	m, err := b.q.Restore(spec, snap)
	if err != nil {
		os.RemoveAll(p.dir)
		return nil, 0, err
	}
	p.m = m
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	events := m.Events(ctx)
	if p.ctl, err = m.DialCtl(ctx); err != nil {
		p.close()
		return nil, 0, err
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	if err := p.ctl.Send(&proto.Assignment{Warm: true, Entropy: seed, Mounts: proto.MountTags}); err != nil {
		p.close()
		return nil, 0, err
	}
	if _, err := vm.WaitEvent(ctx, m, events, proto.EvWarmed); err != nil {
		p.close()
		return nil, 0, fmt.Errorf("warming up: %w; console: %s", err, m.ConsoleTail(10))
	}
	return p, time.Since(t0), nil
}

// take hands a pooled VM a task and waits for its program to run.
func (b *bench) take(p *pooledVM, args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	events := p.m.Events(ctx)
	p.task = b.spec("task")
	for tag, src := range p.task.Shares {
		dst := filepath.Join(p.dir, "9p", tag, "task")
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("mounting %s (the pool's figures need root, as the driver does): %w", dst, err)
		}
	}
	if err := b.q.Redirect(p.m, p.task.Stdout, p.task.Stderr); err != nil {
		return err
	}
	seed := make([]byte, 32)
	rand.Read(seed)
	if err := p.ctl.Send(&proto.Assignment{
		Hostname: "bench", Entropy: seed, UnixNano: time.Now().UnixNano(),
		Mounts: proto.MountTags, MountSub: "task", Program: "/local/worker", Args: args,
	}); err != nil {
		return err
	}
	_, err := vm.WaitEvent(ctx, p.m, events, proto.EvStarted)
	return err
}

func (p *pooledVM) close() {
	if p.ctl != nil {
		p.ctl.Close()
	}
	p.m.Kill()
	p.m.Wait(context.Background())
	for _, tag := range proto.MountTags {
		unix.Unmount(filepath.Join(p.dir, "9p", tag, "task"), unix.MNT_DETACH)
	}
	os.RemoveAll(p.dir)
	if p.task != nil {
		os.RemoveAll(filepath.Dir(p.task.RunDir))
	}
}

// poolStart is one pooled start: the refill's time and the take's.
func (b *bench) poolStart(snap string) (refill, take time.Duration, err error) {
	p, refill, err := b.fill(snap)
	if err != nil {
		return 0, 0, err
	}
	defer p.close()
	t0 := time.Now()
	if err := b.take(p, "exit", "0"); err != nil {
		return 0, 0, fmt.Errorf("%w; console: %s", err, p.m.ConsoleTail(10))
	}
	return refill, time.Since(t0), nil
}

// startManyPooled fills n pooled VMs, then takes all of them at once, as
// a gang of n lands on a node whose pool holds n; the median of 3 rounds.
// The pooled VMs' memory while they wait is the pool's cost.
func (b *bench) startManyPooled(snap string, n int) (startMs, rss, pss, cpu float64, err error) {
	var starts, rsss, psss, cpus []float64
	for round := range 3 {
		var ps []*pooledVM
		closeAll := func() {
			for _, p := range ps {
				p.close()
			}
		}
		for range n {
			p, _, err := b.fill(snap)
			if err != nil {
				closeAll()
				return 0, 0, 0, 0, err
			}
			ps = append(ps, p)
		}
		if round == 0 {
			// What waiting costs: CPU (a TCG guest's idle ticks) and
			// memory.
			before := make([]vm.Usage, len(ps))
			for i, p := range ps {
				before[i], _ = p.m.Usage()
			}
			t0 := time.Now()
			time.Sleep(2 * time.Second)
			for i, p := range ps {
				u, _ := p.m.Usage()
				busy := time.Duration(u.UserNs + u.SystemNs - before[i].UserNs - before[i].SystemNs)
				cpus = append(cpus, 100*busy.Seconds()/time.Since(t0).Seconds())
			}
			for _, p := range ps {
				r, s, err := smapsRollup(p.m.PID)
				if err != nil {
					closeAll()
					return 0, 0, 0, 0, err
				}
				rsss, psss = append(rsss, r), append(psss, s)
			}
		}
		t0 := time.Now()
		errs := make(chan error, n)
		for _, p := range ps {
			go func() { errs <- b.take(p, "exit", "0") }()
		}
		var first error
		for range n {
			if err := <-errs; err != nil && first == nil {
				first = err
			}
		}
		d := time.Since(t0)
		closeAll()
		if first != nil {
			return 0, 0, 0, 0, first
		}
		starts = append(starts, ms(d))
	}
	return pct(starts, 50), pct(rsss, 50), pct(psss, 50), pct(cpus, 50), nil
}
