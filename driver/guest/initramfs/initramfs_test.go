package initramfs

import (
	"bytes"
	"compress/gzip"
	"io"
	"os/exec"
	"strings"
	"testing"
)

// TestBuildReadsBackWithCpio checks the archive with the real cpio tool
// when it is installed, else against the format's fixed layout.
func TestBuildReadsBack(t *testing.T) {
	img, err := Build([]byte("#!init"))
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(img))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(zr)
	if len(raw)%4 != 0 {
		t.Errorf("archive length %d is not 4-aligned", len(raw))
	}
	for _, want := range []string{"070701", "dev/console\x00", "init\x00", "#!init", "TRAILER!!!\x00"} {
		if !bytes.Contains(raw, []byte(want)) {
			t.Errorf("archive lacks %q", want)
		}
	}
	if _, err := exec.LookPath("cpio"); err != nil {
		t.Log("cpio not installed; checked the layout only")
		return
	}
	cmd := exec.Command("cpio", "-t", "--quiet")
	cmd.Stdin = bytes.NewReader(raw)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("cpio -t: %v", err)
	}
	names := strings.Fields(string(out))
	if len(names) != len(Dirs)+2 || names[len(names)-1] != "init" {
		t.Errorf("cpio lists %v", names)
	}
}
