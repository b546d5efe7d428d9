package main

import (
	"strings"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
)

func TestUnsentTCP(t *testing.T) {
	const header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	for _, tc := range []struct {
		name, rows string
		want       int
	}{
		{"listener and idle connection", `
   0: 00000000:1C84 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0200D50A:1C84 0300D50A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1`, 0},
		{"established with bytes queued", `
   0: 0200D50A:9C40 0300D50A:1C84 01 00010000:00000000 01:00000014 00000000     0        0 3 1`, 1},
		{"closed by the program, data and FIN in flight", `
   0: 0200D50A:9C40 0300D50A:1C84 04 0000F000:00000000 01:00000014 00000000     0        0 0 1`, 1},
		{"FIN unacknowledged, nothing queued", `
   0: 0200D50A:9C40 0300D50A:1C84 04 00000000:00000000 01:00000014 00000000     0        0 0 1`, 1},
		{"peer has everything", `
   0: 0200D50A:9C40 0300D50A:1C84 05 00000000:00000000 00:00000000 00000000     0        0 0 1
   1: 0200D50A:9C41 0300D50A:1C84 06 00000000:00000000 03:00000100 00000000     0        0 0 1`, 0},
		{"closing and last ack", `
   0: 0200D50A:9C40 0300D50A:1C84 0B 00000000:00000000 01:00000014 00000000     0        0 0 1
   1: 0200D50A:9C41 0300D50A:1C84 09 00000000:00000000 01:00000014 00000000     0        0 0 1`, 2},
		{"rubbish lines", "\n   0: x y zz\nshort", 0},
	} {
		got := map[string]uint64{}
		unsentTCP(strings.NewReader(header+strings.TrimPrefix(tc.rows, "\n")), got)
		if len(got) != tc.want {
			t.Errorf("%s: %d connections with something to send (%v), want %d", tc.name, len(got), got, tc.want)
		}
	}
}

func TestHostsFile(t *testing.T) {
	gang := []proto.Host{
		{Name: "w0.sort-sort.service.consul", Address: "10.213.1.2"},
		{Name: "w1.sort-sort.service.consul", Address: "10.213.2.2"},
		{Name: "evil\n0.0.0.0 consul", Address: "10.213.2.3"},
		{Name: "w2.sort-sort.service.consul", Address: "10.213.2.3 extra"},
		{Name: "w3..consul", Address: "10.213.2.4"},
	}
	const local = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	for _, tc := range []struct {
		name string
		a    proto.Assignment
		gang []proto.Host
		want string
	}{
		{"gang", proto.Assignment{Hostname: "sort-1", Address: "10.213.1.2/24"}, gang,
			local + "10.213.1.2\tsort-1\n10.213.1.2\tw0.sort-sort.service.consul\n10.213.2.2\tw1.sort-sort.service.consul\n"},
		{"before the release", proto.Assignment{Hostname: "sort-1", Address: "10.213.1.2/24"}, nil,
			local + "10.213.1.2\tsort-1\n"},
		{"no network", proto.Assignment{Hostname: "hello-0"}, nil, local + "127.0.1.1\thello-0\n"},
		{"bad hostname", proto.Assignment{Hostname: "a b\n1.2.3.4 x", Address: "10.0.0.2/24"}, nil, local},
	} {
		if got := string(hostsFile(&tc.a, tc.gang)); got != tc.want {
			t.Errorf("%s: hosts file:\n%s\nwant:\n%s", tc.name, got, tc.want)
		}
	}
}

// A connection is waited for while its queue shrinks, and given up on
// once it has not shrunk for the stall time (its peer powered off, or
// does not read); one that appears later is waited for from then.
func TestDrainWaitsWhileQueuesShrink(t *testing.T) {
	d := newDrain(3 * time.Second)
	t0 := time.Unix(1000, 0)
	at := func(s float64) time.Time { return t0.Add(time.Duration(s * float64(time.Second))) }
	for _, step := range []struct {
		at   float64
		cur  map[string]uint64
		want int
	}{
		{0, map[string]uint64{"a": 900, "b": 50}, 2},
		{1, map[string]uint64{"a": 600, "b": 50}, 2},
		{2.9, map[string]uint64{"a": 300, "b": 50}, 2},
		// b has not moved for 3 s; a shrank at 2.9.
		{3, map[string]uint64{"a": 300, "b": 50}, 1},
		// Progress is a queue below its smallest yet: one that grew
		// back and shrank again, still above it, is not (the programs
		// have exited; nothing writes into these sockets any more).
		{5, map[string]uint64{"a": 700, "b": 50}, 1},
		{5.9, map[string]uint64{"a": 400, "b": 50}, 0},
		{8.8, map[string]uint64{"a": 400, "b": 50, "c": 10}, 1},
		{10, map[string]uint64{"a": 400, "b": 50, "c": 9}, 1},
		{12.9, map[string]uint64{"a": 400, "b": 50, "c": 9}, 1},
		{13, map[string]uint64{"a": 400, "b": 50, "c": 9}, 0},
		// Delivered connections drop out of the table.
		{14, map[string]uint64{}, 0},
	} {
		if got := d.waiting(at(step.at), step.cur); got != step.want {
			t.Errorf("at %.1fs: waiting for %d connections, want %d", step.at, got, step.want)
		}
	}
}
