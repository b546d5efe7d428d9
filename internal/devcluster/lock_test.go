package devcluster

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// A second cluster of the same tag is refused while the first holds its
// lock, naming the first's process, and may start once the first is gone.
func TestOneClusterPerTag(t *testing.T) {
	defer func(d string) { lockDir = d }(lockDir)
	lockDir = t.TempDir()
	first, err := lockTag(4646)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lockTag(4646); err == nil || !strings.Contains(err.Error(), "pid "+strconv.Itoa(os.Getpid())) {
		t.Fatalf("a second cluster of the same tag: %v", err)
	}
	other, err := lockTag(5646)
	if err != nil {
		t.Fatalf("a cluster of another tag: %v", err)
	}
	other.Close()
	first.Close()
	again, err := lockTag(4646)
	if err != nil {
		t.Fatalf("after the first stopped: %v", err)
	}
	again.Close()
}
