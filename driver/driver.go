package driver

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/driver/guest/initramfs"
	"github.com/cohort-dev/cohort/driver/guest/proto"
	"github.com/cohort-dev/cohort/driver/vfio"
	"github.com/cohort-dev/cohort/driver/vm"
	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/version"
	"github.com/hashicorp/go-hclog"
	cstructs "github.com/hashicorp/nomad/client/structs"
	"github.com/hashicorp/nomad/drivers/shared/eventer"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/drivers"
	"github.com/hashicorp/nomad/plugins/shared/hclspec"
	pstructs "github.com/hashicorp/nomad/plugins/shared/structs"
	"golang.org/x/sys/unix"
)

const (
	fingerprintPeriod = 30 * time.Second
	// assignTimeout bounds a cold boot under software emulation on a busy
	// node; a snapshot restore takes its assignment in milliseconds.
	assignTimeout = 2 * time.Minute
	// taskHandleVersion is the version of taskState saved in task handles.
	taskHandleVersion = 1
)

var pluginInfo = &base.PluginInfoResponse{
	Type:              base.PluginTypeDriver,
	PluginApiVersions: []string{drivers.ApiVersion010},
	PluginVersion:     version.Version,
	Name:              PluginName,
}

var capabilities = &drivers.Capabilities{
	SendSignals: true,
	Exec:        false,
	FSIsolation: drivers.FSIsolationImage,
	NetIsolationModes: []drivers.NetIsolationMode{
		drivers.NetIsolationModeHost,
		drivers.NetIsolationModeTask,
	},
	MountConfigs: drivers.MountConfigSupportNone,
}

// Driver is the microvm task driver: every task is a worker VM.
type Driver struct {
	eventer *eventer.Eventer
	ctx     context.Context
	cancel  context.CancelFunc
	log     hclog.Logger

	mu       sync.RWMutex
	config   *Config
	backend  vm.Backend
	accel    string
	accelWhy string
	initrd   string
	kernel   string
	// ptKernel and ptInitrd boot VMs given devices (the passthrough
	// config; the defaults without one).
	ptKernel, ptInitrd string
	kernelVer          string
	kernelDigest       string // the kernel's contents, for template keys
	templates          *templates
	pool               *pool // nil without a pool
	net                *network
	setupErr           error
	// cohortTLS reaches cohort servers over HTTPS with this node's
	// certificate; nil for plain HTTP. clients keeps one client per
	// server, so connections (and TLS sessions) are reused.
	cohortTLS *tls.Config
	clients   sync.Map

	tasks sync.Map // task ID -> *taskHandle
	// live holds the run directories of VMs being started and templates
	// being built: the orphan collector leaves them alone, as it leaves
	// the tasks'.
	live sync.Map // run directory -> struct{}
}

var _ drivers.DriverPlugin = (*Driver)(nil)

// New returns the driver, unconfigured until SetConfig.
func New(log hclog.Logger) *Driver {
	ctx, cancel := context.WithCancel(context.Background())
	log = log.Named(PluginName)
	return &Driver{eventer: eventer.NewEventer(ctx, log), ctx: ctx, cancel: cancel, log: log}
}

func (d *Driver) PluginInfo() (*base.PluginInfoResponse, error) { return pluginInfo, nil }
func (d *Driver) ConfigSchema() (*hclspec.Spec, error)          { return configSpec, nil }
func (d *Driver) TaskConfigSchema() (*hclspec.Spec, error)      { return taskConfigSpec, nil }
func (d *Driver) Capabilities() (*drivers.Capabilities, error)  { return capabilities, nil }

// SetConfig prepares everything a start needs, so StartTask does no
// one-time work: the initramfs, the accelerator choice, the network, and
// the template for the default shape.
func (d *Driver) SetConfig(c *base.Config) error {
	var cfg Config
	if len(c.PluginConfig) != 0 {
		if err := base.MsgPackDecode(c.PluginConfig, &cfg); err != nil {
			return fmt.Errorf("decoding microvm plugin config: %w", err)
		}
	}
	if !cfg.configured() {
		d.log.Info("microvm driver not configured: set kernel and init in its plugin block")
		return nil
	}
	if err := cfg.validate(); err != nil {
		return fmt.Errorf("microvm plugin config: %w", err)
	}
	if c.AgentConfig == nil || c.AgentConfig.Driver == nil {
		// The agent's plugin loader checks the configuration on an
		// instance it kills right after, and gives it no agent config:
		// building templates or touching the host's network from it
		// would leave orphans (a template VM the next instance races)
		// behind.
		return nil
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.config != nil {
		// Setup starts what lives as long as the plugin (the network,
		// the pool, the collector); a second one would start them twice
		// over the same state. Nomad configures an instance once.
		return errors.New("the microvm plugin is already configured; restart the agent to change its configuration")
	}
	d.config = &cfg
	d.backend = &vm.QEMU{Binary: cfg.QEMU}
	d.setupErr = d.setup(&cfg)
	if d.setupErr != nil {
		d.log.Error("microvm driver is unhealthy", "error", d.setupErr)
	}
	return nil
}

func (d *Driver) setup(cfg *Config) error {
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "run"), 0o700); err != nil {
		return fmt.Errorf("creating state dir: %w", err)
	}
	// Resolved once: run directories are matched against the kernel's
	// mount table, which lists real paths.
	state, err := filepath.EvalSymlinks(cfg.StateDir)
	if err == nil {
		state, err = filepath.Abs(state)
	}
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	if len(state) > 60 {
		return fmt.Errorf("state_dir %q resolves to %q, too long for unix socket paths (at most 60 bytes)", cfg.StateDir, state)
	}
	cfg.StateDir = state
	kernel, err := filepath.EvalSymlinks(cfg.Kernel)
	if err != nil {
		return fmt.Errorf("guest kernel: %w", err)
	}
	d.kernel = kernel
	if d.kernelVer, d.kernelDigest, err = vm.KernelInfo(kernel); err != nil {
		return fmt.Errorf("guest kernel %s: %w", kernel, err)
	}
	if err := d.backend.Check(); err != nil {
		return err
	}
	// Checked here, once: a dynamically linked init would make every
	// guest panic at boot ("No working init found").
	if err := checkStatic(cfg.Init, cfg.Init); err != nil {
		return fmt.Errorf("guest init: %w", err)
	}
	if d.initrd, err = buildInitrd(cfg.Init, cfg.StateDir); err != nil {
		return err
	}
	d.ptKernel, d.ptInitrd = d.kernel, d.initrd
	if pt := cfg.Passthrough; pt.Kernel != "" || len(pt.Modules) > 0 {
		if pt.Kernel != "" {
			if d.ptKernel, err = filepath.EvalSymlinks(pt.Kernel); err != nil {
				return fmt.Errorf("passthrough kernel: %w", err)
			}
		}
		if d.ptInitrd, err = buildInitrd(cfg.Init, cfg.StateDir, pt.Modules...); err != nil {
			return err
		}
	}
	switch cfg.Accelerator {
	case "kvm":
		if a, why := vm.DetectAccel(); a != "kvm" {
			return fmt.Errorf("accelerator = \"kvm\" but this host cannot use it: %s", why)
		}
		d.accel, d.accelWhy = "kvm", "configured"
	case "tcg":
		d.accel, d.accelWhy = "tcg", "configured"
	default:
		d.accel, d.accelWhy = vm.DetectAccel()
	}
	var node string
	if t := cfg.TLS; t.CAFile != "" || t.CertFile != "" {
		b, err := tlsutil.Load(tlsutil.Files{CAFile: t.CAFile, CertFile: t.CertFile, KeyFile: t.KeyFile})
		if err != nil {
			return fmt.Errorf("tls: %w", err)
		}
		if node = b.Node(); node == "" {
			return fmt.Errorf("tls: %s is not a node's certificate: it must name <nomad node name>%s (cohort tls cert create -node)", t.CertFile, tlsutil.NodeSuffix)
		}
		d.cohortTLS = b.ClientConfig()
	}
	d.templates = newTemplates(d.ctx, cfg.StateDir, d.backend, d.shape(DefaultMemoryMB, 1, d.accel).Build(), d.log)
	d.templates.live = &d.live
	if cfg.Network.enabled() {
		d.net = newNetwork(cfg.Network, cfg.CohortServers, cfg.StateDir, d.log.Named("network"))
		d.net.client, d.net.certNode = d.cohortClient, node
		if err := d.net.start(d.ctx); err != nil {
			return fmt.Errorf("network: %w", err)
		}
	}
	if cfg.Snapshot {
		d.templates.get(d.shape(DefaultMemoryMB, 1, d.accel))
		if cfg.Pool.Size > 0 {
			d.pool = newPool(d, cfg.Pool, filepath.Join(cfg.StateDir, "run"))
			go d.pool.run(d.ctx)
		}
	}
	go d.collectOrphans(filepath.Join(cfg.StateDir, "run"))
	return nil
}

// cohortClient is a client for one cohort server, over TLS with this
// node's certificate where the servers speak it.
func (d *Driver) cohortClient(server string) *api.Client {
	if c, ok := d.clients.Load(server); ok {
		return c.(*api.Client)
	}
	c, _ := d.clients.LoadOrStore(server, api.NewClient(api.Config{Address: server, Timeout: 10 * time.Second, TLS: d.cohortTLS}))
	return c.(*api.Client)
}

// DefaultMemoryMB is the shape warmed at start-up, matching the job spec's
// default worker memory.
const DefaultMemoryMB = 128

func (d *Driver) shape(memMB, vcpus int, accel string) vm.Shape {
	return vm.Shape{Kernel: d.kernel, KernelDigest: d.kernelDigest, Initrd: d.initrd, MemoryMB: memMB, VCPUs: vcpus, Accel: accel}
}

// buildInitrd packs the init, and kernel modules for the init to load in
// the order given, into an initramfs named by its content hash, so a new
// init never reuses the snapshots of an old one.
func buildInitrd(initPath, stateDir string, modules ...string) (string, error) {
	b, err := os.ReadFile(initPath)
	if err != nil {
		return "", fmt.Errorf("guest init: %w", err)
	}
	h := sha256.New()
	h.Write(b)
	var mods []initramfs.Module
	for i, m := range modules {
		data, err := os.ReadFile(m)
		if err != nil {
			return "", fmt.Errorf("passthrough module: %w", err)
		}
		// The number keeps the configured order; the init loads by name.
		mods = append(mods, initramfs.Module{Name: fmt.Sprintf("%03d-%s", i, filepath.Base(m)), Data: data})
		h.Write([]byte(mods[i].Name))
		h.Write(data)
	}
	sum := h.Sum(nil)
	path := filepath.Join(stateDir, "initrd-"+hex.EncodeToString(sum[:8])+".gz")
	if _, err := os.Stat(path); err == nil {
		return path, nil
	}
	img, err := initramfs.Build(b, mods...)
	if err != nil {
		return "", err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, img, 0o644); err != nil {
		return "", fmt.Errorf("writing initramfs: %w", err)
	}
	return path, os.Rename(tmp, path)
}

func (d *Driver) Fingerprint(ctx context.Context) (<-chan *drivers.Fingerprint, error) {
	ch := make(chan *drivers.Fingerprint)
	go func() {
		defer close(ch)
		t := time.NewTimer(0)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-d.ctx.Done():
				return
			case <-t.C:
			}
			fp := d.fingerprint()
			// While a template builds or the network waits for its
			// subnet, report again soon: the node's attributes show when
			// they are ready.
			if a, n := fp.Attributes["driver.microvm.snapshot"], fp.Attributes["driver.microvm.network"]; (a != nil && a.GoString() == "building") ||
				(n != nil && strings.HasPrefix(n.GoString(), "waiting")) {
				t.Reset(time.Second)
			} else {
				t.Reset(fingerprintPeriod)
			}
			select {
			case ch <- fp:
			case <-ctx.Done():
				return
			}
		}
	}()
	return ch, nil
}

func (d *Driver) fingerprint() *drivers.Fingerprint {
	d.mu.RLock()
	defer d.mu.RUnlock()
	if d.config == nil {
		return &drivers.Fingerprint{Health: drivers.HealthStateUndetected, HealthDescription: "not configured"}
	}
	if d.setupErr != nil {
		return &drivers.Fingerprint{Health: drivers.HealthStateUnhealthy, HealthDescription: d.setupErr.Error()}
	}
	if _, err := os.Stat(d.kernel); err != nil {
		return &drivers.Fingerprint{Health: drivers.HealthStateUnhealthy, HealthDescription: "guest kernel missing: " + err.Error()}
	}
	snap := "disabled"
	if d.config.Snapshot {
		snap = d.templates.status()
	}
	attrs := map[string]*pstructs.Attribute{
		"driver.microvm":                pstructs.NewBoolAttribute(true),
		"driver.microvm.backend":        pstructs.NewStringAttribute(d.backend.Name()),
		"driver.microvm.accelerator":    pstructs.NewStringAttribute(d.accel),
		"driver.microvm.qemu_version":   pstructs.NewStringAttribute(d.backend.Version()),
		"driver.microvm.kernel_version": pstructs.NewStringAttribute(d.kernelVer),
		"driver.microvm.snapshot":       pstructs.NewStringAttribute(snap),
		"driver.microvm.pool":           pstructs.NewStringAttribute(d.pool.attribute()),
	}
	if d.net != nil {
		attrs["driver.microvm.network"] = pstructs.NewStringAttribute(d.net.Status())
	}
	return &drivers.Fingerprint{
		Attributes:        attrs,
		Health:            drivers.HealthStateHealthy,
		HealthDescription: fmt.Sprintf("ready (%s: %s)", d.accel, d.accelWhy),
	}
}

// taskState is what a task handle saves for RecoverTask.
type taskState struct {
	Machine   vm.Machine
	Lease     *lease
	StartedAt time.Time
	Snapshot  bool
}

var runDirName = regexp.MustCompile(`[^a-zA-Z0-9]+`)

// startPlan is a start decided and checked: what prepare hands launch.
type startPlan struct {
	cfg         *drivers.TaskConfig
	conf        *Config
	tc          TaskConfig
	accel       string
	gang        bool
	gangTimeout time.Duration
	devices     []string // PCI devices passed through, checked and bound
	program     string   // the program's path in the guest
	spec        *vm.Spec
	useSnap     bool
}

// StartTask prepares the start, then launches it.
func (d *Driver) StartTask(cfg *drivers.TaskConfig) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	p, err := d.prepare(cfg)
	if err != nil {
		return nil, nil, err
	}
	return d.launch(p)
}

// prepare decodes and checks a task, checks its devices, and stages its
// program in the task's own directory; it makes nothing of its own on the
// host (no run directory, tap or VM), so a refusal leaves nothing behind.
func (d *Driver) prepare(cfg *drivers.TaskConfig) (*startPlan, error) {
	if _, ok := d.tasks.Load(cfg.ID); ok {
		return nil, fmt.Errorf("task %s is already started", cfg.ID)
	}
	d.mu.RLock()
	conf, setupErr := d.config, d.setupErr
	d.mu.RUnlock()
	if conf == nil {
		return nil, errors.New("microvm driver is not configured")
	}
	if setupErr != nil {
		return nil, fmt.Errorf("microvm driver is unhealthy: %w", setupErr)
	}
	p := &startPlan{cfg: cfg, conf: conf}
	if err := cfg.DecodeDriverConfig(&p.tc); err != nil {
		return nil, fmt.Errorf("decoding task config: %w", err)
	}
	var err error
	if p.accel, err = d.taskAccel(p.tc.Accelerator); err != nil {
		return nil, err
	}
	mem := int(cfg.Resources.NomadResources.Memory.MemoryMB)
	if mem < MinMemoryMB {
		return nil, fmt.Errorf("memory = %d MiB is too small for a worker VM; it needs at least %d MiB", mem, MinMemoryMB)
	}
	if p.tc.VCPUs == 0 {
		// A config that did not pass through the HCL spec's default
		// (the spec's own default is 1).
		p.tc.VCPUs = 1
	}
	if p.tc.VCPUs < 1 || p.tc.VCPUs > 64 {
		return nil, fmt.Errorf("vcpus = %d: want 1 to 64", p.tc.VCPUs)
	}
	p.gang, p.gangTimeout = gangTask(cfg.Env)
	if p.gang && len(conf.CohortServers) == 0 {
		return nil, fmt.Errorf("job %s is a cohort gang, but this node's microvm driver has no cohort_servers configured to hold its workers at the start barrier; refusing to run one worker of it alone", cfg.JobID)
	}
	// Devices come only from the device plugin's part of the
	// environment: a job's own env cannot name host devices. Their
	// IOMMU groups are checked (and bound to vfio-pci where allowed,
	// rolled back on failure) here: the devices are this task's by
	// reservation, and a host that cannot pass them through refuses
	// before anything else is made.
	if v := cfg.DeviceEnv[vfio.DevicesEnv]; v != "" {
		addrs, err := vfio.ParseDevices(v)
		if err != nil {
			return nil, fmt.Errorf("reserved devices: %w", err)
		}
		plan, err := vfio.Prepare(vfio.Default, addrs, conf.VFIOBind)
		if err != nil {
			return nil, fmt.Errorf("passing %s through to the worker VM: %w", strings.Join(addrs, ", "), err)
		}
		p.devices = plan.Devices
	}
	td := cfg.TaskDir()
	if p.program, err = stageProgram(p.tc.Program, td.Dir, td.LocalDir); err != nil {
		return nil, err
	}
	name := runDirName.ReplaceAllString(cfg.Name, "")
	if len(name) > 12 {
		name = name[:12]
	}
	p.spec = &vm.Spec{
		Shape:  d.shape(mem, p.tc.VCPUs, p.accel),
		RunDir: filepath.Join(conf.StateDir, "run", cfg.AllocID[:8]+"-"+name),
		Stdout: cfg.StdoutPath,
		Stderr: cfg.StderrPath,
		Shares: map[string]string{"alloc": td.SharedAllocDir, "local": td.LocalDir, "secrets": td.SecretsDir},
	}
	p.useSnap = conf.Snapshot
	if p.tc.Snapshot != nil {
		p.useSnap = *p.tc.Snapshot
	}
	if len(p.devices) > 0 {
		p.useSnap = false // a device's state is not in any template
		p.spec.PCI = p.devices
		p.spec.Shape.Kernel, p.spec.Shape.Initrd = d.ptKernel, d.ptInitrd
	}
	return p, nil
}

// undo is a cleanup stack: what a launch made, undone in reverse order
// when a later step fails.
type undo []func()

func (u *undo) push(f func()) { *u = append(*u, f) }
func (u *undo) run() {
	for i := len(*u) - 1; i >= 0; i-- {
		(*u)[i]()
	}
}

// launch makes what a prepared start needs on the host, boots or restores
// the VM and hands it its assignment; a failure at any step undoes every
// step before it.
func (d *Driver) launch(p *startPlan) (_ *drivers.TaskHandle, _ *drivers.DriverNetwork, err error) {
	cfg, spec := p.cfg, p.spec
	if p.useSnap && len(spec.PCI) == 0 && d.pool != nil {
		if v := d.pool.take(spec.Shape); v != nil {
			h, n, assigned, err := d.launchPooled(p, v)
			if err == nil || assigned {
				return h, n, err
			}
			// The task was never handed to the pooled VM: a restore
			// can still start it.
			d.log.Warn("could not start a task in a pooled vm; restoring one instead", "task", cfg.Name, "alloc", cfg.AllocID, "error", err)
		}
	}
	if err := removeRunDir(spec.RunDir); err != nil { // a previous attempt of the same alloc
		return nil, nil, err
	}
	// From here the run directory is this start's, until the task is
	// stored or the start fails: the orphan collector must not take a VM
	// that takes long to boot for one no task owns.
	releaseDir, err := claimRunDir(&d.live, spec.RunDir)
	if err != nil {
		return nil, nil, err
	}
	defer releaseDir()
	var u undo
	defer func() {
		if err != nil {
			u.run()
		}
	}()
	u.push(func() { d.removeRunDir(spec.RunDir) })
	var ls *lease
	if d.net != nil {
		if ls, err = d.net.allocate(d.ctx); err != nil {
			return nil, nil, err
		}
		u.push(func() { d.net.release(ls) })
		spec.Tap, spec.MAC = ls.Tap, ls.MAC
	}

	start := time.Now()
	var m *vm.Machine
	snapPath := ""
	if p.useSnap {
		snapPath = d.templates.get(spec.Shape)
	}
	if snapPath != "" {
		m, err = d.backend.Restore(spec, snapPath)
	} else {
		m, err = d.backend.Boot(spec)
	}
	if err != nil {
		return nil, nil, err
	}
	h := newTaskHandle(d, cfg, m, ls)
	h.snapshot = snapPath != ""
	if err = d.handOver(p, h, start, &u, ""); err != nil {
		return nil, nil, err
	}
	how := "cold-booted"
	if h.snapshot {
		how = "restored from snapshot"
	}
	if len(spec.PCI) > 0 {
		how += " with " + strings.Join(spec.PCI, ", ") + " passed through"
	}
	return d.commit(p, h, how)
}

// launchPooled hands a waiting VM its task: the task's directories
// mounted into its shares, its output sent to the task's log fifos, its
// identity and program. A failure stops the VM rather than returning it
// to the pool: it may hold part of the task. assigned says whether the
// assignment was sent: until then the caller may start the task another
// way.
func (d *Driver) launchPooled(p *startPlan, v *pooled) (_ *drivers.TaskHandle, _ *drivers.DriverNetwork, assigned bool, err error) {
	cfg, spec := p.cfg, p.spec
	start := time.Now()
	// The run directory stays claimed until the task is stored.
	release := v.release
	v.release = nil
	defer release()
	var u undo
	defer func() {
		if err != nil {
			u.run()
		}
	}()
	u.push(func() { d.pool.discard(v) })
	if err = bindTaskDirs(v.m.RunDir, spec.Shares); err != nil {
		return nil, nil, false, err
	}
	if err = d.backend.Redirect(v.m, spec.Stdout, spec.Stderr); err != nil {
		return nil, nil, false, err
	}
	h := newTaskHandle(d, cfg, v.m, v.lease)
	h.ctl, v.ctl = v.ctl, nil
	h.snapshot, h.pooled = true, true
	if err = d.handOver(p, h, start, &u, shareSub); err != nil {
		return nil, nil, true, err
	}
	handle, dnet, err := d.commit(p, h, fmt.Sprintf("taken from the pool (waited %s)", time.Since(v.made).Round(time.Second)))
	return handle, dnet, true, err
}

// handOver runs a started VM's task handle and sends the VM its identity
// and program (mountSub: the part of each share that is the task's, for
// a pooled VM). The undo step it pushes kills the VM.
func (d *Driver) handOver(p *startPlan, h *taskHandle, start time.Time, u *undo, mountSub string) error {
	h.startedAt = start
	go h.run()
	u.push(func() {
		h.kill()
		<-h.done
	})
	a := d.assignment(p.cfg, p.program, p.tc.Args, h.lease)
	a.Barrier = p.gang
	a.MountSub = mountSub
	return h.assign(a, assignTimeout)
}

// commit records a started task: its handle's state for recovery, the
// task in the driver's table, an event saying how it started, and the
// wait at the gang's start barrier.
func (d *Driver) commit(p *startPlan, h *taskHandle, how string) (*drivers.TaskHandle, *drivers.DriverNetwork, error) {
	cfg, m, ls, start := p.cfg, h.m, h.lease, h.startedAt
	handle := drivers.NewTaskHandle(taskHandleVersion)
	handle.Config = cfg
	if err := handle.SetDriverState(&taskState{Machine: *m, Lease: ls, StartedAt: start, Snapshot: h.snapshot}); err != nil {
		return nil, nil, fmt.Errorf("saving task state: %w", err)
	}
	d.tasks.Store(cfg.ID, h)

	var dnet *drivers.DriverNetwork
	if ls != nil {
		dnet = &drivers.DriverNetwork{IP: ls.IP, AutoAdvertise: true}
	}
	took := time.Since(start)
	h.startTook = took
	d.eventer.EmitEvent(&drivers.TaskEvent{
		TaskID:    cfg.ID,
		AllocID:   cfg.AllocID,
		TaskName:  cfg.Name,
		Timestamp: time.Now(),
		Message:   fmt.Sprintf("Worker VM %s in %d ms (%s)", how, took.Milliseconds(), p.accel),
	})
	if p.gang {
		go h.barrier(p.conf.CohortServers, p.gangTimeout)
	}
	d.log.Debug("started worker vm", "task", cfg.Name, "alloc", cfg.AllocID, "pid", m.PID, "snapshot", h.snapshot, "pooled", h.pooled, "took", took)
	return handle, dnet, nil
}

func (d *Driver) taskAccel(want string) (string, error) {
	if err := validAccel(want); err != nil {
		return "", err
	}
	switch want {
	case "", "auto":
		return d.accel, nil
	case "kvm":
		if a, why := vm.DetectAccel(); a != "kvm" {
			return "", fmt.Errorf("accelerator = \"kvm\" but this node cannot use it: %s", why)
		}
	}
	return want, nil
}

// entropySeed is fresh randomness for a guest's pool: VMs restored from
// one snapshot would otherwise share the template's.
func entropySeed() []byte {
	seed := make([]byte, 64)
	rand.Read(seed)
	return seed
}

// assignment is the identity and program a task's VM receives.
func (d *Driver) assignment(cfg *drivers.TaskConfig, program string, args []string, ls *lease) *proto.Assignment {
	a := &proto.Assignment{
		Hostname: hostname(cfg),
		Entropy:  entropySeed(),
		UnixNano: time.Now().UnixNano(),
		Mounts:   proto.MountTags,
		Program:  program,
		Args:     args,
		Env:      guestEnv(cfg, ls),
		Dir:      "/",
	}
	d.withLease(a, ls)
	return a
}

// withLease gives an assignment the network of the address its VM holds.
func (d *Driver) withLease(a *proto.Assignment, ls *lease) {
	if ls != nil {
		a.Address, a.Gateway, a.MAC, a.MTU = ls.Address, ls.Gateway, ls.MAC, ls.MTU
		a.DNS = d.net.DNS()
	}
}

// hostname is "<group>-<rank>" for a gang worker (cohort may split a group
// into one Nomad group per worker, so the gang's own names come first),
// else "<task group>-<alloc index>" when Nomad gives the index.
func hostname(cfg *drivers.TaskConfig) string {
	group, idx := cfg.Env[jobspec.EnvGroup], cfg.Env[jobspec.EnvRank]
	if group == "" || idx == "" {
		group, idx = cfg.TaskGroupName, cfg.Env["NOMAD_ALLOC_INDEX"]
	}
	if idx != "" {
		h := strings.Trim(runDirName.ReplaceAllString(strings.ToLower(group), "-"), "-")
		// A name that starts with a letter, so glibc and the JVM do not
		// read it as an IPv4 address; one DNS label (63 bytes), so it
		// resolves from the hosts file.
		if h == "" || h[0] < 'a' || h[0] > 'z' {
			h = "w" + h
		}
		h = strings.TrimRight(h[:min(len(h), max(1, 62-len(idx)))], "-")
		return h + "-" + idx
	}
	// An allocation ID's first 8 hex digits are all decimal one time in
	// 43: "alloc-" keeps the name a name.
	return "alloc-" + cfg.AllocID[:8]
}

// guestEnv is the task's environment with the task directories at their
// paths inside the VM.
func guestEnv(cfg *drivers.TaskConfig, ls *lease) []string {
	env := make([]string, 0, len(cfg.Env)+4)
	override := map[string]string{
		"NOMAD_ALLOC_DIR":   "/alloc",
		"NOMAD_TASK_DIR":    "/local",
		"NOMAD_SECRETS_DIR": "/secrets",
	}
	if ls != nil {
		override["COHORT_IP"] = ls.IP
	}
	for k, v := range cfg.Env {
		if _, ok := override[k]; ok {
			continue
		}
		env = append(env, k+"="+v)
	}
	for k, v := range override {
		env = append(env, k+"="+v)
	}
	if _, ok := cfg.Env["PATH"]; !ok {
		env = append(env, "PATH=/local:/local/"+programDirName+":/alloc")
	}
	return env
}

func (d *Driver) RecoverTask(handle *drivers.TaskHandle) error {
	if handle == nil {
		return errors.New("nil task handle")
	}
	if _, ok := d.tasks.Load(handle.Config.ID); ok {
		return nil
	}
	var st taskState
	if err := handle.GetDriverState(&st); err != nil {
		return fmt.Errorf("decoding task state: %w", err)
	}
	m := st.Machine
	// The collector matches run directories by their resolved paths
	// (state_dir is resolved at setup): a task saved by a version that
	// kept a path through a symlink must still be known as the owner.
	if r, err := filepath.EvalSymlinks(m.RunDir); err == nil {
		m.RunDir = r
	}
	if st.Lease != nil && d.net != nil {
		d.net.claim(st.Lease)
	}
	h := newTaskHandle(d, handle.Config, &m, st.Lease)
	h.startedAt, h.snapshot = st.StartedAt, st.Snapshot
	d.tasks.Store(handle.Config.ID, h)
	go h.run()
	d.mu.RLock()
	conf := d.config
	d.mu.RUnlock()
	if gang, timeout := gangTask(handle.Config.Env); gang && conf != nil && len(conf.CohortServers) > 0 && m.Alive() && !programStarted(&m) {
		// The worker was still waiting at the barrier.
		go h.barrier(conf.CohortServers, timeout)
	}
	d.log.Info("recovered worker vm", "task", handle.Config.Name, "pid", m.PID, "alive", m.Alive())
	return nil
}

// programStarted reads the VM's event log: did its program start?
func programStarted(m *vm.Machine) bool {
	// The init reports the start among its first few events; a guest
	// cannot make this read any bigger.
	b := vm.ReadHead(m.EventsLog(), vm.MaxLine)
	for _, line := range bytes.Split(b, []byte("\n")) {
		var ev proto.Event
		if json.Unmarshal(line, &ev) == nil && ev.Kind == proto.EvStarted {
			return true
		}
	}
	return false
}

func (d *Driver) handle(id string) (*taskHandle, error) {
	v, ok := d.tasks.Load(id)
	if !ok {
		return nil, drivers.ErrTaskNotFound
	}
	return v.(*taskHandle), nil
}

func (d *Driver) WaitTask(ctx context.Context, taskID string) (<-chan *drivers.ExitResult, error) {
	h, err := d.handle(taskID)
	if err != nil {
		return nil, err
	}
	ch := make(chan *drivers.ExitResult, 1)
	go func() {
		defer close(ch)
		select {
		case <-h.done:
			ch <- h.exitResult()
		case <-ctx.Done():
		case <-d.ctx.Done():
		}
	}()
	return ch, nil
}

func (d *Driver) StopTask(taskID string, timeout time.Duration, signal string) error {
	h, err := d.handle(taskID)
	if err != nil {
		return err
	}
	return h.stop(timeout, signal)
}

func (d *Driver) DestroyTask(taskID string, force bool) error {
	h, err := d.handle(taskID)
	if err != nil {
		return err
	}
	if h.running() && !force {
		return errors.New("cannot destroy a running task without force")
	}
	h.kill()
	select {
	case <-h.done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("worker vm (pid %d) did not exit after kill", h.m.PID)
	}
	h.cleanup()
	d.tasks.Delete(taskID)
	return nil
}

func (d *Driver) InspectTask(taskID string) (*drivers.TaskStatus, error) {
	h, err := d.handle(taskID)
	if err != nil {
		return nil, err
	}
	return h.status(), nil
}

func (d *Driver) TaskStats(ctx context.Context, taskID string, interval time.Duration) (<-chan *cstructs.TaskResourceUsage, error) {
	h, err := d.handle(taskID)
	if err != nil {
		return nil, err
	}
	return h.stats(ctx, interval), nil
}

func (d *Driver) TaskEvents(ctx context.Context) (<-chan *drivers.TaskEvent, error) {
	return d.eventer.TaskEvents(ctx)
}

func (d *Driver) SignalTask(taskID string, signal string) error {
	h, err := d.handle(taskID)
	if err != nil {
		return err
	}
	num, err := signalNumber(signal)
	if err != nil {
		return err
	}
	return h.signal(num)
}

func (d *Driver) ExecTask(taskID string, cmd []string, timeout time.Duration) (*drivers.ExecTaskResult, error) {
	return nil, errors.New("the microvm driver does not support exec: a worker VM runs only its program")
}

// Shutdown stops the driver's goroutines; VMs keep running for recovery.
func (d *Driver) Shutdown() {
	d.cancel()
	if d.net != nil {
		d.net.stop()
	}
}

func signalNumber(name string) (int, error) {
	if name == "" {
		return int(unix.SIGTERM), nil
	}
	n := strings.ToUpper(name)
	if !strings.HasPrefix(n, "SIG") {
		n = "SIG" + n
	}
	sig := unix.SignalNum(n)
	if sig == 0 {
		return 0, fmt.Errorf("unknown signal %q", name)
	}
	return int(sig), nil
}
