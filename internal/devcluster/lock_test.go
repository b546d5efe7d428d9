package devcluster

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

// A dev network is refused while another holds its ports' tag or its
// /24, naming the other's process, and may come up once the other is
// gone; one that never came up takes nothing down.
func TestOneNetworkPerTagAndSubnet(t *testing.T) {
	defer func(d string) { lockDir = d }(lockDir)
	lockDir = t.TempDir()
	first := newDevNet(4646)
	if err := first.lock(); err != nil {
		t.Fatal(err)
	}
	pid := "pid " + strconv.Itoa(os.Getpid())
	same := newDevNet(4646)
	if err := same.lock(); err == nil || !strings.Contains(err.Error(), pid) || !strings.Contains(err.Error(), "ports") {
		t.Fatalf("a second network of the same tag: %v", err)
	}
	if err := same.down(); err != nil || same.locks != nil {
		t.Fatalf("down of a network that never came up: %v", err)
	}
	// 30246 maps to 4646's /24.
	if clash := newDevNet(30246); clash.prefix != first.prefix {
		t.Fatalf("test premise: %s and %s", clash.prefix, first.prefix)
	} else if err := clash.lock(); err == nil || !strings.Contains(err.Error(), first.prefix+".0/24") {
		t.Fatalf("a network on the same subnet: %v", err)
	}
	other := newDevNet(5646)
	if err := other.lock(); err != nil {
		t.Fatalf("a network of another tag and subnet: %v", err)
	}
	other.unlock()
	first.unlock()
	if err := same.lock(); err != nil {
		t.Fatalf("after the first let go: %v", err)
	}
	same.unlock()
}
