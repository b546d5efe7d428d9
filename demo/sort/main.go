// Command sort is the demo's coupled workload: a distributed sort. Each
// worker of the gang generates its share of 100-byte records (a 10-byte
// key and a 90-byte value, laid out as gensort's, deterministic from a
// seed), partitions them by key range, shuffles them all-to-all over TCP
// to the worker that owns each range (found by name), sorts its range and
// reports its count, first and last key and checksum to the worker of
// world rank 0, which checks that the ranges are in global order and that
// the count and checksum of the output match the input's.
//
// It uses only cohort's worker SDK to find and reach its peers.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/sdk"
)

const (
	recordSize = 100
	keySize    = 10
	// progressEvery spaces the words on stderr of a worker that waits
	// for a peer.
	progressEvery = 30 * time.Second
)

var (
	records = flag.Int("records", 50000, "records each worker generates")
	seed    = flag.Uint64("seed", 1, "seed of the generator")
	port    = flag.Int("port", 7300, "shuffle port; the barrier uses port+1, the reports port+2")
	timeout = flag.Duration("timeout", 5*time.Minute, "give up after this long")
	ackWait = flag.Duration("ack-wait", 20*time.Second, "how long a report waits for rank 0's answer before it is sent again")
)

// report is what each worker tells rank 0.
type report struct {
	Rank                  int
	In, Out               int
	InSum, OutSum         uint64
	First, Last           string // hex keys
	GenMs, ShufMs, SortMs int64
}

func main() {
	flag.Parse()
	g, err := sdk.FromEnv()
	if err != nil {
		fail("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if err := run(ctx, g, os.Stdout); err != nil {
		fail("%v", err)
	}
}

// run is one worker's part of the sort; world rank 0 also verifies it.
func run(ctx context.Context, g *sdk.Gang, stdout io.Writer) error {
	me, world := g.WorldRank(), g.World()
	w := len(world)

	// Everybody starts the clock together.
	if err := g.Barrier(ctx, *port+1); err != nil {
		return err
	}
	start := time.Now()
	in := generate(me, *records, *seed)
	var inSum uint64
	for _, r := range in {
		inSum += uint64(crc32.ChecksumIEEE(r))
	}
	buckets := make([][][]byte, w)
	for _, r := range in {
		b := int(binary.BigEndian.Uint16(r[:2])) * w >> 16
		buckets[b] = append(buckets[b], r)
	}
	gen := time.Since(start)

	// All-to-all: receive from every other worker while sending to each.
	// Each share is acknowledged once it is held whole; a sender tries
	// again until it is (a dial that timed out on the sender's side after
	// the handshake, under load, delivers nothing whole), and each
	// sender's share is kept once.
	l, err := g.Listen(*port)
	if err != nil {
		return err
	}
	stopListen := context.AfterFunc(ctx, func() { l.Close() })
	defer stopListen()
	received := map[int][][]byte{}
	var mu sync.Mutex
	all := make(chan struct{})
	var allOnce sync.Once
	go serveEach(l, func(c net.Conn) {
		from, rs, err := receive(c, w)
		if err == nil && from == me {
			err = fmt.Errorf("a share claims to come from this worker")
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "sort: a shuffle connection from %s: %v (its sender retries)\n", c.RemoteAddr(), err)
			return
		}
		mu.Lock()
		received[from] = rs
		whole := len(received) == w-1
		mu.Unlock()
		// Acknowledged before the listener may close.
		c.Write([]byte{'k'})
		if whole {
			allOnce.Do(func() { close(all) })
		}
	})
	var swg sync.WaitGroup
	sendErrs := make(chan error, w)
	for j, peer := range world {
		if j == me {
			continue
		}
		swg.Add(1)
		go func() {
			defer swg.Done()
			if err := deliver(ctx, g, peer, *port, func(c net.Conn) error { return send(c, me, buckets[j]) }); err != nil {
				sendErrs <- fmt.Errorf("sending to %s: %w", peer.Name, err)
			}
		}()
	}
	swg.Wait()
	close(sendErrs)
	if err := <-sendErrs; err != nil {
		return err
	}
	select {
	case <-all:
	case <-ctx.Done():
		return fmt.Errorf("receiving: %d of %d shares arrived: %w", len(received), w-1, ctx.Err())
	}
	mu.Lock()
	mine := buckets[me]
	for _, rs := range received {
		mine = append(mine, rs...)
	}
	mu.Unlock()
	l.Close()
	shuf := time.Since(start) - gen

	sort.Slice(mine, func(a, b int) bool { return bytes.Compare(mine[a][:keySize], mine[b][:keySize]) < 0 })
	var outSum uint64
	for _, r := range mine {
		outSum += uint64(crc32.ChecksumIEEE(r))
	}
	took := time.Since(start)
	rep := report{Rank: me, In: len(in), Out: len(mine), InSum: inSum, OutSum: outSum,
		GenMs: gen.Milliseconds(), ShufMs: shuf.Milliseconds(), SortMs: (took - gen - shuf).Milliseconds()}
	if len(mine) > 0 {
		rep.First, rep.Last = hex.EncodeToString(mine[0][:keySize]), hex.EncodeToString(mine[len(mine)-1][:keySize])
	}
	fmt.Fprintf(stdout, "sort worker %d/%d (%s): generated %d, kept %d after the shuffle, sorted; first %s last %s checksum %016x (generate %d ms, shuffle %d ms, sort %d ms)\n",
		me, w, world[me].Name, rep.In, rep.Out, rep.First, rep.Last, rep.OutSum, rep.GenMs, rep.ShufMs, rep.SortMs)

	if me != 0 {
		return sendReport(ctx, g, rep)
	}
	return verify(ctx, g, w, rep, start, stdout)
}

// sendReport delivers a worker's report to rank 0.
func sendReport(ctx context.Context, g *sdk.Gang, rep report) error {
	body, err := json.Marshal(rep)
	if err != nil {
		return err
	}
	body = append(body, '\n')
	if err := deliver(ctx, g, g.World()[0], *port+2, func(c net.Conn) error {
		c.SetWriteDeadline(time.Now().Add(*ackWait))
		_, err := c.Write(body)
		return err
	}); err != nil {
		return fmt.Errorf("reporting: %w", err)
	}
	return nil
}

// deliver sends something to a peer's port with write and returns once
// the peer has acknowledged it, sending it again until it has. Bytes
// written into a socket are not delivered yet, and a connection can die
// on either side under load; an answer is the only proof. A receiver
// listens until it holds everything it waits for and then closes: a
// peer that was reached once and now refuses connections has ours (or
// failed, which fails the job without our help).
func deliver(ctx context.Context, g *sdk.Gang, to sdk.Worker, port int, write func(net.Conn) error) error {
	reached := false
	for {
		// Until the peer is first reached, each round of dialling ends
		// after progressEvery with a word on stderr, so a sort that
		// hangs here says where.
		wait := progressEvery
		if reached {
			wait = *ackWait
		}
		dctx, cancel := context.WithTimeout(ctx, wait)
		c, err := g.Dial(dctx, to.Group, to.Rank, port)
		cancel()
		if err != nil && !reached && ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "sort: %s not reached in %s (%v); still trying\n", to.Name, wait, err)
			continue
		}
		if err != nil && reached && ctx.Err() == nil {
			// Tried for ackWait and never connected: refused (the peer
			// closed its listener), unreachable or silent (its VM is
			// off, which happens only after its program exited). Either
			// way it had ours, or failed without our help. Only a name
			// that does not resolve yet is worth another round.
			var dnsErr *net.DNSError
			if !errors.As(err, &dnsErr) {
				return nil
			}
			continue
		}
		if err != nil {
			return err
		}
		reached = true
		// A peer that stops reading without a reset would hold a write
		// for as long as TCP retries; the job's deadline ends it.
		stop := context.AfterFunc(ctx, func() { c.Close() })
		err = write(c)
		if err == nil {
			err = awaitAck(c)
		}
		stop()
		c.Close()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w", to.Name, ctx.Err())
		}
		fmt.Fprintf(os.Stderr, "sort: %s did not acknowledge (%v); sending again\n", to.Name, err)
	}
}

// verify collects every worker's report and checks the sort.
func verify(ctx context.Context, g *sdk.Gang, w int, own report, start time.Time, stdout io.Writer) error {
	l, err := g.Listen(*port + 2)
	if err != nil {
		return err
	}
	defer l.Close()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()
	// Each connection is read on its own, under a deadline: one slow or
	// broken sender must not hold up the others' reports.
	arrived := make(chan report)
	done := make(chan struct{})
	defer close(done)
	go serveEach(l, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(*ackWait))
		var r report
		if err := json.NewDecoder(io.LimitReader(c, 4096)).Decode(&r); err != nil || r.Rank <= 0 || r.Rank >= w {
			fmt.Fprintf(os.Stderr, "sort: a report from %s: rank %d, %v (its sender retries)\n", c.RemoteAddr(), r.Rank, err)
			return
		}
		// Acknowledged first: once the last report is in, rank 0
		// goes on and may exit.
		c.Write([]byte{'k'})
		select {
		case arrived <- r:
		case <-done:
		}
	})
	byRank := map[int]report{0: own}
	// A report that does not come is said on stderr, with who is
	// missing, so a sort that hangs here says where.
	waiting := time.NewTicker(progressEvery)
	defer waiting.Stop()
	for len(byRank) < w {
		select {
		case r := <-arrived:
			byRank[r.Rank] = r
		case <-waiting.C:
			var missing []int
			for r := 1; r < w; r++ {
				if _, ok := byRank[r]; !ok {
					missing = append(missing, r)
				}
			}
			fmt.Fprintf(os.Stderr, "sort: waiting for the reports of ranks %v\n", missing)
		case <-ctx.Done():
			return fmt.Errorf("collecting reports: %d of %d: %w", len(byRank), w, ctx.Err())
		}
	}
	took := time.Since(start)
	var reps []report
	for _, r := range byRank {
		reps = append(reps, r)
	}
	sort.Slice(reps, func(a, b int) bool { return reps[a].Rank < reps[b].Rank })
	var in, out int
	var inSum, outSum uint64
	ordered := true
	last := ""
	for _, r := range reps {
		in, out, inSum, outSum = in+r.In, out+r.Out, inSum+r.InSum, outSum+r.OutSum
		if r.Out > 0 {
			if last != "" && r.First < last {
				ordered = false
			}
			last = r.Last
		}
	}
	ok := ordered && in == out && inSum == outSum
	fmt.Fprintf(stdout, "sort: %d records (%d MB) across %d workers in %d ms: %.0f records/s; global order %s; count %d in, %d out; checksum %016x in, %016x out: %s\n",
		out, out*recordSize>>20, w, took.Milliseconds(), float64(out)/took.Seconds(), okWord(ordered), in, out, inSum, outSum, verdict(ok))
	if !ok {
		return fmt.Errorf("the sort is wrong")
	}
	return nil
}

func okWord(ok bool) string {
	if ok {
		return "ok"
	}
	return "BROKEN"
}

func verdict(ok bool) string {
	if ok {
		return "VERIFIED"
	}
	return "FAILED"
}

// generate makes worker rank's records: record i of the whole input is a
// function of the seed and i alone.
func generate(rank, n int, seed uint64) [][]byte {
	buf := make([]byte, n*recordSize)
	out := make([][]byte, n)
	for k := 0; k < n; k++ {
		i := uint64(rank)*uint64(n) + uint64(k)
		r := buf[k*recordSize : (k+1)*recordSize]
		s := seed ^ (i * 0x9e3779b97f4a7c15)
		a, b := splitmix(&s), splitmix(&s)
		binary.BigEndian.PutUint64(r[0:8], a)
		binary.BigEndian.PutUint16(r[8:10], uint16(b))
		r[10], r[11] = 0x00, 0x11
		copy(r[12:44], fmt.Sprintf("%032X", i))
		r[44], r[45] = 0x88, 0x99
		for f := 46; f < 98; f++ {
			r[f] = 'A' + byte((i+uint64(f))%26)
		}
		r[98], r[99] = 0xCC, 0xDD
		out[k] = r
	}
	return out
}

func splitmix(s *uint64) uint64 {
	*s += 0x9e3779b97f4a7c15
	z := *s
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// serveEach hands each connection l accepts to handle in a goroutine of
// its own, and closes it after, until l is closed.
func serveEach(l net.Listener, handle func(net.Conn)) {
	for {
		c, err := l.Accept()
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			// Out of descriptors or buffers, for a while: the senders
			// wait for us, so keep accepting, and say why.
			fmt.Fprintf(os.Stderr, "sort: accepting a connection: %v\n", err)
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go func() {
			defer c.Close()
			handle(c)
		}()
	}
}

// send writes a worker's share for a peer: its world rank, the record
// count, the records.
func send(c net.Conn, from int, rs [][]byte) error {
	bw := bufio.NewWriterSize(c, 1<<16)
	if err := binary.Write(bw, binary.BigEndian, [2]uint32{uint32(from), uint32(len(rs))}); err != nil {
		return err
	}
	for _, r := range rs {
		if _, err := bw.Write(r); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// awaitAck waits for the receiver's word that it holds what was sent.
func awaitAck(c net.Conn) error {
	c.SetReadDeadline(time.Now().Add(*ackWait))
	var ack [1]byte
	if _, err := io.ReadFull(c, ack[:]); err != nil {
		return fmt.Errorf("no acknowledgement: %w", err)
	}
	if ack[0] != 'k' {
		return fmt.Errorf("acknowledged with %q", ack[:])
	}
	return nil
}

// receive reads one peer's share: from whom, and its records.
func receive(c net.Conn, w int) (int, [][]byte, error) {
	br := bufio.NewReaderSize(c, 1<<16)
	var h [2]uint32
	if err := binary.Read(br, binary.BigEndian, &h); err != nil {
		return 0, nil, err
	}
	from, n := int(h[0]), h[1]
	if from >= w || n > 1<<26 {
		return 0, nil, fmt.Errorf("a peer announced rank %d and %d records", from, n)
	}
	buf := make([]byte, int(n)*recordSize)
	if _, err := io.ReadFull(br, buf); err != nil {
		return 0, nil, err
	}
	out := make([][]byte, n)
	for k := range out {
		out[k] = buf[k*recordSize : (k+1)*recordSize]
	}
	return from, out, nil
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "sort: "+format+"\n", args...)
	os.Exit(1)
}
