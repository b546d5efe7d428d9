package sdk

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// gang makes the workers of a gang whose names are loopback addresses, as
// their environments would describe them.
func gang(t *testing.T, counts map[string]int, order ...string) []*Gang {
	t.Helper()
	var peers []Peers
	n := 2
	for _, g := range order {
		p := Peers{Group: g}
		for r := 0; r < counts[g]; r++ {
			p.Names = append(p.Names, fmt.Sprintf("127.0.0.%d", n))
			n++
		}
		peers = append(peers, p)
	}
	b, _ := json.Marshal(peers)
	var out []*Gang
	for _, g := range order {
		for r := 0; r < counts[g]; r++ {
			env := map[string]string{"COHORT_JOB": "j", "COHORT_GROUP": g, "COHORT_RANK": strconv.Itoa(r),
				"COHORT_SIZE": strconv.Itoa(counts[g]), "COHORT_PEERS": string(b)}
			w, err := fromEnv(func(k string) string { return env[k] })
			if err != nil {
				t.Fatal(err)
			}
			w.ListenHost, _ = w.Name(g, r)
			out = append(out, w)
		}
	}
	return out
}

func TestFromEnv(t *testing.T) {
	ws := gang(t, map[string]int{"coord": 1, "sorter": 3}, "coord", "sorter")
	w := ws[2]
	if w.Group != "sorter" || w.Rank != 1 || w.Size != 3 || w.WorldRank() != 2 || len(w.World()) != 4 {
		t.Errorf("%+v world rank %d", w, w.WorldRank())
	}
	if n, _ := w.Name("coord", 0); n != "127.0.0.2" {
		t.Errorf("coord[0] = %s", n)
	}
	if _, err := w.Name("sorter", 3); err == nil {
		t.Error("a rank past the group's size was named")
	}
	if _, err := fromEnv(func(string) string { return "" }); err == nil || !strings.Contains(err.Error(), "not a cohort worker") {
		t.Errorf("outside a gang: %v", err)
	}
}

// Dial waits for a peer that is not listening yet.
func TestDialWaitsForPeer(t *testing.T) {
	ws := gang(t, map[string]int{"w": 2}, "w")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	got := make(chan string, 1)
	go func() {
		time.Sleep(200 * time.Millisecond) // rank 0 starts late
		l, err := ws[0].Listen(7100)
		if err != nil {
			got <- err.Error()
			return
		}
		defer l.Close()
		c, err := l.Accept()
		if err != nil {
			got <- err.Error()
			return
		}
		line, _ := bufio.NewReader(c).ReadString('\n')
		got <- line
	}()
	c, err := ws[1].Dial(ctx, "w", 0, 7100)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(c, "hello from rank 1")
	c.Close()
	if line := <-got; line != "hello from rank 1\n" {
		t.Errorf("rank 0 got %q", line)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if _, err := ws[1].Dial(short, "w", 0, 7101); err == nil {
		t.Error("dialing a port nobody listens on succeeded")
	}
}

// Nobody leaves the barrier before everybody arrived.
func TestBarrier(t *testing.T) {
	ws := gang(t, map[string]int{"a": 2, "b": 3}, "a", "b")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var mu sync.Mutex
	arrived, leftEarly := 0, false
	var wg sync.WaitGroup
	for i, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * 50 * time.Millisecond)
			mu.Lock()
			arrived++
			mu.Unlock()
			if err := w.Barrier(ctx, 7200); err != nil {
				t.Error(err)
			}
			mu.Lock()
			if arrived < len(ws) {
				leftEarly = true
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	if leftEarly {
		t.Error("a worker left the barrier before all arrived")
	}
	// One missing worker: the others wait until their context ends.
	short, cancel2 := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel2()
	errs := make(chan error, len(ws))
	for _, w := range ws[:len(ws)-1] {
		go func() { errs <- w.Barrier(short, 7201) }()
	}
	for range ws[:len(ws)-1] {
		if err := <-errs; err == nil {
			t.Error("a barrier with a worker missing returned")
		}
	}
}
