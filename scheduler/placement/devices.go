package placement

import (
	"regexp"
	"strings"

	psstructs "github.com/hashicorp/nomad/plugins/shared/structs"
)

// DeviceConstraint narrows a device request to the kinds whose attributes
// satisfy it, as a Nomad device constraint does: Attribute is
// "${device.attr.<name>}", "${device.vendor}", "${device.type}" or
// "${device.model}"; Operator one of DeviceOperators; Value a literal,
// compared with its unit ("40 GiB" against "81559 MiB").
type DeviceConstraint struct {
	Attribute string
	Operator  string `json:",omitempty"`
	Value     string `json:",omitempty"`
}

// DeviceOperators are the operators placement evaluates, each as Nomad's
// scheduler does.
var DeviceOperators = map[string]bool{"=": true, "==": true, "is": true, "!=": true, "not": true,
	"<": true, "<=": true, ">": true, ">=": true, "is_set": true, "is_not_set": true, "regexp": true}

// satisfies says whether a device kind ("vendor/type/model") with attrs
// meets every constraint, by Nomad's rules (its checkAttributeConstraint):
// comparisons need both sides and comparable values (a number against a
// string, GiB against MHz, is false whatever the operator); != is true
// when exactly one side is missing; regexp needs a string attribute.
// Placement must agree with Nomad: a gang cohort places where Nomad finds
// no device would wait at the barrier until its gang timeout, and one
// cohort refuses where Nomad would run it is refused for nothing.
func satisfies(kind string, attrs map[string]*psstructs.Attribute, cs []DeviceConstraint) bool {
	for _, c := range cs {
		l, lok := deviceTarget(kind, attrs, c.Attribute)
		r, rok := psstructs.ParseAttribute(c.Value), c.Value != ""
		if !check(c.Operator, l, r, lok, rok) {
			return false
		}
	}
	return true
}

func deviceTarget(kind string, attrs map[string]*psstructs.Attribute, target string) (*psstructs.Attribute, bool) {
	parts := strings.SplitN(kind, "/", 3)
	if len(parts) != 3 {
		return nil, false
	}
	switch target {
	case "${device.vendor}":
		return psstructs.NewStringAttribute(parts[0]), true
	case "${device.type}":
		return psstructs.NewStringAttribute(parts[1]), true
	case "${device.model}":
		return psstructs.NewStringAttribute(parts[2]), true
	}
	if name, ok := strings.CutPrefix(target, "${device.attr."); ok {
		v, ok := attrs[strings.TrimSuffix(name, "}")]
		return v, ok && v != nil
	}
	return nil, false
}

func check(op string, l, r *psstructs.Attribute, lok, rok bool) bool {
	switch op {
	case "is_set":
		return lok
	case "is_not_set":
		return !lok
	case "!=", "not":
		if !lok && !rok {
			return false
		}
		if lok != rok {
			return true
		}
		c, ok := l.Compare(r)
		return ok && c != 0
	case "regexp":
		if !lok || !rok {
			return false
		}
		ls, ok1 := l.GetString()
		rs, ok2 := r.GetString()
		if !ok1 || !ok2 {
			return false
		}
		re, err := regexp.Compile(rs)
		return err == nil && re.MatchString(ls)
	}
	if !lok || !rok {
		return false
	}
	c, ok := l.Compare(r)
	if !ok {
		return false
	}
	switch op {
	case "=", "==", "is", "":
		return c == 0
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
