package jobspec

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"
)

// FuzzParse feeds arbitrary bytes to the parser. It must never panic; any
// error must carry a position; and whatever parses must convert to a Nomad
// job whose gang options read back unchanged.
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.hcl")
	for _, name := range files {
		src, err := os.ReadFile(name)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(src)
	}
	f.Fuzz(func(t *testing.T, src []byte) {
		job, err := Parse("fuzz.hcl", src)
		if err != nil {
			diags, ok := err.(Diagnostics)
			if !ok || len(diags) == 0 {
				t.Fatalf("error %T without diagnostics: %v", err, err)
			}
			return
		}
		nj := ToNomad(job)
		g, err := GangFromNomad(nj)
		if err != nil {
			t.Fatalf("parsed job does not read back as a gang: %v", err)
		}
		if g.MaxRuntime != job.MaxRuntime || g.GangTimeout != job.GangTimeout || len(g.Groups) != len(job.Groups) {
			t.Fatalf("gang %+v does not match job %+v", g, job)
		}
		for i, gg := range g.Groups {
			want := GangGroup{Name: job.Groups[i].Name, Count: job.Groups[i].Count, Address: job.Groups[i].Address}
			if !reflect.DeepEqual(gg, want) {
				t.Fatalf("group %d = %+v, want %+v", i, gg, want)
			}
		}
		_ = FormatNomadHCL(nj)
	})
}
