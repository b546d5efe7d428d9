package command

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/tlsutil"
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
	token     string
	tls       tlsutil.Files
}

// metaHelp documents Meta's flags; commands append it to their help.
const metaHelp = `
  -address=<url>    cohort server API. Default: $COHORT_ADDR or
                    http://127.0.0.1:4747.
  -namespace=<ns>   Nomad namespace of the job. Default: $NOMAD_NAMESPACE
                    or "default".
  -token=<token>    Nomad ACL token: cohort lets the caller do what
                    Nomad's ACLs let the token do. Default: $NOMAD_TOKEN.
  -ca-cert=<path>   CA certificate verifying an https server. Default:
                    $COHORT_CACERT.
  -client-cert=<path>  Certificate and key for servers that verify their
  -client-key=<path>   callers (-verify-incoming). Default:
                    $COHORT_CLIENT_CERT, $COHORT_CLIENT_KEY.`

const jsonHelp = `
  -json             Print JSON.`

// FlagSet returns the command's flag set with Meta's flags on it; withJSON
// adds -json.
func (m *Meta) FlagSet(name string, withJSON bool) *flag.FlagSet {
	fs := flagSet(name)
	fs.StringVar(&m.address, "address", "", "")
	fs.StringVar(&m.namespace, "namespace", os.Getenv("NOMAD_NAMESPACE"), "")
	fs.StringVar(&m.token, "token", os.Getenv("NOMAD_TOKEN"), "")
	fs.StringVar(&m.tls.CAFile, "ca-cert", os.Getenv("COHORT_CACERT"), "")
	fs.StringVar(&m.tls.CertFile, "client-cert", os.Getenv("COHORT_CLIENT_CERT"), "")
	fs.StringVar(&m.tls.KeyFile, "client-key", os.Getenv("COHORT_CLIENT_KEY"), "")
	if withJSON {
		fs.BoolVar(&m.json, "json", false, "")
	}
	return fs
}

// Client is a client for the server the flags name. TLS material that
// does not load makes every call fail with why.
func (m *Meta) Client() *api.Client {
	cfg := api.Config{Address: strings.TrimSpace(m.address), Token: m.token}
	if m.tls.Enabled() {
		b, err := tlsutil.Load(m.tls)
		if err != nil {
			cfg.HTTPClient = &http.Client{Transport: failing{fmt.Errorf("cohort's TLS (-ca-cert, -client-cert, -client-key): %w", err)}}
		} else {
			cfg.TLS = b.ClientConfig()
		}
	}
	return api.NewClient(cfg)
}

// failing is a transport whose every request fails with err.
type failing struct{ err error }

func (f failing) RoundTrip(*http.Request) (*http.Response, error) { return nil, f.err }

// Namespace is the namespace the flags name ("" for the default one).
func (m *Meta) Namespace() string {
	if m.namespace == api.DefaultNamespace {
		return ""
	}
	return m.namespace
}
