package vm

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/cohort-dev/cohort/driver/guest/proto"
)

// Ctl is the host end of a VM's control port.
type Ctl struct {
	conn net.Conn
	enc  *json.Encoder
}

// DialCtl connects to the machine's control port, retrying while the VMM
// is still creating its socket.
func (m *Machine) DialCtl(ctx context.Context) (*Ctl, error) {
	for {
		conn, err := net.Dial("unix", m.CtlSocket())
		if err == nil {
			return &Ctl{conn: conn, enc: json.NewEncoder(conn)}, nil
		}
		if !m.Alive() {
			return nil, fmt.Errorf("connecting to vm control port: %w", ErrGone)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connecting to vm control port: %w", err)
		case <-time.After(time.Millisecond):
		}
	}
}

// Send writes one message (an Assignment or a Command) to the guest.
func (c *Ctl) Send(v any) error {
	c.conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if err := c.enc.Encode(v); err != nil {
		return fmt.Errorf("writing to vm control port: %w", err)
	}
	return nil
}

// Close closes the connection; the guest keeps running.
func (c *Ctl) Close() error { return c.conn.Close() }

// Events follows the machine's events log from the start and sends each
// event on the returned channel, until ctx ends or the VMM exits (then the
// rest of the log is drained and the channel closed).
func (m *Machine) Events(ctx context.Context) <-chan proto.Event {
	out := make(chan proto.Event, 8)
	go func() {
		defer close(out)
		var f *os.File
		for f == nil {
			var err error
			if f, err = os.Open(m.EventsLog()); err == nil {
				break
			}
			if ctx.Err() != nil || !m.Alive() {
				return
			}
			time.Sleep(2 * time.Millisecond)
		}
		defer f.Close()
		r := bufio.NewReader(f)
		var partial []byte
		skipping := false // a line past MaxLine is dropped whole
		gone := false     // the VMM exited: read to the end, then stop
		for {
			// ReadSlice never holds more than the reader's buffer: a
			// guest writing a line without end cannot grow our memory.
			line, err := r.ReadSlice('\n')
			if !skipping {
				partial = append(partial, line...)
			}
			if len(partial) > MaxLine {
				partial, skipping = partial[:0], true
			}
			switch {
			case err == bufio.ErrBufferFull:
				continue
			case err == nil && skipping:
				skipping = false
				continue
			case err == nil:
				var ev proto.Event
				if json.Unmarshal(partial, &ev) == nil {
					select {
					case out <- ev:
					case <-ctx.Done():
						return
					}
				}
				partial = partial[:0]
				continue
			case err != io.EOF:
				return
			}
			// At the end of what is written so far: once the writer is
			// gone, one more pass reads what it wrote last, then stop.
			if gone {
				return
			}
			if !m.Alive() {
				gone = true
				continue
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return out
}

// WaitEvent waits for the first event of the given kind. An error event
// or the VM's end before it is an error that carries the console's tail.
func WaitEvent(ctx context.Context, m *Machine, events <-chan proto.Event, kind string) (proto.Event, error) {
	for {
		select {
		case ev, ok := <-events:
			if !ok {
				return proto.Event{}, fmt.Errorf("vm stopped before %q; console:\n%s", kind, m.ConsoleTail(20))
			}
			if ev.Kind == kind {
				return ev, nil
			}
			if ev.Kind == proto.EvError {
				return ev, fmt.Errorf("guest init: %s", ev.Message)
			}
		case <-ctx.Done():
			return proto.Event{}, fmt.Errorf("waiting for %q: %w; console:\n%s", kind, ctx.Err(), m.ConsoleTail(20))
		}
	}
}

func shortHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:6])
}
