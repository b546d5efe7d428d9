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
	for _, p := range connectProxies(tg) {
		add(p.driver)
	}
	slices.Sort(out)
	return out
}

// proxy is a Connect proxy task Nomad adds to a group when it registers
// the job: for each service with a sidecar service or a gateway.
type proxy struct {
	driver   string
	cpu, mem int
}

// connectProxies are the proxy tasks Nomad 1.6 injects into tg: the
// docker driver and 250 MHz, 128 MiB (its connectSidecarResources),
// unless the sidecar task names its own driver or resources.
func connectProxies(tg *api.TaskGroup) []proxy {
	var out []proxy
	for _, svc := range tg.Services {
		if svc == nil || svc.Connect == nil {
			continue
		}
		c := svc.Connect
		if c.SidecarService == nil && c.Gateway == nil {
			continue // native: no proxy
		}
		p := proxy{driver: "docker", cpu: 250, mem: 128}
		if st := c.SidecarTask; st != nil {
			if st.Driver != "" {
				p.driver = st.Driver
			}
			if r := st.Resources; r != nil {
				// Nomad's defaults for fields a resources block leaves out.
				p.cpu, p.mem = 100, 300
				if r.CPU != nil {
					p.cpu = *r.CPU
				}
				if r.MemoryMB != nil {
					p.mem = *r.MemoryMB
				}
			}
		}
		out = append(out, p)
	}
	return out
}
