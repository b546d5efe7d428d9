// Package sdk is what a cohort worker program imports to find its gang and
// talk to it: who it is (job, group, rank, size), the name of every other
// worker, connections to a peer that wait until the peer listens, and a
// barrier across the whole gang over TCP.
//
// Every worker of a gang gets its identity in its environment (COHORT_JOB,
// COHORT_GROUP, COHORT_RANK, COHORT_SIZE, COHORT_ADDRESS) and the Consul
// name of every worker in COHORT_PEERS; names resolve from inside every
// worker, on every node, before the gang starts. COHORT_LISTEN_HOST, when
// set, is the one address Listen binds (for several workers sharing a
// host outside VMs, as in tests and benchmarks).
//
//	g, err := sdk.FromEnv()
//	if err != nil {
//		log.Fatal(err)
//	}
//	if g.Rank == 0 {
//		l, _ := g.Listen(7000)
//		c, _ := l.Accept() // rank 1 dials in
//		io.Copy(os.Stdout, c)
//	} else if g.Rank == 1 {
//		c, _ := g.Dial(ctx, g.Group, 0, 7000) // waits until rank 0 listens
//		fmt.Fprintln(c, "hello from rank 1")
//	}
//	g.Barrier(ctx, 7001) // every worker of the gang meets here
package sdk

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

// Peers is one group's workers, by rank.
type Peers struct {
	Group string
	Names []string
}

// Worker is one worker of the gang.
type Worker struct {
	Group string
	Rank  int
	Name  string
}

// Gang is this worker's gang as its environment describes it.
type Gang struct {
	Job, Group string
	Rank, Size int
	// Groups are every group's workers, in the job's group order.
	Groups []Peers
	// ListenHost is the address Listen binds; "" is every address.
	ListenHost string
	// DialTimeout bounds each connection attempt of Dial.
	DialTimeout time.Duration
}

// FromEnv reads the gang from the worker's environment.
func FromEnv() (*Gang, error) { return fromEnv(os.Getenv) }

func fromEnv(env func(string) string) (*Gang, error) {
	g := &Gang{Job: env("COHORT_JOB"), Group: env("COHORT_GROUP"), DialTimeout: 5 * time.Second, ListenHost: env("COHORT_LISTEN_HOST")}
	var err error
	if g.Rank, err = strconv.Atoi(env("COHORT_RANK")); err != nil {
		return nil, fmt.Errorf("COHORT_RANK=%q: not a cohort worker: %w", env("COHORT_RANK"), err)
	}
	if g.Size, err = strconv.Atoi(env("COHORT_SIZE")); err != nil {
		return nil, fmt.Errorf("COHORT_SIZE=%q: not a cohort worker: %w", env("COHORT_SIZE"), err)
	}
	if err := json.Unmarshal([]byte(env("COHORT_PEERS")), &g.Groups); err != nil {
		return nil, fmt.Errorf("COHORT_PEERS: %w", err)
	}
	if _, err := g.Name(g.Group, g.Rank); err != nil {
		return nil, fmt.Errorf("COHORT_PEERS does not name this worker: %w", err)
	}
	return g, nil
}

// Name is the Consul name of a worker.
func (g *Gang) Name(group string, rank int) (string, error) {
	for _, p := range g.Groups {
		if p.Group != group {
			continue
		}
		if rank < 0 || rank >= len(p.Names) {
			return "", fmt.Errorf("group %s has no worker of rank %d (it has %d)", group, rank, len(p.Names))
		}
		return p.Names[rank], nil
	}
	return "", fmt.Errorf("the gang has no group %q", group)
}

// World lists every worker of the gang, group after group in the job's
// order: a worker's index in it is its world rank.
func (g *Gang) World() []Worker {
	var out []Worker
	for _, p := range g.Groups {
		for r, n := range p.Names {
			out = append(out, Worker{Group: p.Group, Rank: r, Name: n})
		}
	}
	return out
}

// WorldRank is this worker's index in World.
func (g *Gang) WorldRank() int {
	n := 0
	for _, p := range g.Groups {
		if p.Group == g.Group {
			return n + g.Rank
		}
		n += len(p.Names)
	}
	return -1
}

// Listen listens on port for peers.
func (g *Gang) Listen(port int) (net.Listener, error) {
	return net.Listen("tcp", net.JoinHostPort(g.ListenHost, strconv.Itoa(port)))
}

// Dial connects to a worker's port, trying again (the name not resolving
// yet, nothing listening yet) until it connects or ctx ends.
func (g *Gang) Dial(ctx context.Context, group string, rank, port int) (net.Conn, error) {
	name, err := g.Name(group, rank)
	if err != nil {
		return nil, err
	}
	return dialRetry(ctx, net.JoinHostPort(name, strconv.Itoa(port)), g.DialTimeout)
}

func dialRetry(ctx context.Context, addr string, timeout time.Duration) (net.Conn, error) {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	backoff := 20 * time.Millisecond
	d := net.Dialer{Timeout: timeout}
	for {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("dialing %s: %w (last: %w)", addr, ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

// Barrier returns once every worker of the gang has called it with the
// same port. The worker of world rank 0 listens on port; every other
// worker connects and says who it is; once all have, rank 0 answers each.
func (g *Gang) Barrier(ctx context.Context, port int) error {
	world := g.World()
	if len(world) <= 1 {
		return nil
	}
	me := g.WorldRank()
	if me != 0 {
		// A connection can die before rank 0 answers (rank 0 closing the
		// listener of an earlier barrier on the same port, say): try
		// again until ctx ends.
		for {
			err := g.arrive(ctx, world[0].Name, port, me)
			if err == nil {
				return nil
			}
			if ctx.Err() != nil {
				return fmt.Errorf("barrier: %w", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	l, err := g.Listen(port)
	if err != nil {
		return fmt.Errorf("barrier: %w", err)
	}
	defer l.Close()
	stopOnDone(ctx, l)
	arrived := map[uint32]net.Conn{}
	defer func() {
		for _, c := range arrived {
			c.Close()
		}
	}()
	for len(arrived) < len(world)-1 {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("barrier: %d of %d workers arrived: %w", len(arrived)+1, len(world), ctx.Err())
			}
			return fmt.Errorf("barrier: %w", err)
		}
		// A connection that says nothing must not hold the others up.
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var who uint32
		if err := binary.Read(c, binary.BigEndian, &who); err != nil || who == 0 || int(who) >= len(world) {
			c.Close()
			continue
		}
		c.SetReadDeadline(time.Time{})
		if old, ok := arrived[who]; ok {
			old.Close() // the same worker again: keep the newest
		}
		arrived[who] = c
	}
	var errs []error
	for _, c := range arrived {
		if _, err := c.Write([]byte{1}); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// arrive is one worker's arrival at rank 0: it says who it is and waits
// for the answer.
func (g *Gang) arrive(ctx context.Context, rank0 string, port, me int) error {
	c, err := dialRetry(ctx, net.JoinHostPort(rank0, strconv.Itoa(port)), g.DialTimeout)
	if err != nil {
		return err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	if err := binary.Write(c, binary.BigEndian, uint32(me)); err != nil {
		return err
	}
	var ok [1]byte
	if _, err := io.ReadFull(c, ok[:]); err != nil {
		return fmt.Errorf("rank 0 did not answer: %w", err)
	}
	return nil
}

// stopOnDone closes c when ctx ends, unblocking its readers.
func stopOnDone(ctx context.Context, c io.Closer) {
	go func() {
		<-ctx.Done()
		c.Close()
	}()
}
