package jobspec

import (
	"slices"

	"github.com/hashicorp/nomad/api"
)

// TaskDrivers are the task drivers a group's workers need on their node:
// those of its tasks (cohort's barrier task included) and of the Connect
// proxies Nomad adds to it, sorted and each once. Nomad places a group
// only where each is detected and healthy.
func TaskDrivers(tg *api.TaskGroup) []string {
	var out []string
	add := func(d string) {
		if d != "" && !slices.Contains(out, d) {
			out = append(out, d)
		}
	}
	for _, t := range tg.Tasks {
		if t != nil {
			add(t.Driver)
		}
	}
	for _, svc := range tg.Services {
		if svc == nil || svc.Connect == nil {
			continue
		}
		if c := svc.Connect; c.SidecarService != nil || c.Gateway != nil {
			// Nomad injects the proxy as a task of the docker driver
			// unless the sidecar task names another.
			d := "docker"
			if c.SidecarTask != nil && c.SidecarTask.Driver != "" {
				d = c.SidecarTask.Driver
			}
			add(d)
		}
	}
	slices.Sort(out)
	return out
}
