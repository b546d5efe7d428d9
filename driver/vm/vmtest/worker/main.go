// Command worker is the program the VM tests run inside worker VMs.
//
//	worker exit N    print to stdout and stderr, exit N
//	worker rand      print hostname, 16 random bytes and the address of eth0
//	worker sleep     sleep until killed
//	worker env       print the environment
//	worker pci       print the PCI devices the guest found (address vendor:device)
//	worker serve P   accept one TCP connection on port P, print what it says
//	worker dial A    connect to host:port A, say hello; exit 1 if it fails
//	worker peers P   resolve every peer of the gang by name, exchange a
//	                 greeting with each over port P; exit 1 if any fails
//	worker probe A.. try each host:port A with a 1 s timeout, print
//	                 "open A" or "closed A"
//	worker listen A  accept (and close) connections on host:port A for ever
//	worker stamp [resolve]  print "stamp <unix ns>": at once, or once every
//	                 name in COHORT_PEERS resolves
//	worker escape D  try to plant a block device, a character device and a
//	                 setuid-root file in directory D (a share), print what
//	                 the guest sees
//	worker flood P   write to P (a file, /dev/console; "events" is cohort's
//	                 event port) for ever
package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cohort-dev/cohort/sdk"
)

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// resolved is how long "stamp resolve" took to resolve every name.
var resolved time.Duration

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: worker exit N | rand | sleep | env")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "exit":
		code, _ := strconv.Atoi(os.Args[2])
		fmt.Println("hello from the worker on stdout")
		fmt.Fprintln(os.Stderr, "hello from the worker on stderr")
		os.Exit(code)
	case "rand":
		host, _ := os.Hostname()
		b := make([]byte, 16)
		rand.Read(b)
		addr := ""
		if ifc, err := net.InterfaceByName("eth0"); err == nil {
			as, _ := ifc.Addrs()
			if len(as) > 0 {
				addr = as[0].String()
			}
			addr += " " + ifc.HardwareAddr.String()
		}
		fmt.Printf("%s %x %s\n", host, b, addr)
	case "write":
		// write PATH TEXT: a file for the host to find in the task's
		// directories.
		if err := os.WriteFile(os.Args[2], []byte(os.Args[3]), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("wrote", os.Args[2])
	case "sleep":
		fmt.Println("sleeping")
		time.Sleep(time.Hour)
	case "serve":
		c := acceptOne(os.Args[2])
		b := make([]byte, 64)
		n, _ := c.Read(b)
		fmt.Printf("got %q from %s\n", b[:n], c.RemoteAddr())
	case "dial":
		c, err := net.DialTimeout("tcp", os.Args[2], 3*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Fprint(c, "hello")
		c.Close()
		fmt.Println("connected")
	case "send":
		// send ADDR BYTES: write BYTES bytes to ADDR through a 64 KiB
		// send buffer and exit at once, leaving the kernel to deliver
		// what is still in it.
		c, err := net.DialTimeout("tcp", os.Args[2], 10*time.Second)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.(*net.TCPConn).SetWriteBuffer(64 << 10)
		n, _ := strconv.Atoi(os.Args[3])
		if _, err := c.Write(make([]byte, n)); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		c.Close()
		fmt.Println("sent", n)
	case "sink":
		// sink PORT KIBPS: accept one connection and read it at KIBPS
		// KiB/s (so the sender's last bytes wait in its kernel) until
		// EOF or 20 s of silence; print the count.
		c := acceptOne(os.Args[2])
		c.(*net.TCPConn).SetReadBuffer(16 << 10)
		rate, _ := strconv.Atoi(os.Args[3])
		total, b := 0, make([]byte, 16<<10)
		for {
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			n, err := io.ReadFull(c, b)
			total += n
			if err != nil {
				fmt.Printf("sink got %d bytes, then %v\n", total, err)
				break
			}
			time.Sleep(time.Duration(n) * time.Second / time.Duration(rate<<10))
		}
	case "clock":
		// clock SECONDS: the clock source, then the wall clock once a
		// second for SECONDS, for the host to compare with its own.
		cs, _ := os.ReadFile("/sys/devices/system/clocksource/clocksource0/current_clocksource")
		av, _ := os.ReadFile("/sys/devices/system/clocksource/clocksource0/available_clocksource")
		fmt.Printf("clocksource %s (of %s)\n", strings.TrimSpace(string(cs)), strings.TrimSpace(string(av)))
		n, _ := strconv.Atoi(os.Args[2])
		for i := 0; i <= n; i++ {
			fmt.Printf("clock %d\n", time.Now().UnixNano())
			if i < n {
				time.Sleep(time.Second)
			}
		}
	case "released":
		// released NAME: the clock and NAME's addresses, as a worker
		// released from the barrier finds them.
		addrs, err := net.LookupHost(os.Args[2])
		fmt.Printf("clock %d\nresolved %s %v %v\n", time.Now().UnixNano(), os.Args[2], addrs, err)
	case "execcost":
		// execcost A B: what running a program costs from where it
		// lies. A and B are two copies of this program in a 9p share,
		// new to this VM: A runs from the share; B is copied into tmpfs
		// first and runs from there. Under TCG both start cold, as the
		// translator keys its code by guest page.
		run := func(path string) time.Duration {
			t0 := time.Now()
			if err := exec.Command(path, "exit", "0").Run(); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			return time.Since(t0)
		}
		from9p := run(os.Args[2])
		t0 := time.Now()
		b, err := os.ReadFile(os.Args[3])
		if err == nil {
			err = os.WriteFile("/tmp/execcost", b, 0o755)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		copied := time.Since(t0)
		fromTmpfs := run("/tmp/execcost")
		fmt.Printf("exec_9p_ms=%.1f copy_9p_ms=%.1f exec_tmpfs_ms=%.1f bytes=%d\n",
			ms(from9p), ms(copied), ms(fromTmpfs), len(b))
	case "env":
		for _, e := range os.Environ() {
			fmt.Println(e)
		}
	case "pci":
		// The PCI devices the guest kernel found: address vendor:device.
		ents, _ := os.ReadDir("/sys/bus/pci/devices")
		for _, e := range ents {
			v, _ := os.ReadFile("/sys/bus/pci/devices/" + e.Name() + "/vendor")
			d, _ := os.ReadFile("/sys/bus/pci/devices/" + e.Name() + "/device")
			fmt.Printf("%s %s:%s\n", e.Name(), strings.TrimSpace(string(v)), strings.TrimSpace(string(d)))
		}
	case "peers":
		port, _ := strconv.Atoi(os.Args[2])
		if err := peers(port); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	case "stamp":
		// stamp [resolve]: print the time; with resolve, first resolve
		// every worker's name, and after printing wait until every
		// worker has done so: a worker's name leaves DNS when it exits,
		// so one that exited at once would leave a slower peer
		// resolving its name for ever.
		if len(os.Args) > 2 && os.Args[2] == "resolve" {
			began := time.Now()
			defer func() {
				// For bench-e2e -explain: when the program began, and
				// how long resolving its peers took.
				fmt.Fprintf(os.Stderr, "began %d, resolved all in %d ms\n", began.UnixNano(), resolved.Milliseconds())
			}()
			g, err := sdk.FromEnv()
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			for _, w := range g.World() {
				wait := 5 * time.Millisecond
				for {
					if _, err := net.LookupHost(w.Name); err == nil {
						break
					}
					time.Sleep(wait)
					wait = min(2*wait, 200*time.Millisecond)
				}
			}
			resolved = time.Since(began)
			fmt.Printf("stamp %d\n", time.Now().UnixNano())
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if err := g.Barrier(ctx, 7399); err != nil {
				fmt.Fprintln(os.Stderr, "stamp: waiting for the others:", err)
				os.Exit(1)
			}
			return
		}
		fmt.Printf("stamp %d\n", time.Now().UnixNano())
	case "escape":
		dir := os.Args[2]
		report := func(what string, err error) {
			if err != nil {
				fmt.Println(what, "refused:", err)
			} else {
				fmt.Println(what, "done")
			}
		}
		report("mknod block", syscall.Mknod(dir+"/blk", syscall.S_IFBLK|0o666, 8<<8))
		report("mknod char", syscall.Mknod(dir+"/chr", syscall.S_IFCHR|0o666, 1<<8|3))
		err := os.WriteFile(dir+"/suid", []byte("#!/bin/sh\n"), 0o755)
		if err == nil {
			err = os.Chmod(dir+"/suid", 0o4755|os.ModeSetuid)
		}
		report("setuid file", err)
		if st, err := os.Stat(dir + "/suid"); err == nil {
			fmt.Printf("the guest sees suid as %v\n", st.Mode())
		}
	case "flood":
		target := os.Args[2]
		if target == "events" {
			ents, _ := os.ReadDir("/sys/class/virtio-ports")
			for _, e := range ents {
				if b, _ := os.ReadFile("/sys/class/virtio-ports/" + e.Name() + "/name"); strings.TrimSpace(string(b)) == "cohort.events" {
					target = "/dev/" + e.Name()
				}
			}
		}
		f, err := os.OpenFile(target, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		chunk := []byte(strings.Repeat("flood ", 1000))
		for {
			if _, err := f.Write(chunk); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
		}
	case "listen":
		l, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println("listening")
		for {
			c, err := l.Accept()
			if err != nil {
				os.Exit(1)
			}
			c.Close()
		}
	case "probe":
		for _, a := range os.Args[2:] {
			c, err := net.DialTimeout("tcp", a, time.Second)
			if err != nil {
				fmt.Println("closed", a)
				continue
			}
			c.Close()
			fmt.Println("open", a)
		}
	}
}

// acceptOne listens on port, says so, and returns its first connection.
func acceptOne(port string) net.Conn {
	l, err := net.Listen("tcp", ":"+port)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("listening")
	c, err := l.Accept()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	return c
}

// peers greets every other worker of the gang by name and waits for every
// one's greeting.
func peers(port int) error {
	g, err := sdk.FromEnv()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	world, me := g.World(), g.WorldRank()
	// The names the release wrote into the hosts file, if any.
	hosts, _ := os.ReadFile("/etc/hosts")
	for _, line := range strings.Split(string(hosts), "\n") {
		if f := strings.Fields(line); len(f) == 2 {
			for _, w := range world {
				if f[1] == w.Name {
					fmt.Printf("hosts file: %s %s\n", f[1], f[0])
				}
			}
		}
	}
	for _, w := range world {
		addrs, err := net.LookupHost(w.Name)
		if err != nil {
			return fmt.Errorf("resolving %s: %w", w.Name, err)
		}
		fmt.Printf("resolved %s %v\n", w.Name, addrs)
	}
	// Its own hostname, as MPI launchers and the JVM look it up: the
	// address its peers dial.
	self, _ := os.Hostname()
	addrs, err := net.LookupHost(self)
	if err != nil || len(addrs) == 0 || addrs[0] != os.Getenv("COHORT_IP") {
		return fmt.Errorf("own hostname %q resolves to %v (%v), want COHORT_IP %s", self, addrs, err, os.Getenv("COHORT_IP"))
	}
	fmt.Printf("own hostname %s %v\n", self, addrs)
	l, err := g.Listen(port)
	if err != nil {
		return err
	}
	got := make(chan string, len(world))
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b, _ := io.ReadAll(io.LimitReader(c, 256))
				got <- string(b)
			}()
		}
	}()
	for i, w := range world {
		if i == me {
			continue
		}
		c, err := g.Dial(ctx, w.Group, w.Rank, port)
		if err != nil {
			return err
		}
		fmt.Fprintf(c, "hello from %s", world[me].Name)
		c.Close()
	}
	for i := 0; i < len(world)-1; i++ {
		select {
		case m := <-got:
			fmt.Printf("got %q\n", m)
		case <-ctx.Done():
			return fmt.Errorf("%d of %d greetings: %w", i, len(world)-1, ctx.Err())
		}
	}
	// Stay until every peer has had this worker's greeting too.
	return g.Barrier(ctx, port+1)
}
