package vm

// Bounds on what a guest can make the host store or read. A worker's
// program runs as root in its VM and can write to the console and to
// cohort's own virtio ports; QEMU writes both into files in the run
// directory (O_APPEND, so they can be cut from outside). The guard keeps
// the console to its last ConsoleKeep bytes once it passes ConsoleLimit,
// and reports a guest that floods the events channel (which only cohort's
// init writes) past EventsLimit so the driver can end it. Readers read
// tails and bounded lines only.

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"
)

// Limits on a guest's files.
const (
	ConsoleLimit = 1 << 20   // the console file is cut back past this
	ConsoleKeep  = 256 << 10 // to its last this many bytes
	EventsLimit  = 1 << 20   // an events file this big is a flood
	// MaxLine bounds one guest line the host reads (an event).
	MaxLine = 64 << 10
	// tailBytes bounds what is read to show a file's last lines.
	tailBytes = 64 << 10
)

// Limits are a machine's bounds; zero fields take the defaults above.
type Limits struct {
	ConsoleLimit, ConsoleKeep, EventsLimit int64
	Every                                  time.Duration
}

func (l Limits) withDefaults() Limits {
	if l.ConsoleLimit == 0 {
		l.ConsoleLimit = ConsoleLimit
	}
	if l.ConsoleKeep == 0 {
		l.ConsoleKeep = ConsoleKeep
	}
	if l.EventsLimit == 0 {
		l.EventsLimit = EventsLimit
	}
	if l.Every == 0 {
		l.Every = 250 * time.Millisecond
	}
	return l
}

// Guard enforces the limits until ctx ends or the VMM exits; it calls
// flood once, with the reason, when the guest floods its events channel.
func (m *Machine) Guard(ctx context.Context, l Limits, flood func(why string)) {
	l = l.withDefaults()
	t := time.NewTicker(l.Every)
	defer t.Stop()
	flooded := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if st, err := os.Stat(m.ConsoleLog()); err == nil && st.Size() > l.ConsoleLimit {
			keepTail(m.ConsoleLog(), l.ConsoleKeep)
		}
		if st, err := os.Stat(m.EventsLog()); err == nil && st.Size() > l.EventsLimit && !flooded {
			flooded = true
			flood(fmt.Sprintf("the guest wrote %d bytes to cohort's event channel (at most %d are allowed): a worker's program must not write to cohort's ports", st.Size(), l.EventsLimit))
		}
		if !m.Alive() {
			return
		}
	}
}

// keepTail cuts a file back to its last keep bytes. The writer appends
// (O_APPEND), so what it writes after the cut lands after the kept tail;
// a few bytes written during the cut may be lost, which a console can
// afford.
func keepTail(path string, keep int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || st.Size() <= keep {
		return err
	}
	buf := make([]byte, keep)
	if _, err := f.ReadAt(buf, st.Size()-keep); err != nil && err != io.EOF {
		return err
	}
	if err := f.Truncate(0); err != nil {
		return err
	}
	_, err = f.WriteAt(append([]byte("[... cut by cohort: the console passed its bound ...]\n"), buf...), 0)
	return err
}

// readTail reads at most the last n bytes of a file.
func readTail(path string, n int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil
	}
	off := max(st.Size()-n, 0)
	b := make([]byte, st.Size()-off)
	k, _ := f.ReadAt(b, off)
	return b[:k]
}

// ReadHead reads at most the first n bytes of a file.
func ReadHead(path string, n int64) []byte {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, n))
	return b
}
