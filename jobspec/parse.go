package jobspec

import (
	"fmt"
	"net/url"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/hcl/v2"
	"github.com/hashicorp/hcl/v2/hclsyntax"
	"github.com/zclconf/go-cty/cty"
	"github.com/zclconf/go-cty/cty/convert"
)

// ParseFile reads and parses a cluster-job file.
func ParseFile(filename string) (*Job, error) {
	src, err := os.ReadFile(filename)
	if err != nil {
		return nil, fmt.Errorf("reading job file: %w", err)
	}
	return Parse(filename, src)
}

// Parse parses a cluster-job file's contents. filename is used only for
// positions in errors. The error, if any, is a Diagnostics value listing
// every problem found, each with file:line:col.
func Parse(filename string, src []byte) (*Job, error) {
	file, diags := hclsyntax.ParseConfig(src, filename, hcl.InitialPos)
	if diags.HasErrors() {
		// Syntax errors cascade (one open quote is reported on every line
		// after it); the first is the one to fix.
		return nil, Diagnostics(diags[:1])
	}
	d := &decoder{}
	job := d.file(file.Body)
	if d.diags.HasErrors() {
		return nil, Diagnostics(d.diags)
	}
	return job, nil
}

// Diagnostics is the error Parse returns: every problem found in a file.
type Diagnostics hcl.Diagnostics

func (ds Diagnostics) Error() string {
	lines := make([]string, 0, len(ds))
	for _, d := range ds {
		lines = append(lines, formatDiag(d))
	}
	return strings.Join(lines, "\n")
}

func formatDiag(d *hcl.Diagnostic) string {
	msg := d.Summary
	if d.Detail != "" {
		msg += ": " + d.Detail
	}
	if d.Subject == nil {
		return msg
	}
	return fmt.Sprintf("%s:%d:%d: %s", d.Subject.Filename, d.Subject.Start.Line, d.Subject.Start.Column, msg)
}

var (
	fileSchema = &hcl.BodySchema{
		Blocks: []hcl.BlockHeaderSchema{{Type: "job", LabelNames: []string{"name"}}},
	}
	jobSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{
			{Name: "priority"},
			{Name: "datacenters"},
			{Name: "node_pool"},
			{Name: "max_runtime", Required: true},
			{Name: "gang_timeout"},
		},
		Blocks: []hcl.BlockHeaderSchema{{Type: "group", LabelNames: []string{"name"}}},
	}
	groupSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{
			{Name: "count"},
			{Name: "address"},
			{Name: "driver"},
			{Name: "distinct_hosts"},
			{Name: "max_per_node"},
			{Name: "config"},
		},
		Blocks: []hcl.BlockHeaderSchema{
			{Type: "resources"},
			{Type: "program"},
			{Type: "port", LabelNames: []string{"label"}},
		},
	}
	resourcesSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{{Name: "cpu"}, {Name: "memory"}},
		Blocks:     []hcl.BlockHeaderSchema{{Type: "device", LabelNames: []string{"name"}}},
	}
	deviceSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{{Name: "count"}},
		Blocks:     []hcl.BlockHeaderSchema{{Type: "constraint"}},
	}
	deviceConstraintSchema = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{
		{Name: "attribute", Required: true}, {Name: "operator"}, {Name: "value"},
	}}
	programSchema = &hcl.BodySchema{
		Attributes: []hcl.AttributeSchema{
			{Name: "path"}, {Name: "artifact"}, {Name: "args"}, {Name: "env"},
		},
	}
	portSchema = &hcl.BodySchema{Attributes: []hcl.AttributeSchema{{Name: "to"}}}
)

var (
	rfc1123Label = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)
	portLabel    = regexp.MustCompile(`^[a-zA-Z0-9_]{1,63}$`)
	envName      = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)
	// A model may hold spaces and brackets, as NVML's names do ("H100
	// 80GB HBM3").
	deviceName = regexp.MustCompile(`^[a-zA-Z0-9_.-]+(/[a-zA-Z0-9_.-]+(/[a-zA-Z0-9_.()+-][a-zA-Z0-9_. ()+-]*)?)?$`)
)

// decoder walks the HCL body, collecting every diagnostic rather than
// stopping at the first, so a user fixes a file in one round.
type decoder struct {
	diags hcl.Diagnostics
}

func (d *decoder) errorf(rng hcl.Range, summary, format string, args ...any) {
	r := rng
	d.diags = append(d.diags, &hcl.Diagnostic{
		Severity: hcl.DiagError,
		Summary:  summary,
		Detail:   fmt.Sprintf(format, args...),
		Subject:  &r,
	})
}

func (d *decoder) content(body hcl.Body, schema *hcl.BodySchema) *hcl.BodyContent {
	c, diags := body.Content(schema)
	d.diags = append(d.diags, diags...)
	return c
}

func (d *decoder) file(body hcl.Body) *Job {
	c := d.content(body, fileSchema)
	switch {
	case len(c.Blocks) == 0:
		d.errorf(body.MissingItemRange(), "Missing job block", `a cluster-job file holds exactly one job "name" { ... } block.`)
		return nil
	case len(c.Blocks) > 1:
		d.errorf(c.Blocks[1].DefRange, "Duplicate job block", `a cluster-job file holds exactly one job block; the first is at line %d.`, c.Blocks[0].DefRange.Start.Line)
		return nil
	}
	return d.job(c.Blocks[0])
}

func (d *decoder) job(b *hcl.Block) *Job {
	job := &Job{
		Name:        b.Labels[0],
		Priority:    DefaultPriority,
		Datacenters: []string{"*"},
		NodePool:    "default",
		GangTimeout: DefaultGangTimeout,
	}
	d.label(b.LabelRanges[0], "job name", job.Name)
	c := d.content(b.Body, jobSchema)

	if a, ok := c.Attributes["priority"]; ok {
		if job.Priority, ok = d.intAttr(a); ok && job.Priority < 1 || job.Priority > MaxPriority {
			d.errorf(a.Expr.Range(), "Invalid priority", "priority must be between 1 and %d; got %d.", MaxPriority, job.Priority)
		}
	}
	if a, ok := c.Attributes["datacenters"]; ok {
		job.Datacenters = d.stringList(a)
		if len(job.Datacenters) == 0 {
			d.errorf(a.Expr.Range(), "Invalid datacenters", `datacenters must name at least one datacenter (use ["*"] for any).`)
		}
	}
	if a, ok := c.Attributes["node_pool"]; ok {
		if job.NodePool, ok = d.stringAttr(a); ok && job.NodePool == "" {
			d.errorf(a.Expr.Range(), "Invalid node_pool", "node_pool must not be empty; leave it out to use the default pool.")
		}
	}
	if a, ok := c.Attributes["max_runtime"]; ok {
		job.MaxRuntime = d.durationAttr(a, "max_runtime")
	}
	if a, ok := c.Attributes["gang_timeout"]; ok {
		job.GangTimeout = d.durationAttr(a, "gang_timeout")
	}

	seen := map[string]*hcl.Block{}
	addresses := map[string]*hcl.Block{}
	for _, gb := range c.Blocks {
		name := gb.Labels[0]
		if prev, ok := seen[name]; ok {
			d.errorf(gb.LabelRanges[0], "Duplicate group name", "a group named %q is already defined at line %d; group names must be unique within a job.", name, prev.DefRange.Start.Line)
			continue
		}
		seen[name] = gb
		g := d.group(job.Name, gb)
		if prev, ok := addresses[g.Address]; ok && g.Address != "" {
			d.errorf(gb.DefRange, "Duplicate address", "group %q would be addressable as %q, which group %q at line %d already uses; set a distinct address.", name, g.Address, prev.Labels[0], prev.DefRange.Start.Line)
		}
		addresses[g.Address] = gb
		job.Groups = append(job.Groups, g)
	}
	if len(c.Blocks) == 0 {
		d.errorf(b.DefRange, "Missing group", `a job needs at least one group "name" { ... } block of workers.`)
	}
	return job
}

func (d *decoder) group(jobName string, b *hcl.Block) *Group {
	g := &Group{
		Name:      b.Labels[0],
		Count:     1,
		Driver:    DriverMicroVM,
		Resources: Resources{CPU: DefaultCPU, MemoryMB: DefaultMemoryMB},
	}
	d.label(b.LabelRanges[0], "group name", g.Name)
	g.Address = jobName + "-" + g.Name
	c := d.content(b.Body, groupSchema)

	if a, ok := c.Attributes["count"]; ok {
		if g.Count, ok = d.intAttr(a); ok && g.Count < 1 {
			d.errorf(a.Expr.Range(), "Invalid count", "count must be at least 1; got %d.", g.Count)
		}
	}
	if a, ok := c.Attributes["address"]; ok {
		if g.Address, ok = d.stringAttr(a); ok {
			d.label(a.Expr.Range(), "address", g.Address)
		}
	} else if len(g.Address) > 63 {
		d.errorf(b.DefRange, "Address too long", "the default address %q is longer than 63 characters; set a shorter address.", g.Address)
	}
	if a, ok := c.Attributes["driver"]; ok {
		g.Driver, ok = d.stringAttr(a)
		switch {
		case !ok:
			g.Driver = DriverMicroVM
		case g.Driver == DriverMicroVM, g.Driver == DriverRawExec, g.Driver == DriverExec:
		default:
			d.errorf(a.Expr.Range(), "Unsupported driver", "driver must be %q, %q or %q; got %q.", DriverMicroVM, DriverRawExec, DriverExec, g.Driver)
		}
	}
	if a, ok := c.Attributes["distinct_hosts"]; ok {
		g.DistinctHosts = d.boolAttr(a)
	}
	if a, ok := c.Attributes["max_per_node"]; ok {
		if g.MaxPerNode, ok = d.intAttr(a); ok && g.MaxPerNode < 1 {
			d.errorf(a.Expr.Range(), "Invalid max_per_node", "max_per_node must be at least 1; got %d.", g.MaxPerNode)
		}
	}
	if a, ok := c.Attributes["config"]; ok {
		g.Config = d.stringMap(a, "config key", regexp.MustCompile(`^[A-Za-z0-9_.-]+$`))
	}

	var haveResources, haveProgram *hcl.Block
	ports := map[string]*hcl.Block{}
	for _, blk := range c.Blocks {
		switch blk.Type {
		case "resources":
			if haveResources != nil {
				d.errorf(blk.DefRange, "Duplicate resources block", "a group has at most one resources block; the first is at line %d.", haveResources.DefRange.Start.Line)
				continue
			}
			haveResources = blk
			d.resources(blk, &g.Resources)
		case "program":
			if haveProgram != nil {
				d.errorf(blk.DefRange, "Duplicate program block", "a group has exactly one program block; the first is at line %d.", haveProgram.DefRange.Start.Line)
				continue
			}
			haveProgram = blk
			d.program(blk, &g.Program)
		case "port":
			label := blk.Labels[0]
			if !portLabel.MatchString(label) {
				d.errorf(blk.LabelRanges[0], "Invalid port label", "port labels use letters, digits and underscores (at most 63); got %q.", label)
			}
			if prev, ok := ports[label]; ok {
				d.errorf(blk.LabelRanges[0], "Duplicate port", "port %q is already defined at line %d.", label, prev.DefRange.Start.Line)
				continue
			}
			ports[label] = blk
			g.Ports = append(g.Ports, d.port(blk))
		}
	}
	if haveProgram == nil {
		d.errorf(b.DefRange, "Missing program", `group %q needs a program { path = "..." } block saying what each worker runs.`, g.Name)
	}
	min := MinProcessMemoryMB
	if g.Driver == DriverMicroVM {
		min = MinMicroVMMemoryMB
	}
	if g.Resources.MemoryMB < min {
		rng := b.DefRange
		if haveResources != nil {
			rng = haveResources.DefRange
			if a, ok := d.attrOf(haveResources, resourcesSchema, "memory"); ok {
				rng = a.Expr.Range()
			}
		}
		d.errorf(rng, "Memory too small", "a %s worker needs at least %d MiB of memory; got %d MiB.", g.Driver, min, g.Resources.MemoryMB)
	}
	return g
}

// attrOf finds an attribute of an already-decoded block without reporting
// its diagnostics a second time.
func (d *decoder) attrOf(b *hcl.Block, schema *hcl.BodySchema, name string) (*hcl.Attribute, bool) {
	c, _, _ := b.Body.PartialContent(schema)
	if c == nil {
		return nil, false
	}
	a, ok := c.Attributes[name]
	return a, ok
}

func (d *decoder) resources(b *hcl.Block, r *Resources) {
	c := d.content(b.Body, resourcesSchema)
	if a, ok := c.Attributes["cpu"]; ok {
		if r.CPU, ok = d.intAttr(a); ok && r.CPU < 1 {
			d.errorf(a.Expr.Range(), "Invalid cpu", "cpu is in MHz and must be at least 1; got %d.", r.CPU)
		}
	}
	if a, ok := c.Attributes["memory"]; ok {
		if r.MemoryMB, ok = d.intAttr(a); !ok {
			// Reported already; keep the memory check quiet.
			r.MemoryMB = DefaultMemoryMB
		}
	}
	seen := map[string]*hcl.Block{}
	for _, blk := range c.Blocks {
		name := blk.Labels[0]
		if !deviceName.MatchString(name) {
			d.errorf(blk.LabelRanges[0], "Invalid device name", `a device is named "<type>", "<vendor>/<type>" or "<vendor>/<type>/<model>", such as "nvidia/gpu"; got %q.`, name)
		}
		if prev, ok := seen[name]; ok {
			d.errorf(blk.LabelRanges[0], "Duplicate device", "device %q is already requested at line %d; raise its count instead.", name, prev.DefRange.Start.Line)
			continue
		}
		seen[name] = blk
		dev := Device{Name: name, Count: 1}
		dc := d.content(blk.Body, deviceSchema)
		if a, ok := dc.Attributes["count"]; ok {
			if dev.Count, ok = d.intAttr(a); ok && dev.Count < 1 {
				d.errorf(a.Expr.Range(), "Invalid device count", "a device count must be at least 1; got %d.", dev.Count)
			}
		}
		for _, cb := range dc.Blocks {
			cc := d.content(cb.Body, deviceConstraintSchema)
			var c DeviceConstraint
			if a, ok := cc.Attributes["attribute"]; ok {
				if v, ok := interpolation(a.Expr); ok {
					c.Attribute = v
				} else {
					c.Attribute, _ = d.stringAttr(a)
				}
				c.Attribute = DeviceAttribute(c.Attribute)
				if err := ValidateDeviceConstraint(c.Attribute, "", ""); err != nil {
					d.errorf(a.Expr.Range(), "Invalid device constraint", "%s.", err)
				}
			}
			if a, ok := cc.Attributes["operator"]; ok {
				c.Operator, _ = d.stringAttr(a)
				if err := ValidateDeviceConstraint("${device.model}", c.Operator, ""); err != nil {
					d.errorf(a.Expr.Range(), "Invalid device constraint", "%s.", err)
				}
			}
			if c.Operator == "" {
				c.Operator = "="
			}
			a, hasValue := cc.Attributes["value"]
			if hasValue {
				if v, ok := interpolation(a.Expr); ok {
					c.Value = v
				} else {
					c.Value, _ = d.stringAttr(a)
				}
				if err := ValidateDeviceConstraint("${device.model}", "", c.Value); err != nil {
					d.errorf(a.Expr.Range(), "Invalid device constraint", "%s.", err)
				}
			}
			unary := c.Operator == "is_set" || c.Operator == "is_not_set"
			if !hasValue && !unary {
				d.errorf(cb.DefRange, "Missing constraint value", "a device constraint with operator %q needs a value, such as value = \"40 GiB\".", c.Operator)
			}
			if c.Operator == "regexp" {
				if _, err := regexp.Compile(c.Value); err != nil {
					d.errorf(a.Expr.Range(), "Invalid device constraint", "value is not a regular expression: %s.", err)
				}
			}
			dev.Constraints = append(dev.Constraints, c)
		}
		r.Devices = append(r.Devices, dev)
	}
}

func (d *decoder) program(b *hcl.Block, p *Program) {
	c := d.content(b.Body, programSchema)
	pathAttr, hasPath := c.Attributes["path"]
	artAttr, hasArt := c.Attributes["artifact"]
	pathOK := true
	if hasPath {
		p.Path, pathOK = d.stringAttr(pathAttr)
	}
	if hasArt {
		var ok bool
		if p.Artifact, ok = d.stringAttr(artAttr); ok {
			u, err := url.Parse(p.Artifact)
			if err != nil || u.Scheme == "" || u.Path == "" || strings.HasSuffix(u.Path, "/") {
				d.errorf(artAttr.Expr.Range(), "Invalid artifact", "artifact must be a URL of a file, such as https://example.com/worker; got %q.", p.Artifact)
			} else if !hasPath {
				// The artifact lands in the task's local/ directory.
				p.Path = "local/" + path.Base(u.Path)
			}
		}
	}
	switch {
	case !hasPath && !hasArt:
		d.errorf(b.DefRange, "Missing program path", "a program needs a path (inside the worker) or an artifact URL to fetch.")
	case hasPath && pathOK && p.Path == "":
		d.errorf(pathAttr.Expr.Range(), "Invalid program path", "path must not be empty.")
	}
	if a, ok := c.Attributes["args"]; ok {
		p.Args = d.stringList(a)
	}
	if a, ok := c.Attributes["env"]; ok {
		p.Env = d.stringMap(a, "environment variable name", envName)
	}
}

func (d *decoder) port(b *hcl.Block) Port {
	p := Port{Label: b.Labels[0]}
	c := d.content(b.Body, portSchema)
	if a, ok := c.Attributes["to"]; ok {
		if p.To, ok = d.intAttr(a); ok && (p.To < 1 || p.To > 65535) {
			d.errorf(a.Expr.Range(), "Invalid port", "to must be a port number between 1 and 65535; got %d.", p.To)
		}
	}
	return p
}

func (d *decoder) label(rng hcl.Range, what, v string) {
	if !rfc1123Label.MatchString(v) {
		d.errorf(rng, "Invalid "+what, "%s must be an RFC 1123 label: 1 to 63 lowercase letters, digits or '-', starting and ending with a letter or digit; got %q.", what, v)
	}
}

// value evaluates an attribute with no variables or functions in scope and
// converts it to want, reporting a type error at the expression.
func (d *decoder) value(a *hcl.Attribute, want cty.Type, wantName string) (cty.Value, bool) {
	v, diags := a.Expr.Value(nil)
	if diags.HasErrors() {
		d.diags = append(d.diags, diags...)
		return cty.NilVal, false
	}
	if v.IsNull() {
		d.errorf(a.Expr.Range(), "Invalid "+a.Name, "%s must be %s, not null.", a.Name, wantName)
		return cty.NilVal, false
	}
	cv, err := convert.Convert(v, want)
	if err != nil {
		d.errorf(a.Expr.Range(), "Invalid "+a.Name, "%s must be %s; got %s.", a.Name, wantName, v.Type().FriendlyName())
		return cty.NilVal, false
	}
	return cv, true
}

func (d *decoder) intAttr(a *hcl.Attribute) (int, bool) {
	v, ok := d.value(a, cty.Number, "a whole number")
	if !ok {
		return 0, false
	}
	bf := v.AsBigFloat()
	i, acc := bf.Int64()
	if !bf.IsInt() || acc != 0 || i > 1<<31-1 || i < -(1<<31) {
		d.errorf(a.Expr.Range(), "Invalid "+a.Name, "%s must be a whole number within 32 bits; got %s.", a.Name, bf.Text('g', 10))
		return 0, false
	}
	return int(i), true
}

func (d *decoder) stringAttr(a *hcl.Attribute) (string, bool) {
	v, ok := d.value(a, cty.String, "a string")
	if !ok {
		return "", false
	}
	return v.AsString(), true
}

func (d *decoder) boolAttr(a *hcl.Attribute) bool {
	v, ok := d.value(a, cty.Bool, "true or false")
	if !ok {
		return false
	}
	return v.True()
}

func (d *decoder) stringList(a *hcl.Attribute) []string {
	v, ok := d.value(a, cty.List(cty.String), "a list of strings")
	if !ok {
		return nil
	}
	out := make([]string, 0, v.LengthInt())
	for it := v.ElementIterator(); it.Next(); {
		_, e := it.Element()
		if e.IsNull() {
			d.errorf(a.Expr.Range(), "Invalid "+a.Name, "%s must not contain null.", a.Name)
			return nil
		}
		out = append(out, e.AsString())
	}
	return out
}

func (d *decoder) stringMap(a *hcl.Attribute, keyWhat string, keyRe *regexp.Regexp) map[string]string {
	v, ok := d.value(a, cty.Map(cty.String), "a map of strings")
	if !ok {
		return nil
	}
	out := make(map[string]string, v.LengthInt())
	keys := make([]string, 0, v.LengthInt())
	for it := v.ElementIterator(); it.Next(); {
		k, e := it.Element()
		if e.IsNull() {
			d.errorf(a.Expr.Range(), "Invalid "+a.Name, "the value of %q must not be null.", k.AsString())
			continue
		}
		out[k.AsString()] = e.AsString()
		keys = append(keys, k.AsString())
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !keyRe.MatchString(k) {
			d.errorf(a.Expr.Range(), "Invalid "+keyWhat, "%q is not a valid %s (allowed: %s).", k, keyWhat, keyRe.String())
		}
	}
	return out
}

func (d *decoder) durationAttr(a *hcl.Attribute, what string) time.Duration {
	s, ok := d.stringAttr(a)
	if !ok {
		return 0
	}
	dur, err := time.ParseDuration(s)
	if err != nil {
		d.errorf(a.Expr.Range(), "Invalid "+what, `%s must be a duration such as "90s" or "10m"; got %q.`, what, s)
		return 0
	}
	if dur <= 0 {
		d.errorf(a.Expr.Range(), "Invalid "+what, "%s must be greater than zero; got %q.", what, s)
		return 0
	}
	if dur%time.Millisecond != 0 {
		d.errorf(a.Expr.Range(), "Invalid "+what, "%s has millisecond resolution; got %q.", what, s)
	}
	return dur
}

// interpolation reads "${device.attr.memory}" as Nomad's jobspecs write
// it: the whole string one interpolation of an attribute path, which
// HCL would otherwise try to evaluate as a variable.
func interpolation(e hcl.Expression) (string, bool) {
	w, ok := e.(*hclsyntax.TemplateWrapExpr)
	if !ok {
		return "", false
	}
	st, ok := w.Wrapped.(*hclsyntax.ScopeTraversalExpr)
	if !ok {
		return "", false
	}
	parts := []string{st.Traversal.RootName()}
	for _, step := range st.Traversal[1:] {
		a, ok := step.(hcl.TraverseAttr)
		if !ok {
			return "", false
		}
		parts = append(parts, a.Name)
	}
	return "${" + strings.Join(parts, ".") + "}", true
}
