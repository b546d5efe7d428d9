package state

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/cohort-dev/cohort/scheduler/placement"
)

// The log's encodings. Commands were JSON from the start, and every
// server still reads JSON; CodecBinary is a compact encoding that the
// leader writes once every server of the group has said it reads it
// (Member.Codec). Decoding JSON was the largest single cost of applying
// an admission on each replica, and every replica applies every entry:
// a batch of 16 admissions decodes in 448 µs from JSON and in 36 µs from
// this encoding (`go test ./scheduler/state -bench Codec`, on the
// project's 2-core CI machine).
//
// The binary form is a marker byte no JSON text starts with, a version
// byte, and the command's fields in a fixed order: integers as varints,
// strings and byte strings with their length, times as UTC Unix seconds
// and nanoseconds (a time comes back in UTC, the same instant), and each
// slice, map and pointer with a count that keeps nil apart from empty,
// as JSON does. A field added to Command or to the types it carries must
// be added here; TestCodecMatchesJSON fills every field by reflection
// and fails until it is. The order is fixed per version: a field added
// is written only by a new version, which the leader writes once every
// server has recorded that it reads it, as for the first.
const (
	CodecJSON = 0
	// CodecBinary is the binary encoding's first version.
	CodecBinary = 1
	// CodecBinary2 adds a group's task drivers (placement.Group.Drivers).
	CodecBinary2 = 2
	// CodecNewest is the newest encoding this version reads and writes.
	CodecNewest = CodecBinary2

	binaryMarker = 0xc1 // never the first byte of JSON (nor of UTF-8)
)

// maxDecode bounds the lengths a decoder believes, so corrupt input is
// an error and not an allocation of whatever the length says.
const maxDecode = 1 << 30

// EncodeAs serialises a command for the log in the given encoding.
func (c *Command) EncodeAs(codec int) ([]byte, error) {
	if codec < CodecBinary {
		return json.Marshal(c)
	}
	e := encoder{buf: make([]byte, 0, 256), version: min(codec, CodecNewest)}
	e.buf = append(e.buf, binaryMarker, byte(e.version))
	e.command(c)
	if e.err != nil {
		return nil, e.err
	}
	return e.buf, nil
}

// ErrUnknownEncoding is a log entry in an encoding this version cannot
// read: one written by a newer server.
var ErrUnknownEncoding = errors.New("log entry in an unknown encoding")

// DecodeCommand reads a command in either encoding.
func DecodeCommand(b []byte) (*Command, error) {
	var c Command
	if len(b) > 0 && b[0] == binaryMarker {
		if len(b) < 2 {
			return nil, errors.New("binary command cut short")
		}
		if b[1] < CodecBinary || b[1] > CodecNewest {
			return nil, fmt.Errorf("%w (binary, version %d)", ErrUnknownEncoding, b[1])
		}
		d := decoder{buf: b[2:], version: int(b[1])}
		d.command(&c, 0)
		if d.err == nil && len(d.buf) > 0 {
			d.err = fmt.Errorf("%d bytes after the command", len(d.buf))
		}
		if d.err != nil {
			return nil, fmt.Errorf("decoding binary command: %w", d.err)
		}
		return &c, nil
	}
	if len(b) > 0 && !isJSONStart(b[0]) {
		// Neither encoding this version knows: a newer one.
		return nil, fmt.Errorf("%w (first byte %#x)", ErrUnknownEncoding, b[0])
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, err
	}
	return &c, nil
}

// isJSONStart says whether a command's first byte can begin the JSON
// object every JSON entry is.
func isJSONStart(b byte) bool {
	return b == '{' || b == ' ' || b == '\t' || b == '\n' || b == '\r'
}

// encoder refuses what JSON would refuse (a Nomad job that is not JSON,
// a time outside years 0-9999): the state is saved as JSON in snapshots,
// and an entry that cannot be would break every snapshot after it.
type encoder struct {
	buf     []byte
	err     error
	version int // the binary version written
}

func (e *encoder) uint(v uint64) { e.buf = binary.AppendUvarint(e.buf, v) }
func (e *encoder) int(v int64)   { e.buf = binary.AppendVarint(e.buf, v) }
func (e *encoder) str(s string) {
	if !utf8.ValidString(s) {
		s = asJSON(s)
	}
	e.uint(uint64(len(s)))
	e.buf = append(e.buf, s...)
}

// asJSON replaces each byte that is not UTF-8 with U+FFFD, as JSON's
// encoding does: replicas that applied the log and replicas restored
// from a (JSON) snapshot must hold the same strings.
func asJSON(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n == 1 {
			b.WriteRune(utf8.RuneError)
		} else {
			b.WriteString(s[i : i+n])
		}
		i += n
	}
	return b.String()
}
func (e *encoder) bool(v bool) {
	if v {
		e.buf = append(e.buf, 1)
	} else {
		e.buf = append(e.buf, 0)
	}
}

// count writes a length that keeps nil (0) apart from empty (1).
func (e *encoder) count(n int, isNil bool) {
	if isNil {
		e.uint(0)
		return
	}
	e.uint(uint64(n) + 1)
}

func (e *encoder) bytes(b []byte) {
	e.count(len(b), b == nil)
	e.buf = append(e.buf, b...)
}

func (e *encoder) time(t time.Time) {
	if y := t.Year(); (y < 0 || y > 9999) && e.err == nil {
		e.err = fmt.Errorf("time %v is outside years 0-9999", t)
	}
	if t.IsZero() {
		e.buf = append(e.buf, 0)
		return
	}
	e.buf = append(e.buf, 1)
	e.int(t.Unix())
	e.uint(uint64(t.Nanosecond()))
}

func (e *encoder) strs(s []string) {
	e.count(len(s), s == nil)
	for _, v := range s {
		e.str(v)
	}
}

// sorted gives a map's keys in order, so that one command always
// encodes to the same bytes.
func sorted[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (e *encoder) ints(m map[string]int) {
	e.count(len(m), m == nil)
	for _, k := range sorted(m) {
		e.str(k)
		e.int(int64(m[k]))
	}
}

func (e *encoder) command(c *Command) {
	e.str(string(c.Op))
	e.time(c.At)
	e.str(c.JobID)
	e.bool(c.Job != nil)
	if c.Job != nil {
		e.job(c.Job)
	}
	if c.Nomad != nil && !json.Valid(c.Nomad) && e.err == nil {
		e.err = errors.New("the command's Nomad job is not valid JSON")
	}
	e.bytes(c.Nomad)
	e.bool(c.Decision != nil)
	if c.Decision != nil {
		e.decision(c.Decision)
	}
	e.str(c.Reason)
	e.str(c.Alloc)
	e.str(c.Instance)
	e.bool(c.Boot != nil)
	if b := c.Boot; b != nil {
		e.time(b.At)
		e.str(b.Instance)
		e.str(b.Group)
		e.int(int64(b.Rank))
		e.str(b.Address)
	}
	e.uint(c.Index)
	e.uint(c.Version)
	e.int(int64(c.Attempt))
	e.int(int64(c.Run))
	e.strs(c.Allocs)
	e.time(c.RetryAt)
	e.count(len(c.Ends), c.Ends == nil)
	for _, k := range sorted(c.Ends) {
		e.str(k)
		e.time(c.Ends[k])
	}
	e.bool(c.Member != nil)
	if m := c.Member; m != nil {
		e.str(m.ID)
		e.str(m.RaftAddr)
		e.str(m.HTTPAddr)
		e.int(int64(m.Codec))
	}
	e.count(len(c.Commands), c.Commands == nil)
	for _, sub := range c.Commands {
		e.bool(sub != nil)
		if sub != nil {
			e.command(sub)
		}
	}
	e.bool(c.Lease != nil)
	if l := c.Lease; l != nil {
		e.str(l.Node)
		e.str(l.Address)
		e.str(l.Subnet)
		e.time(l.GrantedAt)
		e.time(l.RenewedAt)
	}
	e.str(c.Range)
	e.int(int64(c.Prefix))
	e.bytes(c.Secret)
	e.time(c.Before)
}

func (e *encoder) job(j *placement.Job) {
	e.str(j.ID)
	e.str(j.Namespace)
	e.int(int64(j.Priority))
	e.uint(j.Seq)
	e.strs(j.Datacenters)
	e.str(j.Pool)
	e.int(int64(j.MaxRuntime))
	e.int(int64(j.GangTimeout))
	e.count(len(j.Groups), j.Groups == nil)
	for i := range j.Groups {
		g := &j.Groups[i]
		e.str(g.Name)
		e.int(int64(g.Count))
		e.int(int64(g.CPU))
		e.int(int64(g.MemoryMB))
		e.ints(g.Devices)
		e.count(len(g.DeviceConstraints), g.DeviceConstraints == nil)
		for _, k := range sorted(g.DeviceConstraints) {
			e.str(k)
			cs := g.DeviceConstraints[k]
			e.count(len(cs), cs == nil)
			for _, dc := range cs {
				e.str(dc.Attribute)
				e.str(dc.Operator)
				e.str(dc.Value)
			}
		}
		e.bool(g.DistinctHosts)
		e.int(int64(g.MaxPerNode))
		if e.version >= CodecBinary2 {
			e.strs(g.Drivers)
		}
	}
}

func (e *encoder) decision(d *placement.Decision) {
	e.str(d.Job)
	e.count(len(d.Workers), d.Workers == nil)
	for _, w := range d.Workers {
		e.str(w.Group)
		e.int(int64(w.Index))
		e.str(w.Node)
		e.ints(w.Devices)
	}
}

// decoder reads what encoder wrote; the first error sticks and every
// read after it returns zero values.
type decoder struct {
	buf     []byte
	err     error
	version int // the binary version read
}

func (d *decoder) fail(format string, a ...any) {
	if d.err == nil {
		d.err = fmt.Errorf(format, a...)
	}
	d.buf = nil
}

func (d *decoder) uint() uint64 {
	v, n := binary.Uvarint(d.buf)
	if n <= 0 {
		d.fail("bad or truncated integer")
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

func (d *decoder) int64() int64 {
	v, n := binary.Varint(d.buf)
	if n <= 0 {
		d.fail("bad or truncated integer")
		return 0
	}
	d.buf = d.buf[n:]
	return v
}

func (d *decoder) int() int {
	v := d.int64()
	if v > math.MaxInt || v < math.MinInt {
		d.fail("integer %d out of range", v)
		return 0
	}
	return int(v)
}

// length reads a length and checks that that many bytes remain.
func (d *decoder) length(n uint64) int {
	if n > uint64(len(d.buf)) || n > maxDecode {
		d.fail("length %d past the end of the command", n)
		return 0
	}
	return int(n)
}

func (d *decoder) str() string {
	n := d.length(d.uint())
	s := string(d.buf[:n])
	d.buf = d.buf[n:]
	return s
}

func (d *decoder) bool() bool {
	if len(d.buf) == 0 {
		d.fail("truncated")
		return false
	}
	b := d.buf[0]
	d.buf = d.buf[1:]
	if b > 1 {
		d.fail("bad flag %d", b)
	}
	return b == 1
}

// count reads what encoder.count wrote: -1 for nil. Every element takes
// at least one byte, so a count past the bytes left is corrupt.
func (d *decoder) count() int {
	n := d.uint()
	if n == 0 {
		return -1
	}
	return d.length(n - 1)
}

func (d *decoder) bytes() []byte {
	n := d.count()
	if n < 0 {
		return nil
	}
	b := append([]byte{}, d.buf[:n]...)
	d.buf = d.buf[n:]
	return b
}

func (d *decoder) time() time.Time {
	if !d.bool() {
		return time.Time{}
	}
	sec := d.int64()
	nsec := d.uint()
	if nsec >= 1e9 {
		d.fail("bad nanoseconds %d", nsec)
		return time.Time{}
	}
	return time.Unix(sec, int64(nsec)).UTC()
}

func (d *decoder) strs() []string {
	n := d.count()
	if n < 0 {
		return nil
	}
	s := make([]string, n)
	for i := range s {
		s[i] = d.str()
	}
	return s
}

func (d *decoder) ints() map[string]int {
	n := d.count()
	if n < 0 {
		return nil
	}
	m := make(map[string]int, n)
	for range n {
		k := d.str()
		m[k] = d.int()
	}
	return m
}

// maxDepth bounds nested batches: the leader never nests them deeper
// than one.
const maxDepth = 4

func (d *decoder) command(c *Command, depth int) {
	if depth > maxDepth {
		d.fail("batches nested deeper than %d", maxDepth)
		return
	}
	c.Op = Op(d.str())
	c.At = d.time()
	c.JobID = d.str()
	if d.bool() {
		c.Job = &placement.Job{}
		d.job(c.Job)
	}
	c.Nomad = d.bytes()
	if d.bool() {
		c.Decision = &placement.Decision{}
		d.decision(c.Decision)
	}
	c.Reason = d.str()
	c.Alloc = d.str()
	c.Instance = d.str()
	if d.bool() {
		c.Boot = &Boot{At: d.time(), Instance: d.str(), Group: d.str(), Rank: d.int(), Address: d.str()}
	}
	c.Index = d.uint()
	c.Version = d.uint()
	c.Attempt = d.int()
	c.Run = d.int()
	c.Allocs = d.strs()
	c.RetryAt = d.time()
	if n := d.count(); n >= 0 {
		c.Ends = make(map[string]time.Time, n)
		for range n {
			k := d.str()
			c.Ends[k] = d.time()
		}
	}
	if d.bool() {
		c.Member = &Member{ID: d.str(), RaftAddr: d.str(), HTTPAddr: d.str(), Codec: d.int()}
	}
	if n := d.count(); n >= 0 {
		c.Commands = make([]*Command, n)
		for i := range c.Commands {
			if d.bool() {
				c.Commands[i] = &Command{}
				d.command(c.Commands[i], depth+1)
			}
		}
	}
	if d.bool() {
		c.Lease = &Lease{Node: d.str(), Address: d.str(), Subnet: d.str(), GrantedAt: d.time(), RenewedAt: d.time()}
	}
	c.Range = d.str()
	c.Prefix = d.int()
	c.Secret = d.bytes()
	c.Before = d.time()
}

func (d *decoder) job(j *placement.Job) {
	j.ID = d.str()
	j.Namespace = d.str()
	j.Priority = d.int()
	j.Seq = d.uint()
	j.Datacenters = d.strs()
	j.Pool = d.str()
	j.MaxRuntime = time.Duration(d.int64())
	j.GangTimeout = time.Duration(d.int64())
	n := d.count()
	if n < 0 {
		return
	}
	j.Groups = make([]placement.Group, n)
	for i := range j.Groups {
		g := &j.Groups[i]
		g.Name = d.str()
		g.Count = d.int()
		g.CPU = d.int()
		g.MemoryMB = d.int()
		g.Devices = d.ints()
		if n := d.count(); n >= 0 {
			g.DeviceConstraints = make(map[string][]placement.DeviceConstraint, n)
			for range n {
				k := d.str()
				var cs []placement.DeviceConstraint
				if m := d.count(); m >= 0 {
					cs = make([]placement.DeviceConstraint, m)
					for i := range cs {
						cs[i] = placement.DeviceConstraint{Attribute: d.str(), Operator: d.str(), Value: d.str()}
					}
				}
				g.DeviceConstraints[k] = cs
			}
		}
		g.DistinctHosts = d.bool()
		g.MaxPerNode = d.int()
		if d.version >= CodecBinary2 {
			g.Drivers = d.strs()
		}
	}
}

func (d *decoder) decision(dec *placement.Decision) {
	dec.Job = d.str()
	n := d.count()
	if n < 0 {
		return
	}
	dec.Workers = make([]placement.Worker, n)
	for i := range dec.Workers {
		w := &dec.Workers[i]
		w.Group = d.str()
		w.Index = d.int()
		w.Node = d.str()
		w.Devices = d.ints()
	}
}
