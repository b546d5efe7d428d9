// Package snapshot is the file format of a saved scheduler state: what
// `cohort operator snapshot save` writes and `restore` reads back. A file
// is a magic line, one line of JSON saying what was saved and its SHA-256,
// then the state as the replicas encode it. The checksum guards against a
// truncated or edited file being restored over a cluster's state.
package snapshot

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

const magic = "cohort-snapshot 1"

// MaxSize bounds the state a file may hold, so that a restore request
// cannot make a server buffer without end.
const MaxSize = 256 << 20

// Header says what a snapshot holds.
type Header struct {
	// Index is the last Raft index applied to the saved state.
	Index uint64
	// Server is the replica that saved it, SavedAt when.
	Server  string
	SavedAt time.Time
	// Jobs counts the job runs in the state, for a glance before a
	// restore.
	Jobs   int
	Size   int64
	SHA256 string
}

// Write writes h (its Size and SHA256 filled in from state) and the state.
func Write(w io.Writer, h Header, state []byte) error {
	sum := sha256.Sum256(state)
	h.Size, h.SHA256 = int64(len(state)), hex.EncodeToString(sum[:])
	hb, err := json.Marshal(h)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	buf.WriteString(magic + "\n")
	buf.Write(hb)
	buf.WriteByte('\n')
	if _, err := w.Write(buf.Bytes()); err != nil {
		return err
	}
	_, err = w.Write(state)
	return err
}

// maxHeader bounds the header line.
const maxHeader = 4096

// ReadHeader reads only the header, leaving r at the state.
func ReadHeader(r *bufio.Reader) (Header, error) {
	var h Header
	line, err := readLine(r, len(magic)+1)
	if err != nil || line != magic {
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, errLong) {
			return h, err
		}
		return h, errors.New("not a cohort snapshot (no \"" + magic + "\" line)")
	}
	line, err = readLine(r, maxHeader)
	if err != nil {
		return h, fmt.Errorf("snapshot header: %w", err)
	}
	if err := json.Unmarshal([]byte(line), &h); err != nil {
		return h, fmt.Errorf("snapshot header: %w", err)
	}
	if h.Size < 0 || h.Size > MaxSize {
		return h, fmt.Errorf("snapshot header: a state of %d bytes (at most %d)", h.Size, MaxSize)
	}
	return h, nil
}

var errLong = errors.New("line too long")

// readLine reads up to a newline, refusing lines over max bytes without
// reading further.
func readLine(r *bufio.Reader, max int) (string, error) {
	var b []byte
	for len(b) <= max {
		c, err := r.ReadByte()
		if err != nil {
			return string(b), err
		}
		if c == '\n' {
			return string(b), nil
		}
		b = append(b, c)
	}
	return "", errLong
}

// Read reads a whole snapshot and checks it: the state must be exactly
// Size bytes with the SHA-256 the header gives.
func Read(r io.Reader) (Header, []byte, error) {
	br := bufio.NewReader(r)
	h, err := ReadHeader(br)
	if err != nil {
		return h, nil, err
	}
	// Read as it arrives rather than allocated from the header's word.
	state, err := io.ReadAll(io.LimitReader(br, h.Size+1))
	switch {
	case err != nil:
		return h, nil, fmt.Errorf("snapshot state: %w", err)
	case int64(len(state)) < h.Size:
		return h, nil, fmt.Errorf("snapshot state: %d bytes expected, %d there: the file is truncated", h.Size, len(state))
	case int64(len(state)) > h.Size:
		return h, nil, errors.New("snapshot state: data after its end")
	}
	sum := sha256.Sum256(state)
	if got := hex.EncodeToString(sum[:]); got != h.SHA256 {
		return h, nil, fmt.Errorf("snapshot state: SHA-256 %s, the header says %s: the file is damaged", got, h.SHA256)
	}
	return h, state, nil
}
