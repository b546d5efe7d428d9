package command

import (
	"strings"
	"testing"

	"github.com/mitchellh/cli"
)

// TestServerRefusesNegativeGCFloor: a usage error, before anything starts.
func TestServerRefusesNegativeGCFloor(t *testing.T) {
	ui := cli.NewMockUi()
	c := &ServerCommand{UI: ui}
	if code := c.Run([]string{"-dev", "-gc-heap-floor-mb=-1"}); code != ExitUsage {
		t.Fatalf("exit %d, want %d (usage)", code, ExitUsage)
	}
	if e := ui.ErrorWriter.String(); !strings.Contains(e, "-gc-heap-floor-mb must not be negative") {
		t.Errorf("error output %q does not say what is wrong", e)
	}
}
