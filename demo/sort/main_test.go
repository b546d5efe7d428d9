package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/sdk"
)

// Six workers on loopback addresses sort their records; rank 0 verifies
// order, count and checksum.
func TestSort(t *testing.T) {
	const w = 6
	*records, *port = 3000, 17300
	peers := sdk.Peers{Group: "sort"}
	for i := 0; i < w; i++ {
		peers.Names = append(peers.Names, fmt.Sprintf("127.0.1.%d", i+1))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	outs := make([]bytes.Buffer, w)
	errs := make([]error, w)
	var wg sync.WaitGroup
	for i := 0; i < w; i++ {
		g := &sdk.Gang{Job: "sort", Group: "sort", Rank: i, Size: w, Groups: []sdk.Peers{peers}, ListenHost: peers.Names[i], DialTimeout: time.Second}
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = run(ctx, g, &outs[i])
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("worker %d: %v", i, err)
		}
	}
	if s := outs[0].String(); !strings.Contains(s, fmt.Sprintf("%d records", w*3000)) || !strings.Contains(s, "VERIFIED") {
		t.Errorf("rank 0 printed:\n%s", s)
	}
}

// The input is the same for the same seed, and records spread over the
// key range.
func TestGenerate(t *testing.T) {
	a, b := generate(2, 100, 7), generate(2, 100, 7)
	for i := range a {
		if !bytes.Equal(a[i], b[i]) || len(a[i]) != recordSize || a[i][10] != 0x00 || a[i][99] != 0xDD {
			t.Fatalf("record %d: %x", i, a[i])
		}
	}
	if bytes.Equal(generate(3, 1, 7)[0], a[0]) {
		t.Error("two workers generated the same record")
	}
}

// A report that rank 0 read but did not answer is sent again; once rank 0
// has stopped listening for good, the sender stops too.
func TestReportRetriedUntilAcknowledged(t *testing.T) {
	oldPort, oldWait := *port, *ackWait
	t.Cleanup(func() { *port, *ackWait = oldPort, oldWait })
	*port, *ackWait = 17400, 500*time.Millisecond
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.2.1:%d", *port+2))
	if err != nil {
		t.Fatal(err)
	}
	peers := sdk.Peers{Group: "sort", Names: []string{"127.0.2.1", "127.0.2.2"}}
	g := &sdk.Gang{Job: "sort", Group: "sort", Rank: 1, Size: 2, Groups: []sdk.Peers{peers}, ListenHost: "127.0.2.2", DialTimeout: time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sent := make(chan error, 1)
	go func() { sent <- sendReport(ctx, g, report{Rank: 1, In: 7}) }()
	// rank0 reads the reports of n tries, acknowledging the last when ack.
	rank0 := func(n int, ack bool) []report {
		var got []report
		for i := 0; i < n; i++ {
			c, err := l.Accept()
			if err != nil {
				t.Fatal(err)
			}
			var r report
			if err := json.NewDecoder(c).Decode(&r); err != nil {
				t.Fatalf("try %d: %v", i+1, err)
			}
			got = append(got, r)
			if ack && i == n-1 {
				c.Write([]byte{'k'})
			}
			c.Close()
		}
		return got
	}
	got := rank0(2, true)
	if err := <-sent; err != nil || len(got) != 2 || got[1].In != 7 {
		t.Fatalf("sendReport: %v; rank 0 read %+v", err, got)
	}

	// Unanswered twice (so it does send again), then nobody listening:
	// rank 0 is done with reports.
	go func() { sent <- sendReport(ctx, g, report{Rank: 1}) }()
	rank0(2, false)
	l.Close()
	select {
	case err := <-sent:
		if err != nil {
			t.Fatalf("after rank 0 closed: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the sender kept trying after rank 0 had closed")
	}
}
