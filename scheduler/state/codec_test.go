package state

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"reflect"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/scheduler/placement"
)

// fill sets every exported field reachable from v to a random value,
// nil and empty included, so that a field the binary codec forgets is
// caught without anyone listing it. A kind it does not know fails the
// test: extend fill, then the codec.
func fill(t *testing.T, r *rand.Rand, v reflect.Value, depth int) {
	t.Helper()
	switch v.Type() {
	case reflect.TypeOf(time.Time{}):
		if r.Intn(4) > 0 {
			v.Set(reflect.ValueOf(time.Unix(r.Int63n(1<<34)-1<<33, r.Int63n(1e9)).UTC()))
		}
		return
	case reflect.TypeOf(json.RawMessage{}):
		switch r.Intn(3) {
		case 0:
		case 1:
			v.Set(reflect.ValueOf(json.RawMessage(fmt.Sprintf(`{"ID":"j%d","TaskGroups":[{"Count":%d}]}`, r.Intn(100), r.Intn(9)))))
		default:
			v.Set(reflect.ValueOf(json.RawMessage(`[]`)))
		}
		return
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString([]string{"", "w", "gang-0001", "ns/id", "ünïcode ✓", "10.213.4.0/24"}[r.Intn(6)])
	case reflect.Int, reflect.Int64:
		v.SetInt([]int64{0, 1, -1, 42, 1 << 40, -1 << 50, 1<<63 - 1}[r.Intn(7)])
	case reflect.Uint64:
		v.SetUint([]uint64{0, 1, 300, 1<<64 - 1}[r.Intn(4)])
	case reflect.Uint8:
		v.SetUint(uint64(r.Intn(256)))
	case reflect.Bool:
		v.SetBool(r.Intn(2) == 1)
	case reflect.Struct:
		for i := 0; i < v.NumField(); i++ {
			if v.Type().Field(i).IsExported() {
				fill(t, r, v.Field(i), depth)
			}
		}
	case reflect.Pointer:
		if r.Intn(4) == 0 || (depth > 0 && v.Type() == reflect.TypeOf(&Command{})) {
			return
		}
		v.Set(reflect.New(v.Type().Elem()))
		fill(t, r, v.Elem(), depth+1)
	case reflect.Slice:
		switch r.Intn(5) {
		case 0:
			return
		case 1:
			v.Set(reflect.MakeSlice(v.Type(), 0, 0))
			return
		}
		n := 1 + r.Intn(3)
		v.Set(reflect.MakeSlice(v.Type(), n, n))
		for i := range n {
			fill(t, r, v.Index(i), depth)
		}
	case reflect.Map:
		switch r.Intn(5) {
		case 0:
			return
		case 1:
			v.Set(reflect.MakeMap(v.Type()))
			return
		}
		m := reflect.MakeMap(v.Type())
		for range 1 + r.Intn(3) {
			k := reflect.New(v.Type().Key()).Elem()
			k.SetString(fmt.Sprintf("k%d", r.Intn(10)))
			e := reflect.New(v.Type().Elem()).Elem()
			fill(t, r, e, depth)
			m.SetMapIndex(k, e)
		}
		v.Set(m)
	default:
		t.Fatalf("fill does not know %s (%s): teach it, and the binary codec, the new field", v.Type(), v.Kind())
	}
}

// The binary codec is lossless wherever JSON is: a random command, every
// field set (nested batches, nil and empty slices and maps included),
// decodes from either encoding to the same command.
func TestCodecMatchesJSON(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for i := range 3000 {
		var c Command
		fill(t, r, reflect.ValueOf(&c).Elem(), 0)
		viaJSON, err := c.EncodeAs(CodecJSON)
		if err != nil {
			t.Fatal(err)
		}
		bin, err := c.EncodeAs(CodecNewest)
		if err != nil {
			t.Fatal(err)
		}
		fromJSON, err := DecodeCommand(viaJSON)
		if err != nil {
			t.Fatal(err)
		}
		fromBin, err := DecodeCommand(bin)
		if err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		a, _ := json.Marshal(fromJSON)
		b, _ := json.Marshal(fromBin)
		if !bytes.Equal(a, b) {
			t.Fatalf("case %d decodes differently:\njson:   %s\nbinary: %s", i, a, b)
		}
		// Closer than JSON: nil and empty stay apart in every field
		// (state.go tells a nil Allocs from an empty one), and the
		// Nomad job's bytes are kept as they were.
		if !reflect.DeepEqual(&c, fromBin) {
			o, _ := json.Marshal(&c)
			t.Fatalf("case %d: the binary round trip changed the command:\nin:  %s\nout: %s", i, o, b)
		}
		if again, _ := fromBin.EncodeAs(CodecNewest); !bytes.Equal(again, bin) {
			t.Fatalf("case %d: the binary encoding is not stable", i)
		}
		// The first binary version, which servers of the group may still
		// read only, carries everything but what later versions added.
		v1, err := c.EncodeAs(CodecBinary)
		if err != nil {
			t.Fatal(err)
		}
		fromV1, err := DecodeCommand(v1)
		if err != nil {
			t.Fatalf("case %d, version 1: %v", i, err)
		}
		withoutDrivers(&c)
		if !reflect.DeepEqual(&c, fromV1) {
			o, _ := json.Marshal(&c)
			g, _ := json.Marshal(fromV1)
			t.Fatalf("case %d: version 1 changed more than the drivers:\nin:  %s\nout: %s", i, o, g)
		}
	}
}

// withoutDrivers clears what binary version 1 does not carry: the groups'
// task drivers, in c and its batch.
func withoutDrivers(c *Command) {
	if c.Job != nil {
		for i := range c.Job.Groups {
			c.Job.Groups[i].Drivers = nil
		}
	}
	for _, sub := range c.Commands {
		if sub != nil {
			withoutDrivers(sub)
		}
	}
}

// Times come back as the same instant, in UTC; the zero time stays zero.
func TestCodecTimes(t *testing.T) {
	at := time.Date(2026, 11, 27, 9, 30, 0, 123456789, time.FixedZone("CET", 3600))
	c := &Command{Op: OpFinish, At: at, Ends: map[string]time.Time{"a": at}}
	b, _ := c.EncodeAs(CodecBinary)
	got, err := DecodeCommand(b)
	if err != nil {
		t.Fatal(err)
	}
	if !got.At.Equal(at) || got.At.Location() != time.UTC || !got.Ends["a"].Equal(at) {
		t.Fatalf("At = %v, Ends = %v; want %v in UTC", got.At, got.Ends, at)
	}
	if !got.RetryAt.IsZero() || !got.Before.IsZero() {
		t.Fatalf("zero times came back as %v, %v", got.RetryAt, got.Before)
	}
}

// A command damaged anywhere is an error, never a panic or a huge
// allocation; a version this server does not know is refused.
func TestCodecRefusesCorruptInput(t *testing.T) {
	c := benchBatch(4)
	b, _ := c.EncodeAs(CodecBinary)
	for n := 0; n < len(b); n++ {
		if _, err := DecodeCommand(b[:n]); err == nil {
			t.Fatalf("a command cut to %d of %d bytes decoded", n, len(b))
		}
	}
	if _, err := DecodeCommand(append(append([]byte{}, b...), 0)); err == nil {
		t.Fatal("trailing bytes were accepted")
	}
	if _, err := DecodeCommand([]byte{binaryMarker, CodecNewest + 1}); err == nil {
		t.Fatal("an unknown version was accepted")
	}
	// A length far past the end: the op's string claims 2^40 bytes.
	huge := []byte{binaryMarker, CodecNewest, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20}
	if _, err := DecodeCommand(huge); err == nil {
		t.Fatal("a length past the end was accepted")
	}
	r := rand.New(rand.NewSource(2))
	for range 20000 {
		d := append([]byte{}, b...)
		for range 1 + r.Intn(4) {
			d[2+r.Intn(len(d)-2)] = byte(r.Intn(256))
		}
		DecodeCommand(d) // must not panic
	}
	// Batches nested past maxDepth.
	deep := &Command{Op: OpBatch}
	for range maxDepth + 2 {
		deep = &Command{Op: OpBatch, Commands: []*Command{deep}}
	}
	db, _ := deep.EncodeAs(CodecBinary)
	if _, err := DecodeCommand(db); err == nil {
		t.Fatal("batches nested past the bound decoded")
	}
}

// What JSON refuses to encode, the binary encoding refuses too: the
// state is saved as JSON in snapshots.
func TestCodecRefusesWhatJSONRefuses(t *testing.T) {
	for name, c := range map[string]*Command{
		"nomad":  {Op: OpAdmit, Nomad: json.RawMessage(`{"ID":`)},
		"year":   {Op: OpFinish, At: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)},
		"nested": {Op: OpBatch, Commands: []*Command{{Op: OpAdmit, Nomad: json.RawMessage(`nope`)}}},
	} {
		if _, err := c.EncodeAs(CodecJSON); err == nil {
			t.Errorf("%s: JSON encoded it", name)
		}
		if _, err := c.EncodeAs(CodecBinary); err == nil {
			t.Errorf("%s: the binary encoding took it", name)
		}
	}
}

// An entry in a binary version this server does not know is told apart
// from a corrupt one: the replica stops on the first.
func TestDecodeUnknownVersion(t *testing.T) {
	if _, err := DecodeCommand([]byte{binaryMarker, CodecNewest + 1, 0}); !errors.Is(err, ErrUnknownEncoding) {
		t.Fatalf("a newer version: %v", err)
	}
	if _, err := DecodeCommand([]byte{binaryMarker}); err == nil || errors.Is(err, ErrUnknownEncoding) {
		t.Fatalf("an entry cut short: %v", err)
	}
	if _, err := DecodeCommand([]byte{0xc2, 1, 0}); !errors.Is(err, ErrUnknownEncoding) {
		t.Fatalf("an entry of another marker: %v", err)
	}
	if _, err := DecodeCommand([]byte(` {"Op":"submit"}`)); err != nil {
		t.Fatalf("JSON after a space: %v", err)
	}
	if _, err := DecodeCommand([]byte(`{"Op":`)); err == nil || errors.Is(err, ErrUnknownEncoding) {
		t.Fatalf("JSON cut short: %v", err)
	}
}

// Bytes that are not UTF-8 come back as JSON would give them back (each
// as U+FFFD), so a replica that applied the log and one restored from a
// snapshot agree.
func TestCodecStringsAsJSON(t *testing.T) {
	bad := "ok\xff\xfe\xc3é"
	c := &Command{Op: OpFail, Reason: bad, Allocs: []string{bad}, Job: &placement.Job{ID: "j", Groups: []placement.Group{{Name: bad, Devices: map[string]int{bad: 1}}}}}
	viaJSON, _ := c.EncodeAs(CodecJSON)
	fromJSON, _ := DecodeCommand(viaJSON)
	bin, err := c.EncodeAs(CodecBinary)
	if err != nil {
		t.Fatal(err)
	}
	fromBin, err := DecodeCommand(bin)
	if err != nil {
		t.Fatal(err)
	}
	if fromBin.Reason != fromJSON.Reason || fromBin.Allocs[0] != fromJSON.Allocs[0] || fromBin.Job.Groups[0].Name != fromJSON.Job.Groups[0].Name || !reflect.DeepEqual(fromBin.Job.Groups[0].Devices, fromJSON.Job.Groups[0].Devices) {
		t.Fatalf("binary %q %q %q %v, JSON %q %q %q %v", fromBin.Reason, fromBin.Allocs[0], fromBin.Job.Groups[0].Name, fromBin.Job.Groups[0].Devices,
			fromJSON.Reason, fromJSON.Allocs[0], fromJSON.Job.Groups[0].Name, fromJSON.Job.Groups[0].Devices)
	}
}

// Entries written before the binary codec, JSON, still decode.
func TestDecodeJSONCommand(t *testing.T) {
	c, err := DecodeCommand([]byte(`{"Op":"submit","At":"2026-11-27T09:30:00Z","Job":{"ID":"g","Priority":50,"Groups":[{"Name":"w","Count":2}]}}`))
	if err != nil || c.Op != OpSubmit || c.Job.ID != "g" || c.Job.Groups[0].Count != 2 {
		t.Fatalf("%+v %v", c, err)
	}
}

func FuzzDecodeCommand(f *testing.F) {
	b, _ := benchBatch(2).EncodeAs(CodecBinary)
	f.Add(b)
	f.Add([]byte(`{"Op":"batch","Commands":[{"Op":"submit"}]}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := DecodeCommand(data)
		if err != nil || data[0] != binaryMarker {
			return
		}
		// What decodes must encode back to the same bytes.
		again, _ := c.EncodeAs(CodecBinary)
		if !bytes.Equal(again, data) {
			c2, err := DecodeCommand(again)
			if err != nil {
				t.Fatalf("re-encoding does not decode: %v", err)
			}
			a, _ := json.Marshal(c)
			b, _ := json.Marshal(c2)
			if !bytes.Equal(a, b) {
				t.Fatalf("re-encoding changed the command:\n%s\n%s", a, b)
			}
		}
	})
}

// benchBatch is the batch entry the leader writes for n admissions of
// 8-worker gangs, as bench-scheduler makes them.
func benchBatch(n int) *Command {
	var cmds []*Command
	at := time.Date(2026, 11, 27, 9, 30, 0, 0, time.UTC)
	for i := range n {
		j := &placement.Job{ID: fmt.Sprintf("gang-%06d", i), Priority: 50, Datacenters: []string{"dc1"}, Pool: "default",
			MaxRuntime: time.Hour, Groups: []placement.Group{{Name: "w", Count: 8, CPU: 1000, MemoryMB: 2048}}}
		d := &placement.Decision{Job: j.ID}
		for k := range 8 {
			d.Workers = append(d.Workers, placement.Worker{Group: "w", Index: k, Node: fmt.Sprintf("node-%05d", k*7+i)})
		}
		cmds = append(cmds, &Command{Op: OpAdmit, At: at, Job: j, Decision: d})
	}
	return &Command{Op: OpBatch, Commands: cmds}
}

// go test ./scheduler/state -bench Codec: decoding one 16-admission
// batch, as every replica does for every entry.
func BenchmarkCodecDecode(b *testing.B) {
	for _, codec := range []struct {
		name string
		id   int
	}{{"json", CodecJSON}, {"binary", CodecBinary}} {
		data, _ := benchBatch(16).EncodeAs(codec.id)
		b.Run(codec.name, func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			for b.Loop() {
				if _, err := DecodeCommand(data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCodecEncode(b *testing.B) {
	c := benchBatch(16)
	for _, codec := range []struct {
		name string
		id   int
	}{{"json", CodecJSON}, {"binary", CodecBinary}} {
		b.Run(codec.name, func(b *testing.B) {
			for b.Loop() {
				c.EncodeAs(codec.id)
			}
		})
	}
}
