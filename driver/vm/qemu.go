package vm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
)

// QEMU runs VMs on QEMU's microvm machine type, with KVM where the CPU has
// hardware virtualization and TCG (software emulation) elsewhere.
type QEMU struct {
	Binary string // default qemu-system-x86_64 on $PATH
	// TBSizeMB caps TCG's translation cache; 0 keeps QEMU's default.
	TBSizeMB int
	// PCIeDevices are emulated devices (QEMU -device options) put on the
	// PCIe bus of every VM, which then boots as a passthrough VM does.
	// Tests use one to stand in for a host device on hosts without an
	// IOMMU.
	PCIeDevices []string

	versionOnce sync.Once
	version     string
	versionErr  error
}

var _ Backend = (*QEMU)(nil)

func (q *QEMU) Name() string { return "qemu" }

func (q *QEMU) binary() string {
	if q.Binary != "" {
		return q.Binary
	}
	return "qemu-system-x86_64"
}

func (q *QEMU) Check() error {
	q.Version()
	return q.versionErr
}

// Version runs the binary once and caches its version line.
func (q *QEMU) Version() string {
	q.versionOnce.Do(func() {
		out, err := exec.Command(q.binary(), "--version").Output()
		if err != nil {
			q.versionErr = fmt.Errorf("%s not usable: %w (install qemu-system-x86)", q.binary(), err)
			return
		}
		first := strings.SplitN(string(out), "\n", 2)[0]
		if f := strings.Fields(first); len(f) >= 4 {
			q.version = f[3]
		} else {
			q.version = first
		}
	})
	return q.version
}

// Cmdline is the guest kernel command line. acpi=off makes QEMU describe
// the virtio-mmio devices on the command line; reboot=t with -no-reboot
// turns the init's final reset into the VMM's exit; tsc=reliable spares TCG
// guests a TSC calibration that can hang; no_timer_check skips the check
// that the timer interrupt ticks within a few of its periods, which a TCG
// guest on a loaded host can fail ("IO-APIC + timer doesn't work!", a
// panic at boot).
const Cmdline = "console=ttyS0 reboot=t panic=-1 tsc=reliable no_timer_check acpi=off pci=off quiet 8250.nr_uarts=1 random.trust_cpu=off"

// CmdlinePCI is the command line of a VM with passed-through devices:
// ACPI describes its PCIe host bridge (and its virtio-mmio devices), so
// neither ACPI nor PCI is turned off. Args adds the host's TSC rate to
// it, and to a TCG guest's (see hostTSCkHz).
const CmdlinePCI = "console=ttyS0 reboot=t panic=-1 tsc=reliable no_timer_check quiet 8250.nr_uarts=1 random.trust_cpu=off"

// Args builds the QEMU command line for spec. It is a pure function of the
// spec, so a template and its restored copies get identical device layouts.
func (q *QEMU) Args(spec *Spec, incoming string) []string {
	accel, cpu := "tcg", "max"
	if q.TBSizeMB > 0 {
		accel += ",tb-size=" + strconv.Itoa(q.TBSizeMB)
	}
	if spec.Accel == "kvm" {
		accel, cpu = "kvm", "host"
	}
	rd := spec.RunDir
	machine := "microvm,acpi=off,pit=on,pic=on,rtc=on,isa-serial=on,x-option-roms=off"
	cmdline := Cmdline
	if len(spec.PCI) > 0 || len(q.PCIeDevices) > 0 {
		machine = "microvm,acpi=on,pcie=on,pit=on,pic=on,rtc=on,isa-serial=on,x-option-roms=off"
		cmdline = CmdlinePCI
	}
	if spec.Accel != "kvm" || cmdline == CmdlinePCI {
		if khz := hostTSCkHz(); khz > 0 {
			cmdline += " tsc_early_khz=" + strconv.Itoa(khz)
		}
	}
	if spec.Accel != "kvm" {
		// With the TSC as its clock a kernel runs its timers in
		// high-resolution mode, where every timer reprograms the
		// emulated local APIC: under TCG that made the e2e sort (12
		// VMs on 2 cores) twice as slow (65-68 s against 30-35 s).
		// Low-resolution timers tick with the (idle-tickless) jiffy,
		// as they did while jiffies were the clock.
		cmdline += " highres=off"
	}
	if spec.RAMFile != "" {
		// Templates boot without "quiet", so a template that hangs says
		// on its console where it stopped; their restored copies must
		// be started with the same command line. The guest's init turns
		// the console's level down before the snapshot is taken.
		cmdline = strings.Replace(cmdline, " quiet", "", 1)
	}
	var ram []string
	if spec.RAMFile != "" {
		// Guest RAM is a file: the template writes it (share=on), and each
		// restored copy maps it copy-on-write (share=off), so VMs share
		// the pages they have not written and a restore copies no RAM.
		share := "off"
		if spec.ShareRAM {
			share = "on"
		}
		ram = []string{"-object", fmt.Sprintf("memory-backend-file,id=ram0,size=%dM,mem-path=%s,share=%s",
			spec.MemoryMB, spec.RAMFile, share)}
		machine += ",memory-backend=ram0"
	}
	a := append(ram,
		"-M", machine,
		"-accel", accel, "-cpu", cpu,
		"-m", strconv.Itoa(spec.MemoryMB), "-smp", strconv.Itoa(spec.VCPUs),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-kernel", spec.Kernel, "-initrd", spec.Initrd, "-append", cmdline,
		// Guest files are appended to, so the guard can cut them back.
		"-chardev", "file,id=con,append=on,path="+filepath.Join(rd, "console.log"),
		"-serial", "chardev:con",
		"-device", "virtio-serial-device,max_ports=5",
		"-chardev", "socket,id=ctl,path="+filepath.Join(rd, "ctl.sock")+",server=on,wait=off",
		"-device", "virtserialport,chardev=ctl,name="+proto.PortCtl,
		"-chardev", "file,id=ev,append=on,path="+filepath.Join(rd, "events.log"),
		"-device", "virtserialport,chardev=ev,name="+proto.PortEvents,
		"-chardev", "file,id=out,path="+spec.Stdout,
		"-device", "virtserialport,chardev=out,name="+proto.PortStdout,
		"-chardev", "file,id=err,path="+spec.Stderr,
		"-device", "virtserialport,chardev=err,name="+proto.PortStderr,
	)
	for _, tag := range proto.MountTags {
		a = append(a,
			// mapped-xattr: the guest's owners, modes and device nodes live
			// in extended attributes, never on the host itself, so
			// nothing a guest writes is setuid, a device or anyone's
			// but the VMM's user.
			// multidevs=remap: a pooled VM's share holds the task's
			// directory mounted from another file system, whose inode
			// numbers must not collide with the share's own.
			"-fsdev", "local,id=fs_"+tag+",path="+spec.Shares[tag]+",security_model=mapped-xattr,multidevs=remap",
			"-device", "virtio-9p-device,fsdev=fs_"+tag+",mount_tag="+tag)
	}
	if spec.Tap != "" {
		a = append(a, "-netdev", "tap,id=net0,ifname="+spec.Tap+",script=no,downscript=no")
	} else {
		a = append(a, "-netdev", "hubport,id=net0,hubid=0")
	}
	for i, addr := range spec.PCI {
		a = append(a, "-device", fmt.Sprintf("vfio-pci,host=%s,id=pt%d", addr, i))
	}
	for _, d := range q.PCIeDevices {
		a = append(a, "-device", d)
	}
	nic := "virtio-net-device,netdev=net0"
	if spec.MAC != "" {
		nic += ",mac=" + spec.MAC
	}
	a = append(a, "-device", nic,
		"-qmp", "unix:"+filepath.Join(rd, "qmp.sock")+",server=on,wait=off")
	if incoming != "" {
		// The stream is fed over QMP once the capabilities are set.
		a = append(a, "-incoming", "defer")
	}
	return a
}

func (q *QEMU) Boot(spec *Spec) (*Machine, error) { return q.start(spec, "") }

func (q *QEMU) Restore(spec *Spec, snapshot string) (*Machine, error) {
	if _, err := os.Stat(snapshot); err != nil {
		return nil, fmt.Errorf("snapshot: %w", err)
	}
	spec.RAMFile, spec.ShareRAM = ramFile(snapshot), false
	if _, err := os.Stat(spec.RAMFile); err != nil {
		return nil, fmt.Errorf("snapshot memory: %w", err)
	}
	m, err := q.start(spec, snapshot)
	if err != nil {
		return nil, err
	}
	if err := resume(m, snapshot); err != nil {
		m.Kill()
		return nil, fmt.Errorf("restoring %s: %w; %s", snapshot, err, m.ConsoleTail(5))
	}
	return m, nil
}

// Redirect swaps the backends of the VM's output chardevs over QMP; the
// virtio-serial ports in the guest stay as they are.
func (q *QEMU) Redirect(m *Machine, stdout, stderr string) error {
	qc, err := dialQMP(m.QMPSocket(), 10*time.Second)
	if err != nil {
		return err
	}
	defer qc.close()
	for id, path := range map[string]string{"out": stdout, "err": stderr} {
		backend := map[string]any{"type": "file", "data": map[string]any{"out": path}}
		if _, err := qc.do("chardev-change", map[string]any{"id": id, "backend": backend}); err != nil {
			return fmt.Errorf("redirecting the program's %s: %w", map[string]string{"out": "stdout", "err": "stderr"}[id], err)
		}
	}
	return nil
}

// ramFile is where a snapshot's guest memory lives, beside its device
// state.
func ramFile(snapshot string) string { return snapshot + ".ram" }

// ignoreShared leaves file-backed shared RAM out of the migration stream:
// the RAM file itself is the memory image.
var ignoreShared = map[string]any{"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}}}

// resume feeds the snapshot's device state to a VMM started with
// -incoming defer, waits for it to load and starts the vCPUs: the template
// was saved paused, and QEMU keeps that run state.
func resume(m *Machine, snapshot string) error {
	qc, err := dialQMP(m.QMPSocket(), 10*time.Second)
	if err != nil {
		return err
	}
	defer qc.close()
	if _, err := qc.do("migrate-set-capabilities", ignoreShared); err != nil {
		return err
	}
	if _, err := qc.do("migrate-incoming", map[string]string{"uri": "exec:cat " + shellQuote(snapshot)}); err != nil {
		return err
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ret, err := qc.do("query-status", nil)
		if err != nil {
			return err
		}
		var st struct{ Status string }
		json.Unmarshal(ret, &st)
		switch st.Status {
		case "inmigrate":
		case "running":
			return nil
		case "paused", "postmigrate", "prelaunch":
			_, err := qc.do("cont", nil)
			return err
		default:
			return fmt.Errorf("vm is %s after restore", st.Status)
		}
		if time.Now().After(deadline) {
			return errors.New("incoming migration did not finish in 30s")
		}
		time.Sleep(time.Millisecond)
	}
}

func (q *QEMU) start(spec *Spec, incoming string) (*Machine, error) {
	if err := q.Check(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(spec.RunDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating vm run dir: %w", err)
	}
	for _, tag := range proto.MountTags {
		if spec.Shares[tag] == "" {
			return nil, fmt.Errorf("no host directory for the %q share", tag)
		}
	}
	name, args := q.binary(), q.Args(spec, incoming)
	if spec.NetNS != "" {
		args = append([]string{"--net=" + spec.NetNS, "--", name}, args...)
		name = "nsenter"
	}
	cmd := exec.Command(name, args...)
	logf, err := os.OpenFile(filepath.Join(spec.RunDir, "qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating vmm log: %w", err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	// A session of its own: the VM outlives a restart of the driver plugin
	// and of the Nomad agent, and is re-attached from its task handle.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	go cmd.Wait() // reap it while we are its parent
	m := &Machine{Backend: q.Name(), PID: cmd.Process.Pid, RunDir: spec.RunDir}
	st, _, err := procStat(m.PID)
	if err != nil {
		return nil, fmt.Errorf("vmm exited at once: %s", q.vmmLog(spec.RunDir))
	}
	m.StartTime = st
	if err := m.record(); err != nil {
		m.Kill()
		return nil, err
	}
	return m, nil
}

func (q *QEMU) vmmLog(runDir string) string {
	b, _ := os.ReadFile(filepath.Join(runDir, "qemu.log"))
	return strings.TrimSpace(string(b))
}

// Snapshot boots a template, waits for its init's "ready", pauses it and
// migrates its state into dst. The template's NIC has no host side and its
// shares point at an empty directory; restored copies bring their own.
func (q *QEMU) Snapshot(ctx context.Context, spec *Spec, dst string) (err error) {
	ram := ramFile(dst)
	os.Remove(ram)
	// Files of this build only: a build elsewhere (another instance of
	// the plugin, a template VM that outlived its builder) never maps
	// the same RAM file.
	suffix := fmt.Sprintf(".%d-%d.tmp", os.Getpid(), time.Now().UnixNano())
	tmp := dst + suffix
	spec.RAMFile, spec.ShareRAM = ram+suffix, true
	defer func() {
		if err != nil {
			os.Remove(spec.RAMFile)
			os.Remove(tmp)
		}
	}()
	m, err := q.Boot(spec)
	if err != nil {
		return err
	}
	defer m.Kill()
	evctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if _, err := WaitEvent(evctx, m, m.Events(evctx), proto.EvReady); err != nil {
		return fmt.Errorf("template vm: %w", err)
	}
	qc, err := dialQMP(m.QMPSocket(), 5*time.Second)
	if err != nil {
		return err
	}
	defer qc.close()
	if _, err := qc.do("stop", nil); err != nil {
		return err
	}
	if _, err := qc.do("migrate-set-capabilities", ignoreShared); err != nil {
		return err
	}
	if _, err := qc.do("migrate", map[string]string{"uri": "exec:cat > " + shellQuote(tmp)}); err != nil {
		return err
	}
	for {
		ret, err := qc.do("query-migrate", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status    string `json:"status"`
			ErrorDesc string `json:"error-desc"`
		}
		json.Unmarshal(ret, &st)
		switch st.Status {
		case "completed":
			qc.do("quit", nil)
			m.Wait(ctx)
			if err := os.Rename(spec.RAMFile, ram); err != nil {
				return err
			}
			return os.Rename(tmp, dst)
		case "failed", "cancelled":
			return fmt.Errorf("saving template: migration %s: %s", st.Status, st.ErrorDesc)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// DetectAccel picks "kvm" only when the CPU advertises hardware
// virtualization (vmx or svm) and /dev/kvm opens; a /dev/kvm without them
// is a software KVM under which Linux guests crawl.
func DetectAccel() (string, string) {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "tcg", "cannot read /proc/cpuinfo"
	}
	flags := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "flags") {
			for _, f := range strings.Fields(line) {
				flags[f] = true
			}
			break
		}
	}
	if !flags["vmx"] && !flags["svm"] {
		return "tcg", "cpu has no vmx/svm"
	}
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return "tcg", "/dev/kvm: " + err.Error()
	}
	f.Close()
	return "kvm", "hardware virtualization available"
}

// KernelInfo reads a kernel image once for its "Linux version" banner and
// a digest of its contents (the first 16 hex digits of its SHA-256),
// which names it where its path would not: an install replaces the kernel
// at the same path.
func KernelInfo(path string) (version, digest string, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", "", err
	}
	sum := sha256.Sum256(b)
	version, err = kernelVersion(b)
	return version, hex.EncodeToString(sum[:])[:16], err
}

// kernelVersion finds the "Linux version" banner in a kernel image.
func kernelVersion(b []byte) (string, error) {
	const marker = "Linux version "
	for off := 0; ; {
		i := strings.Index(string(b[off:]), marker)
		if i < 0 {
			return "", errors.New("no version banner in kernel image")
		}
		start := off + i + len(marker)
		end := start
		for end < len(b) && b[end] != ' ' && b[end] != 0 && end-start < 64 {
			end++
		}
		v := string(b[start:end])
		// Skip the format string ("%s") that precedes the real banner.
		if v != "" && !strings.Contains(v, "%") {
			return v, nil
		}
		off = end
	}
}
