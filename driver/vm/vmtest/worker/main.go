// Command worker is the program the VM tests run inside worker VMs.
//
//	worker exit N    print to stdout and stderr, exit N
//	worker rand      print hostname, 16 random bytes and the address of eth0
//	worker sleep     sleep until killed
//	worker env       print the environment
//	worker serve P   accept one TCP connection on port P, print what it says
//	worker dial A    connect to host:port A, say hello; exit 1 if it fails
package main

import (
	"crypto/rand"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

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
	case "sleep":
		fmt.Println("sleeping")
		time.Sleep(time.Hour)
	case "serve":
		l, err := net.Listen("tcp", ":"+os.Args[2])
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
	case "env":
		for _, e := range os.Environ() {
			fmt.Println(e)
		}
	}
}
