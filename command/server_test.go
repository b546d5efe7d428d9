package command

import (
	"strings"
	"testing"

	"github.com/mitchellh/cli"
)

// TestServerRefusesGCFloorOutOfRange: a usage error, before anything starts.
func TestServerRefusesGCFloorOutOfRange(t *testing.T) {
	for _, v := range []string{"-1", "1048577"} {
		ui := cli.NewMockUi()
		c := &ServerCommand{UI: ui}
		if code := c.Run([]string{"-dev", "-gc-heap-floor-mb=" + v}); code != ExitUsage {
			t.Fatalf("-gc-heap-floor-mb=%s: exit %d, want %d (usage)", v, code, ExitUsage)
		}
		if e := ui.ErrorWriter.String(); !strings.Contains(e, "-gc-heap-floor-mb must be from 0") {
			t.Errorf("-gc-heap-floor-mb=%s: error output %q does not say what is wrong", v, e)
		}
	}
}
