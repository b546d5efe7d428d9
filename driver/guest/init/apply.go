package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"unsafe"

	"github.com/cohort-dev/cohort/driver/guest/proto"
	"golang.org/x/sys/unix"
)

// apply gives the VM the identity in a: fresh entropy first (a restored
// snapshot starts with its template's RNG state), then hostname, network
// and the task's directories.
func apply(a *proto.Assignment) error {
	if err := reseed(a.Entropy); err != nil {
		return err
	}
	if a.UnixNano > 0 {
		tv := unix.NsecToTimeval(a.UnixNano)
		if err := unix.Settimeofday(&tv); err != nil {
			return fmt.Errorf("setting the clock: %w", err)
		}
	}
	if a.Hostname != "" {
		if err := unix.Sethostname([]byte(a.Hostname)); err != nil {
			return fmt.Errorf("setting hostname: %w", err)
		}
	}
	if err := ifUp("lo"); err != nil {
		return err
	}
	if a.Address != "" {
		if err := configureNet(a); err != nil {
			return err
		}
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
	for _, tag := range a.Mounts {
		dst := "/" + tag
		os.MkdirAll(dst, 0o755)
		if err := unix.Mount(tag, dst, "9p", 0, "trans=virtio,version=9p2000.L,msize=524288,cache=mmap"); err != nil {
			return fmt.Errorf("mounting task directory %s: %w", tag, err)
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
