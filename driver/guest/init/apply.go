package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"
	"unsafe"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"golang.org/x/sys/unix"
)

// prepared is what a warm-up already did in a pooled VM, so that its
// assignment does only the rest.
type prepared struct {
	lo      bool
	net     string          // the network configuration applied
	mounted map[string]bool // shares mounted at /.9p/<tag>
}

// netKey names a network configuration, to tell whether the assignment's
// is the one a warm-up applied.
func netKey(a *proto.Assignment) string {
	return a.Interface + "|" + a.MAC + "|" + a.Address + "|" + a.Gateway + "|" + fmt.Sprint(a.MTU)
}

// warm does, in a pooled VM, what needs no task: entropy (its template's
// RNG state is shared with every other copy), the network of the address
// the pool holds for it, and its shares, mounted where the assignment
// binds the task's part of them from.
func warm(a *proto.Assignment, p *prepared) error {
	if err := reseed(a.Entropy); err != nil {
		return err
	}
	if err := network(a, p); err != nil {
		return err
	}
	for _, tag := range a.Mounts {
		if err := mountShare(tag, p); err != nil {
			return err
		}
	}
	// Start a process once, so that the kernel's exec, fault and thread
	// paths the program will take are already translated (under TCG) and
	// cached: the init itself, which exits at once when it is not PID 1.
	// (Reading a file over 9p as well was measured and gained nothing.)
	exec.Command("/init").Run()
	return nil
}

// apply gives the VM the identity in a: fresh entropy first (a restored
// snapshot starts with its template's RNG state), then hostname, network
// and the task's directories, skipping what a warm-up did.
func apply(a *proto.Assignment, p *prepared) error {
	if err := reseed(a.Entropy); err != nil {
		return err
	}
	if err := setClock(a.UnixNano); err != nil {
		return err
	}
	if a.Hostname != "" {
		if err := unix.Sethostname([]byte(a.Hostname)); err != nil {
			return fmt.Errorf("setting hostname: %w", err)
		}
	}
	if err := network(a, p); err != nil {
		return err
	}
	if err := writeHosts(a, nil); err != nil {
		// Names then resolve through DNS alone: worth a word, not a
		// failed start.
		fmt.Fprintf(console, "cohort init: %v\n", err)
	}
	// /etc/hosts before DNS: without this, glibc asks DNS first.
	if err := os.WriteFile("/etc/nsswitch.conf", []byte("hosts: files dns\n"), 0o644); err != nil {
		fmt.Fprintf(console, "cohort init: writing /etc/nsswitch.conf: %v\n", err)
	}
	for _, tag := range a.Mounts {
		dst := "/" + tag
		os.MkdirAll(dst, 0o755)
		if a.MountSub == "" {
			if err := unix.Mount(tag, dst, "9p", 0, mountOptions); err != nil {
				return fmt.Errorf("mounting task directory %s: %w", tag, err)
			}
			continue
		}
		if err := mountShare(tag, p); err != nil {
			return err
		}
		src := shareDir(tag) + "/" + a.MountSub
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding task directory %s: %w", tag, err)
		}
		// The share's root (the pool's directory on the host) is no
		// business of the program: only the task's part stays. The bind
		// keeps the 9p channel in use, so the tag cannot be mounted
		// again.
		if err := unix.Unmount(shareDir(tag), unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmounting share %s: %w", tag, err)
		}
	}
	return nil
}

const mountOptions = "trans=virtio,version=9p2000.L,msize=524288,cache=mmap"

func shareDir(tag string) string { return "/.9p/" + tag }

func mountShare(tag string, p *prepared) error {
	if p.mounted[tag] {
		return nil
	}
	dst := shareDir(tag)
	os.MkdirAll(dst, 0o755)
	if err := unix.Mount(tag, dst, "9p", 0, mountOptions); err != nil {
		return fmt.Errorf("mounting share %s: %w", tag, err)
	}
	if p.mounted == nil {
		p.mounted = map[string]bool{}
	}
	p.mounted[tag] = true
	return nil
}

// network brings up lo and the assignment's interface, route and
// resolver, unless a warm-up brought up the same.
func network(a *proto.Assignment, p *prepared) error {
	if !p.lo {
		if err := ifUp("lo"); err != nil {
			return err
		}
		p.lo = true
	}
	if a.Address != "" && p.net != netKey(a) {
		if err := configureNet(a); err != nil {
			return err
		}
		p.net = netKey(a)
	}
	if len(a.DNS) > 0 {
		conf := ""
		for _, s := range a.DNS {
			conf += "nameserver " + s + "\n"
		}
		os.MkdirAll("/etc", 0o755)
		if err := os.WriteFile("/etc/resolv.conf", []byte(conf), 0o644); err != nil {
			return fmt.Errorf("writing resolv.conf: %w", err)
		}
	}
	return nil
}

// reseed mixes host entropy into the kernel pool and forces the CRNG to
// reseed from it now, so two VMs restored from one snapshot diverge at once.
func reseed(seed []byte) error {
	if len(seed) < 32 {
		return fmt.Errorf("assignment carries %d bytes of entropy, want at least 32", len(seed))
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("opening /dev/urandom: %w", err)
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(seed))
	binary.LittleEndian.PutUint32(buf[0:], uint32(len(seed)*8))
	binary.LittleEndian.PutUint32(buf[4:], uint32(len(seed)))
	copy(buf[8:], seed)
	if err := ioctl(f.Fd(), unix.RNDADDENTROPY, unsafe.Pointer(&buf[0])); err != nil {
		return fmt.Errorf("adding entropy: %w", err)
	}
	if err := ioctl(f.Fd(), unix.RNDRESEEDCRNG, nil); err != nil {
		return fmt.Errorf("reseeding the CRNG: %w", err)
	}
	return nil
}

func ioctl(fd uintptr, req uint, arg unsafe.Pointer) error {
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, fd, uintptr(req), uintptr(arg)); errno != 0 {
		return errno
	}
	return nil
}

func ifUp(name string) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return fmt.Errorf("reading flags of %s: %w", name, err)
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr); err != nil {
		return fmt.Errorf("bringing %s up: %w", name, err)
	}
	return nil
}

func configureNet(a *proto.Assignment) error {
	name := a.Interface
	if name == "" {
		name = "eth0"
	}
	ip, ipnet, err := net.ParseCIDR(a.Address)
	if err != nil || ip.To4() == nil {
		return fmt.Errorf("assignment address %q is not an IPv4 CIDR", a.Address)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(fd)

	if a.MAC != "" {
		mac, err := net.ParseMAC(a.MAC)
		if err != nil || len(mac) != 6 {
			return fmt.Errorf("assignment MAC %q is invalid", a.MAC)
		}
		// struct ifreq { char name[16]; struct sockaddr hwaddr; }
		var raw [40]byte
		copy(raw[:16], name)
		binary.LittleEndian.PutUint16(raw[16:], unix.ARPHRD_ETHER)
		copy(raw[18:], mac)
		if err := ioctl(uintptr(fd), unix.SIOCSIFHWADDR, unsafe.Pointer(&raw[0])); err != nil {
			return fmt.Errorf("setting MAC of %s: %w", name, err)
		}
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	if err := ifr.SetInet4Addr(ip.To4()); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFADDR, ifr); err != nil {
		return fmt.Errorf("setting address of %s: %w", name, err)
	}
	if err := ifr.SetInet4Addr(net.IP(ipnet.Mask).To4()); err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCSIFNETMASK, ifr); err != nil {
		return fmt.Errorf("setting netmask of %s: %w", name, err)
	}
	if a.MTU > 0 {
		ifm, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		ifm.SetUint32(uint32(a.MTU))
		if err := unix.IoctlIfreq(fd, unix.SIOCSIFMTU, ifm); err != nil {
			return fmt.Errorf("setting the MTU of %s to %d: %w", name, a.MTU, err)
		}
	}
	if err := ifUp(name); err != nil {
		return err
	}
	if a.Gateway == "" {
		return nil
	}
	gw := net.ParseIP(a.Gateway).To4()
	if gw == nil {
		return fmt.Errorf("assignment gateway %q is not IPv4", a.Gateway)
	}
	// struct rtentry on amd64: rt_dst at 8, rt_gateway at 24, rt_genmask at
	// 40, rt_flags at 56; each sockaddr_in is family, port, address.
	var rt [120]byte
	for _, off := range []int{8, 24, 40} {
		binary.LittleEndian.PutUint16(rt[off:], unix.AF_INET)
	}
	copy(rt[24+4:], gw)
	binary.LittleEndian.PutUint16(rt[56:], unix.RTF_UP|unix.RTF_GATEWAY)
	if err := ioctl(uintptr(fd), unix.SIOCADDRT, unsafe.Pointer(&rt[0])); err != nil && err != unix.EEXIST {
		return fmt.Errorf("adding default route via %s: %w", a.Gateway, err)
	}
	return nil
}

// setClock sets the wall clock to the host's (ns since the epoch; 0: no
// time given).
func setClock(ns int64) error {
	if ns <= 0 {
		return nil
	}
	tv := unix.NsecToTimeval(ns)
	if err := unix.Settimeofday(&tv); err != nil {
		return fmt.Errorf("setting the clock: %w", err)
	}
	return nil
}

// correctClock steps the clock forward to the host's ns when it is more
// than 100 ms behind. Never back: a host time was taken before its
// command travelled, so a guest ahead of it by less than the transit is
// right, and the transit is not known.
func correctClock(ns int64) {
	if ns <= 0 {
		return
	}
	if behind := time.Unix(0, ns).Sub(time.Now()); behind < clockSlack {
		return
	}
	if err := setClock(ns); err != nil {
		fmt.Fprintf(console, "cohort init: %v\n", err)
	}
}

const clockSlack = 100 * time.Millisecond

// writeHosts writes /etc/hosts: localhost, the VM's own hostname (at its
// address, so a program that looks up its own name, as MPI launchers and
// the JVM do, gets the address its peers dial), and the gang's names,
// which are looked up before DNS (apply writes /etc/nsswitch.conf to say
// so). apply writes it without the gang; the start barrier's release
// writes it again with it, whole or not at all (renamed into place), as
// a program may already be reading it.
func writeHosts(a *proto.Assignment, gang []proto.Host) error {
	os.MkdirAll("/etc", 0o755)
	if err := os.WriteFile("/etc/hosts.new", hostsFile(a, gang), 0o644); err != nil {
		return fmt.Errorf("writing /etc/hosts: %w", err)
	}
	if err := os.Rename("/etc/hosts.new", "/etc/hosts"); err != nil {
		return fmt.Errorf("writing /etc/hosts: %w", err)
	}
	return nil
}

// hostsFile is /etc/hosts' text. A VM without a network has its name on
// 127.0.1.1, as Debian does. Names and addresses that are not well
// formed are left out.
func hostsFile(a *proto.Assignment, gang []proto.Host) []byte {
	var b strings.Builder
	b.WriteString("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
	if hostName(a.Hostname) {
		self := "127.0.1.1"
		if ip, _, err := net.ParseCIDR(a.Address); err == nil {
			self = ip.String()
		}
		fmt.Fprintf(&b, "%s\t%s\n", self, a.Hostname)
	}
	for _, h := range gang {
		ip := net.ParseIP(h.Address)
		if ip == nil || !hostName(h.Name) {
			continue
		}
		fmt.Fprintf(&b, "%s\t%s\n", ip, h.Name)
	}
	return []byte(b.String())
}

// hostName says whether s is a DNS name: dot-separated labels of letters,
// digits and hyphens.
func hostName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(strings.TrimSuffix(s, "."), ".") {
		if l == "" || len(l) > 63 {
			return false
		}
		for _, c := range l {
			if !(c == '-' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z') {
				return false
			}
		}
	}
	return true
}
