package placement

import (
	"strings"
	"testing"
	"time"

	psstructs "github.com/hashicorp/nomad/plugins/shared/structs"
)

func TestDeviceConstraints(t *testing.T) {
	big := node("big", 8000, 8000)
	big.Devices["nvidia/gpu/H100 80GB HBM3"] = 2
	big.DeviceAttrs = attrs("nvidia/gpu/H100 80GB HBM3", "memory", "81559 MiB", "pcie_gen", "5", "mig_mode", "false", "driver_version", "580.159.04")
	small := node("small", 8000, 8000)
	small.Devices["nvidia/gpu/T4"] = 4
	small.DeviceAttrs = attrs("nvidia/gpu/T4", "memory", "15360 MiB", "pcie_gen", "3")
	nodes := []Node{big, small}
	place := func(count, per int, cs ...DeviceConstraint) (Decision, bool) {
		j := job("j", 50, 1, time.Minute, Group{Name: "w", Count: count, CPU: 10, MemoryMB: 10,
			Devices: map[string]int{"nvidia/gpu": per}, DeviceConstraints: map[string][]DeviceConstraint{"nvidia/gpu": cs}})
		return newInventory(nodes).place(j)
	}
	onNodes := func(d Decision) string {
		var s []string
		for _, w := range d.Workers {
			s = append(s, w.Node)
		}
		return strings.Join(s, ",")
	}
	mem40 := DeviceConstraint{Attribute: "${device.attr.memory}", Operator: ">=", Value: "40 GiB"}
	if d, ok := place(2, 1, mem40); !ok || onNodes(d) != "big,big" {
		t.Errorf("memory >= 40 GiB: %v %s", ok, onNodes(d))
	}
	if _, ok := place(3, 1, mem40); ok {
		t.Error("3 workers each needing an H100 fit on a node with 2")
	}
	if d, ok := place(4, 1, DeviceConstraint{Attribute: "${device.model}", Operator: "=", Value: "T4"}); !ok || onNodes(d) != "small,small,small,small" {
		t.Errorf("model = T4: %v %s", ok, onNodes(d))
	}
	if d, ok := place(1, 1, DeviceConstraint{Attribute: "${device.attr.pcie_gen}", Operator: "<", Value: "4"}); !ok || onNodes(d) != "small" {
		t.Errorf("pcie_gen < 4: %v %s", ok, onNodes(d))
	}
	if d, ok := place(1, 1, DeviceConstraint{Attribute: "${device.attr.mig_mode}", Operator: "is_not_set"}); !ok || onNodes(d) != "small" {
		t.Errorf("mig_mode is_not_set: %v %s", ok, onNodes(d))
	}
	if d, ok := place(1, 1, DeviceConstraint{Attribute: "${device.model}", Operator: "regexp", Value: "^H100"}); !ok || onNodes(d) != "big" {
		t.Errorf("model regexp: %v %s", ok, onNodes(d))
	}
	// As Nomad decides: != holds where the attribute is absent;
	// asking for what no node reports, comparing across units or kinds
	// of value (whatever the operator), or a regexp on a number, fits
	// nowhere.
	if d, ok := place(1, 1, DeviceConstraint{Attribute: "${device.attr.mig_mode}", Operator: "!=", Value: "false"}); !ok || onNodes(d) != "small" {
		t.Errorf("mig_mode != false: %v %s", ok, onNodes(d))
	}
	for _, c := range []DeviceConstraint{
		{Attribute: "${device.attr.nvlink}", Operator: "=", Value: "true"},
		{Attribute: "${device.attr.memory}", Operator: ">=", Value: "1000 MHz"},
		{Attribute: "${device.attr.memory}", Operator: ">=", Value: "1 TiB"},
		{Attribute: "${device.attr.memory}", Operator: "!=", Value: "80"},
		{Attribute: "${device.attr.memory}", Operator: "!=", Value: "fast"},
		{Attribute: "${device.attr.pcie_gen}", Operator: "regexp", Value: "5"},
	} {
		if d, ok := place(1, 1, c); ok {
			t.Errorf("%+v placed on %s", c, onNodes(d))
		}
	}
	j := job("j", 50, 1, time.Minute, Group{Name: "w", Count: 3, CPU: 10, MemoryMB: 10,
		Devices: map[string]int{"nvidia/gpu": 1}, DeviceConstraints: map[string][]DeviceConstraint{"nvidia/gpu": {mem40}}})
	if ok, why := Feasible(nodes, j); ok || !strings.Contains(why, "1× nvidia/gpu where nvidia/gpu device.attr.memory >= 40 GiB") {
		t.Errorf("Feasible = %v %q", ok, why)
	}
}

// attrs are one device kind's attributes, parsed as Nomad parses them.
func attrs(kind string, kv ...string) map[string]map[string]*psstructs.Attribute {
	m := map[string]*psstructs.Attribute{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = psstructs.ParseAttribute(kv[i+1])
	}
	return map[string]map[string]*psstructs.Attribute{kind: m}
}
