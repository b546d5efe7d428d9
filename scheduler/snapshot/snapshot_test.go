package snapshot

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	at := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	if err := Write(&buf, Header{Index: 42, Server: "s1", SavedAt: at, Jobs: 3}, []byte(`{"Jobs":{}}`)); err != nil {
		t.Fatal(err)
	}
	h, st, err := Read(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if h.Index != 42 || h.Server != "s1" || !h.SavedAt.Equal(at) || h.Jobs != 3 || h.Size != 11 || string(st) != `{"Jobs":{}}` {
		t.Fatalf("read back %+v %q", h, st)
	}
}

// Every way a file can be wrong is refused with a reason, never restored.
func TestDamagedRefused(t *testing.T) {
	var buf bytes.Buffer
	if err := Write(&buf, Header{Index: 1}, []byte(`{"Jobs":{"a":1}}`)); err != nil {
		t.Fatal(err)
	}
	good := buf.String()
	for name, c := range map[string]struct{ file, want string }{
		"empty":     {"", "not a cohort snapshot"},
		"other":     {"{\"Jobs\":{}}\n", "not a cohort snapshot"},
		"truncated": {good[:len(good)-3], "truncated"},
		"long line": {"cohort-snapshot 1\n" + strings.Repeat("x", 10000) + "\n", "line too long"},
		"trailing":  {good + "x", "after its end"},
		"edited":    {strings.Replace(good, `"a":1`, `"a":2`, 1), "damaged"},
		"no header": {"cohort-snapshot 1\n", "snapshot header"},
		"huge":      {"cohort-snapshot 1\n{\"Size\":999999999999}\n", "at most"},
		"negative":  {"cohort-snapshot 1\n{\"Size\":-1}\n", "at most"},
	} {
		_, _, err := Read(strings.NewReader(c.file))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: got %v, want an error with %q", name, err, c.want)
		}
	}
}
