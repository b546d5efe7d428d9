package main

import (
	"bytes"
	"context"
	"fmt"
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
