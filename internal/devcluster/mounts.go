package devcluster

import "github.com/cohort-dev/cohort/internal/mountinfo"

// UnmountUnder detaches every mount at or below dir (what Nomad's clients
// leave in their allocation directories), deepest first.
func UnmountUnder(dir string) error { return mountinfo.UnmountUnder(dir) }
