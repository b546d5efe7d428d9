package driver

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/hashicorp/go-hclog"
)

// pool keeps VMs restored from their shape's template, warmed up and
// waiting for a task: a start that finds one hands it its task's
// directories, log paths and identity, and skips the restore and the
// guest's steps that need no task (entropy, network, mounts). A pool
// fills a shape only after a task of that shape started on this node (so
// the short-lived instances of the plugin that Nomad launches to
// fingerprint never fill one), and refills it in the background, one VM
// at a time once starts have been quiet for poolQuiet, up to Size per
// shape and MemoryMB in all, and only while the host has the memory to
// spare. A start that finds the pool empty
// restores as before; a VM that died while it waited is thrown away.
//
// Pooled VMs run in run directories the pool claims (owner lock held,
// marked live), so the orphan collector leaves them alone while this
// instance lives and stops them once it is gone.
type pool struct {
	d     *Driver
	log   hclog.Logger
	root  string // the run directories' parent
	size  int
	memMB int
	// spare is the host memory a new pooled VM must leave available.
	spare int

	mu      sync.Mutex
	ready   map[string][]*pooled // by shape key
	wanted  map[string]*wanted
	filling int // MiB of VMs being made
	hits    int
	misses  int
	// lastTake is when a start last asked the pool: refills wait for a
	// quiet moment after it.
	lastTake time.Time
	kick     chan struct{}
}

// poolQuiet is how long after the last start a refill waits: the VMs of
// a gang land together, and restoring their replacements meanwhile would
// take CPU from the gang's own starts (on 2 cores, 18 refills beside a
// 16-worker gang slowed it several times over).
const poolQuiet = 3 * time.Second

// wanted is a shape the pool fills, and when a task last asked for it.
type wanted struct {
	shape vm.Shape
	last  time.Time
}

// poolIdle is how long a shape no task asked for keeps its waiting VMs:
// a one-off job's shape must not hold the pool's memory for good.
const poolIdle = 10 * time.Minute

// pooled is one waiting VM.
type pooled struct {
	shape   vm.Shape
	m       *vm.Machine
	lease   *lease
	ctl     *vm.Ctl
	dir     string
	release func() // gives up the run directory's claim
	made    time.Time
	took    time.Duration // to restore and warm up
}

// poolSpare is the host memory (MiB) a refill leaves available beyond the
// new VM's own: tasks placed by Nomad come first.
const poolSpare = 512

func newPool(d *Driver, cfg PoolConfig, runRoot string) *pool {
	return &pool{d: d, log: d.log.Named("pool"), root: runRoot, size: cfg.Size, memMB: cfg.MemoryMB, spare: poolSpare,
		ready: map[string][]*pooled{}, wanted: map[string]*wanted{}, kick: make(chan struct{}, 1)}
}

// take returns a live waiting VM of shape s, or nil; either way the shape
// is wanted from now on and the pool refills it.
func (p *pool) take(s vm.Shape) *pooled {
	key := s.Key()
	defer p.poke()
	p.mu.Lock()
	p.lastTake = time.Now()
	p.wanted[key] = &wanted{shape: s, last: p.lastTake}
	var dead []*pooled
	var got *pooled
	for len(p.ready[key]) > 0 {
		q := p.ready[key]
		v := q[len(q)-1]
		p.ready[key] = q[:len(q)-1]
		if v.m.Alive() {
			got = v
			break
		}
		dead = append(dead, v)
	}
	if got != nil {
		p.hits++
	} else {
		p.misses++
	}
	hits, misses := p.hits, p.misses
	p.mu.Unlock()
	p.log.Debug("start", "memory_mb", s.MemoryMB, "hit", got != nil, "hits", hits, "misses", misses)
	for _, v := range dead {
		p.drop(v)
	}
	return got
}

func (p *pool) poke() {
	select {
	case p.kick <- struct{}{}:
	default:
	}
}

// run refills the pool until ctx ends, then stops every waiting VM.
func (p *pool) run(ctx context.Context) {
	defer p.drain()
	failures := 0
	for {
		wait := 10 * time.Second
		if failures > 0 {
			wait = min(time.Duration(failures)*5*time.Second, time.Minute)
		}
		until := time.Now().Add(wait)
		for left := wait; left > 0; left = time.Until(until) {
			select {
			case <-ctx.Done():
				return
			case <-p.kick:
			case <-time.After(left):
			}
			if failures == 0 {
				break // a start wants a refill now; after failures, the back-off holds
			}
		}
		p.reap()
		for ctx.Err() == nil && p.quiet(ctx) {
			s, ok := p.next()
			if !ok {
				break
			}
			v, err := p.make(ctx, s)
			p.mu.Lock()
			p.filling -= s.MemoryMB
			if err == nil {
				key := s.Key()
				p.ready[key] = append(p.ready[key], v)
			}
			p.mu.Unlock()
			if err != nil {
				if !errors.Is(err, errNoTemplate) {
					failures++
					p.log.Warn("could not fill the pool", "memory_mb", s.MemoryMB, "vcpus", s.VCPUs, "error", err)
				}
				break
			}
			failures = 0
			p.log.Debug("pooled a vm", "memory_mb", s.MemoryMB, "took", v.took)
		}
	}
}

// quiet waits until no start has asked the pool for poolQuiet, and says
// whether ctx is still live.
func (p *pool) quiet(ctx context.Context) bool {
	for {
		p.mu.Lock()
		left := poolQuiet - time.Since(p.lastTake)
		p.mu.Unlock()
		if left <= 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(left):
		}
	}
}

// reap discards waiting VMs that died, and those of shapes no task asked
// for in poolIdle, so that neither holds a place, an address or memory.
func (p *pool) reap() {
	var gone []*pooled
	p.mu.Lock()
	for key, w := range p.wanted {
		if time.Since(w.last) > poolIdle && len(p.ready[key]) == 0 {
			delete(p.wanted, key) // never filled (over the cap, no template)
		}
	}
	for key, q := range p.ready {
		idle := p.wanted[key] == nil || time.Since(p.wanted[key].last) > poolIdle
		keep := q[:0]
		for _, v := range q {
			if idle || !v.m.Alive() {
				gone = append(gone, v)
			} else {
				keep = append(keep, v)
			}
		}
		p.ready[key] = keep
		if idle {
			delete(p.wanted, key)
		}
	}
	p.mu.Unlock()
	for _, v := range gone {
		p.drop(v)
	}
}

// drop stops and forgets a VM taken out of the pool that no task will get:
// one that died while it waited, or one of a shape no task asked for
// lately.
func (p *pool) drop(v *pooled) {
	if v.m.Alive() {
		p.log.Debug("stopping a pooled vm of a shape no task asked for lately", "memory_mb", v.shape.MemoryMB)
	} else {
		p.log.Warn("a pooled vm died while it waited", "dir", v.m.RunDir, "console", v.m.ConsoleTail(5))
	}
	p.discard(v)
}

// next picks a wanted shape short of its size that the memory caps
// allow, and counts its memory as being filled.
func (p *pool) next() (vm.Shape, bool) {
	avail, memErr := memAvailableMB()
	p.mu.Lock()
	defer p.mu.Unlock()
	used := p.filling
	for _, q := range p.ready {
		for _, v := range q {
			used += v.shape.MemoryMB
		}
	}
	for key, w := range p.wanted {
		s := w.shape
		if len(p.ready[key]) >= p.size || used+s.MemoryMB > p.memMB {
			continue
		}
		if memErr == nil && avail < s.MemoryMB+p.spare {
			continue
		}
		p.filling += s.MemoryMB
		return s, true
	}
	return vm.Shape{}, false
}

var errNoTemplate = errors.New("the shape's template is not ready")

// make restores a VM of shape s into a run directory of its own, with
// empty shares and an address, and warms it up.
func (p *pool) make(ctx context.Context, s vm.Shape) (_ *pooled, err error) {
	d := p.d
	snap := d.templates.get(s)
	if snap == "" {
		return nil, errNoTemplate
	}
	start := time.Now()
	var dir string
	for {
		id := make([]byte, 4)
		rand.Read(id)
		dir = filepath.Join(p.root, "pool-"+hex.EncodeToString(id))
		// A directory of its own: another VM's is never taken over.
		if err := os.Mkdir(dir, 0o700); err == nil {
			break
		} else if !os.IsExist(err) {
			return nil, err
		}
	}
	release, err := claimRunDir(&d.live, dir)
	if err != nil {
		return nil, err
	}
	v := &pooled{shape: s, dir: dir, release: release, made: start}
	defer func() {
		if err != nil {
			p.discard(v)
		}
	}()
	spec := &vm.Spec{Shape: s, RunDir: dir, Stdout: filepath.Join(dir, "pool.out"), Stderr: filepath.Join(dir, "pool.err"),
		Shares: map[string]string{}}
	for _, tag := range proto.MountTags {
		spec.Shares[tag] = shareRoot(dir, tag)
		if err := os.MkdirAll(filepath.Join(spec.Shares[tag], shareSub), 0o755); err != nil {
			return nil, err
		}
	}
	if err := privateShares(dir); err != nil {
		return nil, err
	}
	if d.net != nil {
		if v.lease, err = d.net.allocate(ctx); err != nil {
			return nil, err
		}
		spec.Tap, spec.MAC = v.lease.Tap, v.lease.MAC
	}
	if v.m, err = d.backend.Restore(spec, snap); err != nil {
		return nil, err
	}
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	events := v.m.Events(wctx)
	if v.ctl, err = v.m.DialCtl(wctx); err != nil {
		return nil, err
	}
	// The connection stays open while the VM waits: with no client on
	// its control port the guest would poll it.
	if err := v.ctl.Send(d.warmup(v.lease)); err != nil {
		return nil, err
	}
	if _, err := vm.WaitEvent(wctx, v.m, events, proto.EvWarmed); err != nil {
		return nil, fmt.Errorf("warming up: %w", err)
	}
	v.took = time.Since(start)
	return v, nil
}

// warmup is what a pooled VM does before it has a task.
func (d *Driver) warmup(ls *lease) *proto.Assignment {
	a := &proto.Assignment{Warm: true, Entropy: entropySeed(), Mounts: proto.MountTags}
	d.withLease(a, ls)
	return a
}

// discard stops a pooled VM and gives back all it held.
func (p *pool) discard(v *pooled) {
	if v.ctl != nil {
		v.ctl.Close()
	}
	if v.m != nil {
		v.m.Kill()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		v.m.Wait(ctx)
		cancel()
	}
	if v.lease != nil && p.d.net != nil {
		p.d.net.release(v.lease)
	}
	if v.dir != "" {
		p.d.removeRunDir(v.dir)
	}
	if v.release != nil {
		v.release()
	}
}

// drain stops every waiting VM (the plugin is shutting down: nobody
// would hand them a task).
func (p *pool) drain() {
	p.mu.Lock()
	all := p.ready
	p.ready = map[string][]*pooled{}
	p.mu.Unlock()
	for _, q := range all {
		for _, v := range q {
			p.discard(v)
		}
	}
}

// attribute is the fingerprint's word on the pool: its configuration,
// which changes only with the plugin's (a count that changed at every
// start would make every fingerprint a node update).
func (p *pool) attribute() string {
	if p == nil {
		return "off"
	}
	return fmt.Sprintf("size %d, %d MiB", p.size, p.memMB)
}

// status says how many VMs wait, and the hits and misses so far.
func (p *pool) status() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, q := range p.ready {
		n += len(q)
	}
	return fmt.Sprintf("%d ready (%d hits, %d misses)", n, p.hits, p.misses)
}

// memAvailableMB is the host's MemAvailable.
func memAvailableMB() (int, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(rest), " kB"))
			return kb / 1024, err
		}
	}
	return 0, errors.New("no MemAvailable in /proc/meminfo")
}
