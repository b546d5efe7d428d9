package command

import (
	"flag"
	"os"
	"strings"

	"github.com/cohort-dev/cohort/api"
	"github.com/mitchellh/cli"
)

// Meta is what every command that talks to a cohort server shares, as
// Nomad's commands share theirs: the server's address, the namespace, and
// JSON output. Commands embed it and register its flags with FlagSet.
type Meta struct {
	UI cli.Ui

	address   string
	namespace string
	json      bool
}

// metaHelp documents Meta's flags; commands append it to their help.
const metaHelp = `
  -address=<url>    cohort server API. Default: $COHORT_ADDR or
                    http://127.0.0.1:4747.
  -namespace=<ns>   Nomad namespace of the job. Default: $NOMAD_NAMESPACE
                    or "default".`

const jsonHelp = `
  -json             Print JSON.`

// FlagSet returns the command's flag set with Meta's flags on it; withJSON
// adds -json.
func (m *Meta) FlagSet(name string, withJSON bool) *flag.FlagSet {
	fs := flagSet(name)
	fs.StringVar(&m.address, "address", "", "")
	fs.StringVar(&m.namespace, "namespace", os.Getenv("NOMAD_NAMESPACE"), "")
	if withJSON {
		fs.BoolVar(&m.json, "json", false, "")
	}
	return fs
}

// Client is a client for the server the flags name.
func (m *Meta) Client() *api.Client {
	return api.NewClient(api.Config{Address: strings.TrimSpace(m.address)})
}

// Namespace is the namespace the flags name ("" for the default one).
func (m *Meta) Namespace() string {
	if m.namespace == api.DefaultNamespace {
		return ""
	}
	return m.namespace
}
