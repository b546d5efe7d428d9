package e2e

import (
	"crypto/tls"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/cohort-dev/cohort/internal/devcluster"
	"github.com/cohort-dev/cohort/internal/tlsutil"
)

// sec is the current test's TLS and token, when its cluster is secured:
// the helpers that call cohort (client, cohortRun, members) use them.
// Tests run one at a time.
var sec struct {
	ca    string
	tls   *tls.Config
	token string
}

// secure makes the helpers call cohort with the cluster's CA (and, on a
// cluster whose Nomad has ACLs, with token) until the test ends.
func secure(t *testing.T, c *devcluster.Cluster, token string) {
	t.Helper()
	b, err := tlsutil.Load(tlsutil.Files{CAFile: c.TLS().CA})
	if err != nil {
		t.Fatal(err)
	}
	sec.ca, sec.tls, sec.token = c.TLS().CA, b.ClientConfig(), token
	t.Cleanup(func() { sec.ca, sec.tls, sec.token = "", nil, "" })
}

// scheme is how the current test's cohort servers are called.
func scheme() string {
	if sec.tls != nil {
		return "https://"
	}
	return "http://"
}

// cohortCmd is the cohort CLI with the current test's CA and token.
func cohortCmd(args ...string) *exec.Cmd {
	cmd := exec.Command(cohortBin, args...)
	cmd.Env = os.Environ()
	if sec.ca != "" {
		cmd.Env = append(cmd.Env, "COHORT_CACERT="+sec.ca)
	}
	if sec.token != "" {
		cmd.Env = append(cmd.Env, "NOMAD_TOKEN="+sec.token)
	}
	return cmd
}

// serverTLSArgs are the flags of a cohort server in a secured cluster.
func serverTLSArgs(c *devcluster.Cluster) []string {
	t := c.TLS()
	if t == nil {
		return nil
	}
	args := []string{"-ca-file", t.CA, "-cert-file", t.Server.CertFile, "-key-file", t.Server.KeyFile}
	if tok := c.ServerNomadToken(); tok != "" {
		args = append(args, "-nomad-token", tok, "-nomad-ca-cert", t.CA)
	}
	return args
}

func isHTTPS(addr string) bool { return strings.HasPrefix(addr, "https://") }
