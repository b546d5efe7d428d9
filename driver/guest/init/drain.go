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
// sends its result to a peer and exits would lose the tail of it. A
// connection whose queue has not shrunk for 3 s is not waited for: its
// peer is gone (another worker's VM that powered off answers nothing) or
// not reading.
func drainTCP(limit time.Duration) {
	deadline := time.Now().Add(limit)
	d := newDrain(3 * time.Second)
	wait := time.Millisecond
	for {
		now := time.Now()
		cur := map[string]uint64{}
		for _, p := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
			if f, err := os.Open(p); err == nil {
				unsentTCP(f, cur)
				f.Close()
			}
		}
		if d.waiting(now, cur) == 0 || now.After(deadline) {
			return
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
}

// drain follows connections' queues from one look to the next.
type drain struct {
	stall time.Duration
	least map[string]uint64    // the smallest queue seen
	moved map[string]time.Time // when it last got smaller (or was first seen)
}

func newDrain(stall time.Duration) *drain {
	return &drain{stall: stall, least: map[string]uint64{}, moved: map[string]time.Time{}}
}

// waiting counts the connections in cur (address -> queued bytes) still
// worth waiting for at now: those whose queue got smaller, or appeared,
// less than stall ago.
func (d *drain) waiting(now time.Time, cur map[string]uint64) int {
	n := 0
	for k, q := range cur {
		if l, ok := d.least[k]; !ok || q < l {
			d.least[k], d.moved[k] = q, now
		}
		if now.Sub(d.moved[k]) < d.stall {
			n++
		}
	}
	return n
}

// TCP states in /proc/net/tcp (include/net/tcp_states.h).
const (
	tcpEstablished = 0x01
	tcpFinWait1    = 0x04
	tcpCloseWait   = 0x08
	tcpLastAck     = 0x09
	tcpClosing     = 0x0B
)

// unsentTCP adds to into the connections of a /proc/net/tcp table that
// still have something to deliver, keyed by their addresses: queued
// bytes not yet acknowledged (a FIN not yet acknowledged counts as one),
// or a closing state still short of its peer's acknowledgement.
func unsentTCP(r io.Reader, into map[string]uint64) {
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
			into[f[1]+">"+f[2]] = queued
		case tcpEstablished, tcpCloseWait:
			if queued > 0 {
				into[f[1]+">"+f[2]] = queued
			}
		}
	}
}
