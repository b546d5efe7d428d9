// Command worker is the program the VM tests run inside worker VMs.
//
//	worker exit N    print to stdout and stderr, exit N
//	worker rand      print hostname, 16 random bytes and the address of eth0
//	worker sleep     sleep until killed
//	worker env       print the environment
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
	case "env":
		for _, e := range os.Environ() {
			fmt.Println(e)
		}
	}
}
