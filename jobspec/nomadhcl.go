package jobspec

import (
	"sort"

	"github.com/hashicorp/hcl/v2/hclwrite"
	"github.com/hashicorp/nomad/api"
	"github.com/zclconf/go-cty/cty"
)

// FormatNomadHCL renders a job built by ToNomad as a Nomad jobspec, so that
// `nomad job run` of the output registers the same job. It covers the fields
// ToNomad sets; it is not a general Nomad job printer.
//
// Runtime interpolations such as ${NOMAD_ALLOC_INDEX} are written escaped
// ($${...}), which HCL reads back as the literal text Nomad interpolates.
func FormatNomadHCL(job *api.Job) []byte {
	f := hclwrite.NewEmptyFile()
	jb := f.Body().AppendNewBlock("job", []string{deref(job.ID)}).Body()
	jb.SetAttributeValue("type", cty.StringVal(deref(job.Type)))
	jb.SetAttributeValue("priority", cty.NumberIntVal(int64(deref(job.Priority))))
	jb.SetAttributeValue("datacenters", stringList(job.Datacenters))
	if job.NodePool != nil {
		jb.SetAttributeValue("node_pool", cty.StringVal(*job.NodePool))
	}
	metaBlock(jb, job.Meta)

	for _, tg := range job.TaskGroups {
		jb.AppendNewline()
		gb := jb.AppendNewBlock("group", []string{deref(tg.Name)}).Body()
		gb.SetAttributeValue("count", cty.NumberIntVal(int64(deref(tg.Count))))
		metaBlock(gb, tg.Meta)
		constraints(gb, tg.Constraints)
		if rp := tg.RestartPolicy; rp != nil {
			b := gb.AppendNewBlock("restart", nil).Body()
			b.SetAttributeValue("attempts", cty.NumberIntVal(int64(deref(rp.Attempts))))
			b.SetAttributeValue("mode", cty.StringVal(deref(rp.Mode)))
		}
		if rp := tg.ReschedulePolicy; rp != nil {
			b := gb.AppendNewBlock("reschedule", nil).Body()
			b.SetAttributeValue("attempts", cty.NumberIntVal(int64(deref(rp.Attempts))))
			b.SetAttributeValue("unlimited", cty.BoolVal(deref(rp.Unlimited)))
		}
		for _, n := range tg.Networks {
			nb := gb.AppendNewBlock("network", nil).Body()
			for _, p := range n.DynamicPorts {
				pb := nb.AppendNewBlock("port", []string{p.Label}).Body()
				if p.To != 0 {
					pb.SetAttributeValue("to", cty.NumberIntVal(int64(p.To)))
				}
			}
		}
		for _, t := range tg.Tasks {
			task(gb, t)
		}
	}
	return hclwrite.Format(f.Bytes())
}

func task(parent *hclwrite.Body, t *api.Task) {
	parent.AppendNewline()
	tb := parent.AppendNewBlock("task", []string{t.Name}).Body()
	tb.SetAttributeValue("driver", cty.StringVal(t.Driver))
	cb := tb.AppendNewBlock("config", nil).Body()
	for _, k := range sortedKeys(t.Config) {
		switch v := t.Config[k].(type) {
		case string:
			cb.SetAttributeValue(k, cty.StringVal(v))
		case []string:
			cb.SetAttributeValue(k, stringList(v))
		}
	}
	if len(t.Env) > 0 {
		eb := tb.AppendNewBlock("env", nil).Body()
		for _, k := range sortedKeys(t.Env) {
			eb.SetAttributeValue(k, cty.StringVal(t.Env[k]))
		}
	}
	metaBlock(tb, t.Meta)
	for _, a := range t.Artifacts {
		ab := tb.AppendNewBlock("artifact", nil).Body()
		ab.SetAttributeValue("source", cty.StringVal(deref(a.GetterSource)))
		ab.SetAttributeValue("destination", cty.StringVal(deref(a.RelativeDest)))
	}
	if r := t.Resources; r != nil {
		rb := tb.AppendNewBlock("resources", nil).Body()
		rb.SetAttributeValue("cpu", cty.NumberIntVal(int64(deref(r.CPU))))
		rb.SetAttributeValue("memory", cty.NumberIntVal(int64(deref(r.MemoryMB))))
		for _, d := range r.Devices {
			db := rb.AppendNewBlock("device", []string{d.Name}).Body()
			db.SetAttributeValue("count", cty.NumberUIntVal(deref(d.Count)))
			for _, c := range d.Constraints {
				cb := db.AppendNewBlock("constraint", nil).Body()
				cb.SetAttributeValue("attribute", cty.StringVal(c.LTarget))
				cb.SetAttributeValue("operator", cty.StringVal(c.Operand))
				if c.RTarget != "" {
					cb.SetAttributeValue("value", cty.StringVal(c.RTarget))
				}
			}
		}
	}
	for _, s := range t.Services {
		sb := tb.AppendNewBlock("service", nil).Body()
		sb.SetAttributeValue("name", cty.StringVal(s.Name))
		sb.SetAttributeValue("provider", cty.StringVal(s.Provider))
		if s.PortLabel != "" {
			sb.SetAttributeValue("port", cty.StringVal(s.PortLabel))
		}
		sb.SetAttributeValue("address_mode", cty.StringVal(s.AddressMode))
		sb.SetAttributeValue("tags", stringList(s.Tags))
	}
}

func metaBlock(b *hclwrite.Body, meta map[string]string) {
	if len(meta) == 0 {
		return
	}
	// Meta keys contain dots, which are not HCL identifiers: use the map
	// attribute form, which Nomad accepts as well as the block form.
	vals := make(map[string]cty.Value, len(meta))
	for k, v := range meta {
		vals[k] = cty.StringVal(v)
	}
	b.SetAttributeValue("meta", cty.MapVal(vals))
}

func constraints(b *hclwrite.Body, cs []*api.Constraint) {
	for _, c := range cs {
		cb := b.AppendNewBlock("constraint", nil).Body()
		if c.LTarget != "" {
			cb.SetAttributeValue("attribute", cty.StringVal(c.LTarget))
		}
		cb.SetAttributeValue("operator", cty.StringVal(c.Operand))
		cb.SetAttributeValue("value", cty.StringVal(c.RTarget))
	}
}

func stringList(ss []string) cty.Value {
	if len(ss) == 0 {
		return cty.ListValEmpty(cty.String)
	}
	vals := make([]cty.Value, len(ss))
	for i, s := range ss {
		vals[i] = cty.StringVal(s)
	}
	return cty.ListVal(vals)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
