package placement

import (
	"regexp"
	"strings"

	psstructs "github.com/hashicorp/nomad/plugins/shared/structs"
)

// DeviceConstraint narrows a device request to the kinds whose attributes
// satisfy it, as a Nomad device constraint does: Attribute is
// "${device.attr.<name>}", "${device.vendor}", "${device.type}" or
// "${device.model}"; Operator one of =, !=, <, <=, >, >=, is_set,
// is_not_set, regexp; Value is compared with its unit ("40 GiB" against
// "81559 MiB").
type DeviceConstraint struct {
	Attribute string
	Operator  string `json:",omitempty"`
	Value     string `json:",omitempty"`
}

// DeviceOperators are the operators placement understands.
var DeviceOperators = map[string]bool{"=": true, "==": true, "is": true, "!=": true, "not": true,
	"<": true, "<=": true, ">": true, ">=": true, "is_set": true, "is_not_set": true, "regexp": true}

// satisfies says whether a device kind ("vendor/type/model") with attrs
// meets every constraint. An attribute that is absent satisfies only
// is_not_set, and a comparison between values that cannot be compared
// (a number against a string, GiB against MHz) fails, so a request that
// asks for what a node does not report never lands there.
func satisfies(kind string, attrs map[string]string, cs []DeviceConstraint) bool {
	for _, c := range cs {
		v, ok := deviceTarget(kind, attrs, c.Attribute)
		switch c.Operator {
		case "is_set":
			if !ok {
				return false
			}
			continue
		case "is_not_set":
			if ok {
				return false
			}
			continue
		}
		if !ok || !compare(v, c.Operator, c.Value) {
			return false
		}
	}
	return true
}

func deviceTarget(kind string, attrs map[string]string, target string) (string, bool) {
	t := strings.TrimSuffix(strings.TrimPrefix(target, "${"), "}")
	parts := strings.SplitN(kind, "/", 3)
	if len(parts) != 3 {
		return "", false
	}
	switch t {
	case "device.vendor":
		return parts[0], true
	case "device.type":
		return parts[1], true
	case "device.model":
		return parts[2], true
	}
	if name, ok := strings.CutPrefix(t, "device.attr."); ok {
		v, ok := attrs[name]
		return v, ok
	}
	return "", false
}

func compare(have, op, want string) bool {
	if op == "regexp" {
		re, err := regexp.Compile(want)
		return err == nil && re.MatchString(have)
	}
	a, b := psstructs.ParseAttribute(have), psstructs.ParseAttribute(want)
	c, ok := a.Compare(b)
	if !ok {
		// Different kinds of value: equal only as the same text.
		switch op {
		case "=", "==", "is":
			return have == want
		case "!=", "not":
			return have != want
		}
		return false
	}
	switch op {
	case "=", "==", "is":
		return c == 0
	case "!=", "not":
		return c != 0
	case "<":
		return c < 0
	case "<=":
		return c <= 0
	case ">":
		return c > 0
	case ">=":
		return c >= 0
	}
	return false
}
