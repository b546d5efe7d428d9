// Command nomad-device-accel is cohort's device plugin for GPUs and other
// PCI accelerators; the Nomad agent starts it from its plugin_dir.
//
// With -fingerprint it prints, once, what it would report to Nomad, for
// checking a node by hand (scripts/gpu-check.sh).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"time"

	"github.com/cohort-dev/cohort/plugin/accel"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"
	"github.com/hashicorp/nomad/plugins/base"
	"github.com/hashicorp/nomad/plugins/device"
)

func main() {
	fs := flag.NewFlagSet("nomad-device-accel", flag.ContinueOnError)
	once := fs.Bool("fingerprint", false, "print the devices as JSON once and exit")
	root := fs.String("sysfs-root", "/sys", "with -fingerprint: where sysfs is")
	noNVML := fs.Bool("no-nvml", false, "with -fingerprint: do not use NVML")
	asJSON := fs.Bool("json", false, "with -fingerprint: print JSON")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if !*once {
		plugins.Serve(func(log hclog.Logger) interface{} { return accel.New(log) })
		return
	}
	if err := fingerprint(*root, !*noNVML, *asJSON); err != nil {
		fmt.Fprintln(os.Stderr, "nomad-device-accel:", err)
		os.Exit(1)
	}
}

func fingerprint(root string, nvml, asJSON bool) error {
	log := hclog.New(&hclog.LoggerOptions{Level: hclog.Info, Output: os.Stderr})
	p := accel.New(log)
	var cfg []byte
	if err := base.MsgPackEncode(&cfg, &accel.Config{FingerprintPeriod: "1m", SysfsRoot: root, NVML: nvml}); err != nil {
		return err
	}
	if err := p.SetConfig(&base.Config{PluginConfig: cfg}); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ch, err := p.Fingerprint(ctx)
	if err != nil {
		return err
	}
	r, ok := <-ch
	if !ok {
		return fmt.Errorf("no fingerprint within 30s")
	}
	if r.Error != nil {
		return r.Error
	}
	var stats []*device.DeviceGroupStats
	if st, err := p.Stats(ctx, 200*time.Millisecond); err == nil {
		if s, ok := <-st; ok {
			stats = s.Groups
		}
	}
	if asJSON {
		b, err := json.MarshalIndent(map[string]any{"groups": r.Devices, "stats": stats}, "", "  ")
		if err != nil {
			return err
		}
		fmt.Println(string(b))
		return nil
	}
	if len(r.Devices) == 0 {
		fmt.Println("no accelerators")
	}
	for _, g := range r.Devices {
		fmt.Printf("%s/%s/%s: %d device(s)\n", g.Vendor, g.Type, g.Name, len(g.Devices))
		for _, d := range g.Devices {
			health := "healthy"
			if !d.Healthy {
				health = "unhealthy: " + d.HealthDesc
			}
			fmt.Printf("  %-42s %s %s\n", d.ID, d.HwLocality.PciBusID, health)
		}
		keys := make([]string, 0, len(g.Attributes))
		for k := range g.Attributes {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Printf("  %-16s = %s\n", k, g.Attributes[k].GoString())
		}
	}
	for _, g := range stats {
		for id, s := range g.InstanceStats {
			fmt.Printf("stats %s:", id)
			keys := make([]string, 0, len(s.Stats.Attributes))
			for k := range s.Stats.Attributes {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				v := s.Stats.Attributes[k]
				switch {
				case v.IntNumeratorVal != nil:
					fmt.Printf(" %s=%d%s", k, *v.IntNumeratorVal, v.Unit)
				case v.FloatNumeratorVal != nil:
					fmt.Printf(" %s=%.1f%s", k, *v.FloatNumeratorVal, v.Unit)
				}
			}
			fmt.Println()
		}
	}
	return nil
}
