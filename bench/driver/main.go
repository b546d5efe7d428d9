// Command driver measures worker VM start-up and memory against baselines
// run in the same process: a plain fork/exec of the same program, and QEMU
// starting with no guest at all. It prints one name=value line per figure;
// `make bench-driver` runs it.
package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/cohort-dev/cohort/driver/vm/vmtest"
)

var (
	runs      = flag.Int("n", 20, "runs per figure")
	idleVM    = flag.Int("idle", 16, "VMs kept up for the memory figures")
	breakdown = flag.Bool("breakdown", false, "print where one idle VM's resident memory is, by mapping")
	many      = flag.Int("many", 16, "VMs restored at once for the scale figure")
	ksmWait   = flag.Duration("ksm", 0, "also measure idle PSS after this long with KSM on (0: skip)")
	tbSize    = flag.Int("tb-size", 0, "TCG translation cache in MiB (0: QEMU default)")
	execOnly  = flag.Bool("exec", false, "measure only what running the program from 9p costs (exec_9p, copy_9p, exec_tmpfs)")
)

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench-driver:", err)
		os.Exit(1)
	}
}

type bench struct {
	a     vmtest.Assets
	accel string
	q     *vm.QEMU
	dir   string
}

func run() error {
	a, err := vmtest.Build()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("/tmp", "vb")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	b := &bench{a: a, q: &vm.QEMU{TBSizeMB: *tbSize}, dir: dir}
	b.accel, _ = vm.DetectAccel()
	fmt.Printf("accelerator=%s\nruns=%d\n", b.accel, *runs)

	if *execOnly {
		snap := filepath.Join(dir, "template.snap")
		if err := b.q.Snapshot(context.Background(), b.spec("tmpl"), snap); err != nil {
			return fmt.Errorf("template: %w", err)
		}
		e9, cp, et, err := b.execCost(snap)
		if err != nil {
			return err
		}
		fmt.Printf("exec_9p_p50_ms=%.1f\ncopy_9p_p50_ms=%.1f\nexec_tmpfs_p50_ms=%.1f\nexec_9p_vs_copy_and_tmpfs=%.2fx\n", e9, cp, et, e9/(cp+et))
		if st, err := os.Stat(b.a.Worker); err == nil {
			fmt.Printf("exec_program_mib=%.1f\n", float64(st.Size())/(1<<20))
		}
		return nil
	}
	proc, err := b.repeat(b.processStart)
	if err != nil {
		return fmt.Errorf("process start: %w", err)
	}
	floor, err := b.repeat(b.qemuEmpty)
	if err != nil {
		return fmt.Errorf("qemu empty guest: %w", err)
	}
	cold, err := b.repeat(func() (time.Duration, error) { return b.vmStart("") })
	if err != nil {
		return fmt.Errorf("cold boot: %w", err)
	}
	snap := filepath.Join(dir, "template.snap")
	t0 := time.Now()
	if err := b.q.Snapshot(context.Background(), b.spec("tmpl"), snap); err != nil {
		return fmt.Errorf("template: %w", err)
	}
	tmplMs := ms(time.Since(t0))
	warm, err := b.repeat(func() (time.Duration, error) { return b.vmStart(snap) })
	if err != nil {
		return fmt.Errorf("snapshot start: %w", err)
	}
	var refills, pooled []float64
	for range *runs {
		r, t, err := b.poolStart(snap)
		if err != nil {
			return fmt.Errorf("pooled start: %w", err)
		}
		refills, pooled = append(refills, ms(r)), append(pooled, ms(t))
	}
	start16, proc16, err := b.startMany(snap, *many)
	if err != nil {
		return fmt.Errorf("%d restores at once: %w", *many, err)
	}
	start16Pool, poolRSS, poolPSS, poolCPU, err := b.startManyPooled(snap, *many)
	if err != nil {
		return fmt.Errorf("%d pooled starts at once: %w", *many, err)
	}
	rss, pss, err := b.idleMemory(snap)
	if err != nil {
		return fmt.Errorf("idle memory: %w", err)
	}
	exec9p, copy9p, execTmpfs, err := b.execCost(snap)
	if err != nil {
		return fmt.Errorf("exec cost: %w", err)
	}

	p := func(name string, v float64) { fmt.Printf("%s=%.1f\n", name, v) }
	p("process_start_p50_ms", pct(proc, 50))
	p("qemu_empty_guest_p50_ms", pct(floor, 50))
	p("boot_cold_p50_ms", pct(cold, 50))
	p("boot_cold_p90_ms", pct(cold, 90))
	p("template_build_ms", tmplMs)
	p("boot_snapshot_p50_ms", pct(warm, 50))
	p("boot_snapshot_p90_ms", pct(warm, 90))
	p("boot_pool_p50_ms", pct(pooled, 50))
	p("boot_pool_p90_ms", pct(pooled, 90))
	p("pool_refill_ms", pct(refills, 50))
	p(fmt.Sprintf("start%d_snapshot_ms", *many), start16)
	p(fmt.Sprintf("start%d_pool_ms", *many), start16Pool)
	p(fmt.Sprintf("start%d_process_ms", *many), proc16)
	fmt.Printf("start%d_snapshot_vs_process=%.2fx\n", *many, start16/proc16)
	fmt.Printf("start%d_pool_vs_process=%.2fx\n", *many, start16Pool/proc16)
	p("pool_vm_rss_mib", poolRSS)
	p("pool_vm_pss_mib", poolPSS)
	p("pool_vm_idle_cpu_pct", poolCPU)
	p("idle_vm_rss_mib", rss)
	p("idle_vm_pss_mib", pss)
	p("exec_9p_p50_ms", exec9p)
	p("copy_9p_p50_ms", copy9p)
	p("exec_tmpfs_p50_ms", execTmpfs)
	fmt.Printf("exec_9p_vs_copy_and_tmpfs=%.2fx\n", exec9p/(copy9p+execTmpfs))
	fmt.Printf("boot_snapshot_vs_qemu_empty=%.2fx\n", pct(warm, 50)/pct(floor, 50))
	fmt.Printf("boot_snapshot_vs_process_start=%.2fx\n", pct(warm, 50)/pct(proc, 50))
	fmt.Printf("boot_cold_vs_boot_snapshot=%.2fx\n", pct(cold, 50)/pct(warm, 50))
	fmt.Printf("boot_pool_vs_qemu_empty=%.2fx\n", pct(pooled, 50)/pct(floor, 50))
	fmt.Printf("boot_snapshot_vs_boot_pool=%.2fx\n", pct(warm, 50)/pct(pooled, 50))
	goal := func(name string, ok bool) {
		v := "missed"
		if ok {
			v = "met"
		}
		fmt.Printf("goal_%s=%s\n", name, v)
	}
	goal("boot_snapshot_le_60ms", pct(warm, 50) <= 60)
	goal("boot_pool_le_60ms", pct(pooled, 50) <= 60)
	goal("boot_cold_le_400ms", pct(cold, 50) <= 400)
	goal("idle_rss_le_40mib", rss <= 40)
	goal("idle_pss_le_15mib", pss <= 15)
	return nil
}

func (b *bench) repeat(f func() (time.Duration, error)) ([]float64, error) {
	var out []float64
	for i := 0; i < *runs; i++ {
		d, err := f()
		if err != nil {
			return nil, err
		}
		out = append(out, ms(d))
	}
	return out, nil
}

// processStart is the baseline: fork/exec of the worker program to its exit.
func (b *bench) processStart() (time.Duration, error) {
	t0 := time.Now()
	err := exec.Command(b.a.Worker, "exit", "0").Run()
	return time.Since(t0), err
}

// qemuEmpty is the VMM floor: QEMU with the same machine and devices but no
// guest code run (-S), from exec until it answers QMP, then quit.
func (b *bench) qemuEmpty() (time.Duration, error) {
	spec := b.spec("floor")
	args := append(b.q.Args(spec, ""), "-S")
	t0 := time.Now()
	cmd := exec.Command("qemu-system-x86_64", args...)
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	defer cmd.Wait()
	m := &vm.Machine{PID: cmd.Process.Pid, RunDir: spec.RunDir}
	if err := vm.QMPQuit(m.QMPSocket()); err != nil {
		cmd.Process.Kill()
		return 0, err
	}
	d := time.Since(t0)
	return d, nil
}

var seq int

// spec is a fresh VM spec with its own run and task directories, laid out
// as the VM tests lay theirs out.
func (b *bench) spec(name string) *vm.Spec {
	seq++
	s, err := vmtest.NewSpec(filepath.Join(b.dir, fmt.Sprintf("%s%d", name, seq)), b.a, b.accel)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-driver:", err)
		os.Exit(1)
	}
	return s
}

// vmStart times what StartTask does: start (or restore) a VM, hand it its
// assignment, until the guest reports the program running.
func (b *bench) vmStart(snapshot string, args ...string) (time.Duration, error) {
	if len(args) == 0 {
		args = []string{"exit", "0"}
	}
	spec := b.spec("vm")
	t0 := time.Now()
	m, err := b.boot(spec, snapshot)
	if err != nil {
		return 0, err
	}
	defer func() { m.Kill(); m.Wait(context.Background()); os.RemoveAll(filepath.Dir(spec.RunDir)) }()
	if err := b.assign(m, args); err != nil {
		return 0, err
	}
	return time.Since(t0), nil
}

func (b *bench) boot(spec *vm.Spec, snapshot string) (*vm.Machine, error) {
	if snapshot != "" {
		return b.q.Restore(spec, snapshot)
	}
	return b.q.Boot(spec)
}

func (b *bench) assign(m *vm.Machine, args []string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	events := m.Events(ctx)
	ctl, err := m.DialCtl(ctx)
	if err != nil {
		return err
	}
	defer ctl.Close()
	seed := make([]byte, 32)
	rand.Read(seed)
	if err := ctl.Send(&proto.Assignment{
		Hostname: "bench", Entropy: seed, UnixNano: time.Now().UnixNano(),
		Mounts: proto.MountTags, Program: "/local/worker", Args: args,
	}); err != nil {
		return err
	}
	_, err = vm.WaitEvent(ctx, m, events, proto.EvStarted)
	return err
}

// startMany restores n VMs at once, as a gang of n workers lands on one
// node, and times until every program runs (median of 3 rounds); the
// baseline is n processes started at once, to their exit (a process's
// start is the figure; the worker exits at once).
func (b *bench) startMany(snap string, n int) (float64, float64, error) {
	var vms, procs []float64
	for range 3 {
		type started struct {
			m    *vm.Machine
			spec *vm.Spec
			err  error
		}
		t0 := time.Now()
		out := make(chan started, n)
		for range n {
			spec := b.spec("many")
			go func() {
				m, err := b.q.Restore(spec, snap)
				if err == nil {
					if err = b.assign(m, []string{"exit", "0"}); err != nil {
						err = fmt.Errorf("%w; console: %s", err, m.ConsoleTail(10))
					}
				}
				out <- started{m, spec, err}
			}()
		}
		var all []started
		var failed []error
		for range n {
			st := <-out
			all = append(all, st)
			if st.err != nil {
				failed = append(failed, st.err)
			}
		}
		d := time.Since(t0)
		// Every VM is gone before the next figure is timed.
		for _, st := range all {
			if st.m != nil {
				st.m.Kill()
				st.m.Wait(context.Background())
			}
			os.RemoveAll(filepath.Dir(st.spec.RunDir))
		}
		if len(failed) > 0 {
			return 0, 0, fmt.Errorf("%d of %d failed; first: %w", len(failed), n, failed[0])
		}
		vms = append(vms, ms(d))

		t0 = time.Now()
		cmds := make([]*exec.Cmd, n)
		for i := range cmds {
			cmds[i] = exec.Command(b.a.Worker, "exit", "0")
			if err := cmds[i].Start(); err != nil {
				return 0, 0, err
			}
		}
		for _, c := range cmds {
			if err := c.Wait(); err != nil {
				return 0, 0, err
			}
		}
		procs = append(procs, ms(time.Since(t0)))
	}
	return pct(vms, 50), pct(procs, 50), nil
}

// idleMemory restores n VMs running an idle program and reports the median
// RSS and PSS of their VMM processes.
func (b *bench) idleMemory(snap string) (float64, float64, error) {
	var ms []*vm.Machine
	defer func() {
		for _, m := range ms {
			m.Kill()
		}
	}()
	for i := 0; i < *idleVM; i++ {
		spec := b.spec("idle")
		m, err := b.q.Restore(spec, snap)
		if err != nil {
			return 0, 0, err
		}
		ms = append(ms, m)
		if err := b.assign(m, []string{"sleep"}); err != nil {
			return 0, 0, err
		}
	}
	time.Sleep(2 * time.Second)
	if *breakdown {
		if err := printBreakdown(ms[0].PID); err != nil {
			return 0, 0, err
		}
	}
	var rss, pss []float64
	for _, m := range ms {
		r, p, err := smapsRollup(m.PID)
		if err != nil {
			return 0, 0, err
		}
		rss, pss = append(rss, r), append(pss, p)
	}
	if *ksmWait > 0 {
		if err := ksmFigures(ms, *ksmWait); err != nil {
			return 0, 0, fmt.Errorf("ksm: %w", err)
		}
	}
	return pct(rss, 50), pct(pss, 50), nil
}

// ksmFigures turns on the kernel's same-page merging for wait (QEMU marks
// guest RAM mergeable), then reports the idle VMs' PSS again and the pages
// merged; the host's KSM settings are put back afterwards.
func ksmFigures(ms []*vm.Machine, wait time.Duration) error {
	const dir = "/sys/kernel/mm/ksm/"
	knobs := map[string]string{"run": "1", "pages_to_scan": "5000", "sleep_millisecs": "10"}
	for k, v := range knobs {
		old, err := os.ReadFile(dir + k)
		if err != nil {
			return err
		}
		defer os.WriteFile(dir+k, old, 0o644)
		if err := os.WriteFile(dir+k, []byte(v), 0o644); err != nil {
			return err
		}
	}
	time.Sleep(wait)
	var pss []float64
	for _, m := range ms {
		_, p, err := smapsRollup(m.PID)
		if err != nil {
			return err
		}
		pss = append(pss, p)
	}
	sharing, _ := os.ReadFile(dir + "pages_sharing")
	fmt.Printf("idle_vm_pss_ksm_mib=%.1f\nksm_pages_sharing=%s\n", pct(pss, 50), strings.TrimSpace(string(sharing)))
	return nil
}

// printBreakdown prints an idle VMM's resident memory by kind of mapping
// (guest RAM, TCG's translation cache, QEMU's heap, libraries), as
// breakdown_<kind>_{rss,pss}_mib lines: where the figure above goes.
func printBreakdown(pid int) error {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps")
	if err != nil {
		return err
	}
	defer f.Close()
	type use struct{ rss, pss float64 }
	by := map[string]*use{}
	kind := "other"
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 {
			continue
		}
		if strings.Contains(fs[0], "-") && len(fs) >= 5 {
			// A mapping's header: address perms offset dev inode [path].
			path := ""
			if len(fs) >= 6 {
				path = fs[5]
			}
			switch {
			case strings.HasSuffix(path, ".ram"):
				kind = "guest_ram"
			case path == "[heap]":
				kind = "heap"
			case strings.Contains(path, ".so"), strings.Contains(path, "qemu-system"):
				kind = "code"
			case path == "" && strings.Contains(fs[1], "x"):
				kind = "tcg_cache" // TCG's code buffer: anonymous, executable
			case path == "":
				kind = "anon"
			default:
				kind = "other"
			}
			if by[kind] == nil {
				by[kind] = &use{}
			}
			continue
		}
		kb, _ := strconv.ParseFloat(fs[1], 64)
		switch fs[0] {
		case "Rss:":
			by[kind].rss += kb / 1024
		case "Pss:":
			by[kind].pss += kb / 1024
		}
	}
	kinds := make([]string, 0, len(by))
	for k := range by {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	for _, k := range kinds {
		fmt.Printf("breakdown_%s_rss_mib=%.1f\nbreakdown_%s_pss_mib=%.1f\n", k, by[k].rss, k, by[k].pss)
	}
	return sc.Err()
}

// smapsRollup returns a process's RSS and PSS in MiB.
func smapsRollup(pid int) (float64, float64, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	var rss, pss float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(fs[1], 64)
		switch fs[0] {
		case "Rss:":
			rss = kb / 1024
		case "Pss:":
			pss = kb / 1024
		}
	}
	return rss, pss, sc.Err()
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func pct(v []float64, p int) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := (len(s)*p + 99) / 100
	if i > 0 {
		i--
	}
	return s[i]
}

// execCost measures, in restored VMs, what running a program from its 9p
// share costs against first copying it into the guest's tmpfs and running
// it from there: whether taking the program off 9p on the start path
// would pay. Medians over the runs.
func (b *bench) execCost(snap string) (exec9p, copy9p, execTmpfs float64, err error) {
	var e9, cp, et []float64
	for range *runs {
		spec := b.spec("exec")
		worker, err := os.ReadFile(b.a.Worker)
		if err != nil {
			return 0, 0, 0, err
		}
		for _, n := range []string{"a", "b"} {
			if err := os.WriteFile(filepath.Join(spec.Shares["local"], n), worker, 0o755); err != nil {
				return 0, 0, 0, err
			}
		}
		m, err := b.boot(spec, snap)
		if err != nil {
			return 0, 0, 0, err
		}
		err = b.assign(m, []string{"execcost", "/local/a", "/local/b"})
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			err = m.Wait(ctx)
			cancel()
		}
		m.Kill()
		if err != nil {
			return 0, 0, 0, err
		}
		out, _ := os.ReadFile(spec.Stdout)
		var a, c, t float64
		var n int
		if _, err := fmt.Sscanf(string(out), "exec_9p_ms=%f copy_9p_ms=%f exec_tmpfs_ms=%f bytes=%d", &a, &c, &t, &n); err != nil {
			errOut, _ := os.ReadFile(spec.Stderr)
			return 0, 0, 0, fmt.Errorf("worker printed %q (stderr %q): %w", out, errOut, err)
		}
		e9, cp, et = append(e9, a), append(cp, c), append(et, t)
		os.RemoveAll(filepath.Dir(spec.RunDir))
	}
	return pct(e9, 50), pct(cp, 50), pct(et, 50), nil
}
