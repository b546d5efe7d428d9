package main

import (
	"bufio"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// reapAll waits, up to limit, for every remaining process to be gone, so
// that the sockets they held are closed (and their FINs queued) before
// drainTCP looks.
func reapAll(limit time.Duration) {
	deadline := time.Now().Add(limit)
	var ws unix.WaitStatus
	for time.Now().Before(deadline) {
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		switch {
		case err == unix.EINTR || pid > 0:
		case err != nil: // ECHILD: nobody left
			return
		default:
			time.Sleep(time.Millisecond)
		}
	}
}

// drainTCP waits, up to limit, until no TCP connection has data or a FIN
// still on its way out. On a host, bytes a program wrote into a socket
// are delivered after it exits: the kernel owns them. Here the VM powers
// off right after the program, and would take them along; a worker that
// sends its result to a peer and exits would lose the tail of it.
func drainTCP(limit time.Duration) {
	deadline := time.Now().Add(limit)
	wait := time.Millisecond
	for time.Now().Before(deadline) {
		pending := 0
		for _, p := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
			if f, err := os.Open(p); err == nil {
				pending += unsentTCP(f)
				f.Close()
			}
		}
		if pending == 0 {
			return
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// TCP states in /proc/net/tcp (include/net/tcp_states.h).
const (
	tcpEstablished = 0x01
	tcpFinWait1    = 0x04
	tcpCloseWait   = 0x08
	tcpLastAck     = 0x09
	tcpClosing     = 0x0B
)

// unsentTCP counts the connections in a /proc/net/tcp table that still
// have something to deliver: queued bytes not yet acknowledged, or a FIN
// not yet acknowledged. A socket whose peer has vanished would keep us
// waiting until the limit, which bounds it.
func unsentTCP(r io.Reader) int {
	n := 0
	sc := bufio.NewScanner(r)
	sc.Scan() // the header
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 5 {
			continue
		}
		st, err := strconv.ParseUint(f[3], 16, 8)
		if err != nil {
			continue
		}
		tx, _, _ := strings.Cut(f[4], ":")
		queued, err := strconv.ParseUint(tx, 16, 64)
		if err != nil {
			continue
		}
		switch st {
		case tcpFinWait1, tcpClosing, tcpLastAck:
			n++
		case tcpEstablished, tcpCloseWait:
			if queued > 0 {
				n++
			}
		}
	}
	return n
}
