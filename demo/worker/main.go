// Command worker is the demo's worker program: it runs inside a worker VM
// and reports who it is in its gang and where it can be reached.
package main

import (
	"fmt"
	"os"
	"runtime"
)

func main() {
	host, _ := os.Hostname()
	fmt.Printf("worker %s of %s: hostname %s, address %s, reachable as w%s.%s.service.consul (%s/%s, %d cpu)\n",
		os.Getenv("COHORT_RANK"), os.Getenv("COHORT_SIZE"), host, os.Getenv("COHORT_IP"),
		os.Getenv("COHORT_RANK"), os.Getenv("COHORT_ADDRESS"), runtime.GOOS, runtime.GOARCH, runtime.NumCPU())
}
