package devcluster

// A secured dev cluster: one CA for everything, certificates for cohort's
// servers, each node's microvm driver and callers; with NomadSecure, Nomad
// too runs with TLS (HTTP and RPC) and ACLs, bootstrapped with a
// management token.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/cohort-dev/cohort/deploy"
	"github.com/cohort-dev/cohort/internal/tlsutil"
)

// TLSFiles are a secured cluster's certificates.
type TLSFiles struct {
	CA string
	// Server is for cohort servers, CLI for callers, Nodes for each
	// node's microvm driver (by node name).
	Server, CLI tlsutil.Files
	Nodes       map[string]tlsutil.Files
	// NomadServer and NomadClient are Nomad's own (server.global.nomad,
	// client.global.nomad).
	NomadServer, NomadClient tlsutil.Files
}

// makeTLS makes the CA and every certificate under dir/tls.
func (c *Cluster) makeTLS() error {
	dir := filepath.Join(c.cfg.DataDir, "tls")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ca, err := tlsutil.NewCA("cohort dev CA", 30*24*time.Hour)
	if err != nil {
		return err
	}
	t := &TLSFiles{CA: filepath.Join(dir, "ca.pem"), Nodes: map[string]tlsutil.Files{}}
	if _, err := tlsutil.WriteFiles(dir, "ca", t.CA, ca.CertPEM, ca.KeyPEM); err != nil {
		return err
	}
	issue := func(name string, cert tlsutil.Cert) (tlsutil.Files, error) {
		cp, kp, err := ca.Issue(cert)
		if err != nil {
			return tlsutil.Files{}, err
		}
		return tlsutil.WriteFiles(dir, name, t.CA, cp, kp)
	}
	ips := []net.IP{net.ParseIP(c.net.ServerIP())}
	if t.Server, err = issue("cohort-server", tlsutil.ServerCert(ips)); err != nil {
		return err
	}
	if t.CLI, err = issue("cohort-cli", tlsutil.CLICert()); err != nil {
		return err
	}
	for _, n := range c.nodes {
		if t.Nodes[n.Name], err = issue("node-"+n.Name, tlsutil.NodeCert(n.Name)); err != nil {
			return err
		}
		ips = append(ips, net.ParseIP(n.IP))
	}
	loop := net.IPv4(127, 0, 0, 1)
	if t.NomadServer, err = issue("nomad-server", tlsutil.Cert{CommonName: "server.global.nomad",
		DNSNames: []string{"server.global.nomad", "localhost"}, IPs: append([]net.IP{loop}, ips...)}); err != nil {
		return err
	}
	if t.NomadClient, err = issue("nomad-client", tlsutil.Cert{CommonName: "client.global.nomad",
		DNSNames: []string{"client.global.nomad", "localhost"}, IPs: append([]net.IP{loop}, ips...)}); err != nil {
		return err
	}
	c.tls = t
	b, err := tlsutil.Load(tlsutil.Files{CAFile: t.CA})
	if err != nil {
		return err
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = b.ClientConfig()
	tr.TLSClientConfig.ServerName = "" // Nomad's HTTPS is verified by address
	c.http = &http.Client{Timeout: 5 * time.Second, Transport: tr}
	return nil
}

// TLS is the cluster's certificates; nil unless Config.TLS.
func (c *Cluster) TLS() *TLSFiles { return c.tls }

// NomadToken is the management token of a cluster whose Nomad has ACLs
// (NomadSecure); "" otherwise.
func (c *Cluster) NomadToken() string { return c.token }

// NomadEnv is the environment Nomad's CLI (and cohort's) needs to reach
// this cluster's Nomad as its operator.
func (c *Cluster) NomadEnv() []string {
	env := []string{"NOMAD_ADDR=" + c.NomadAddr(), "CONSUL_HTTP_ADDR=" + c.ConsulAddr()}
	if c.cfg.NomadSecure {
		env = append(env, "NOMAD_CACERT="+c.tls.CA, "NOMAD_TOKEN="+c.token)
	}
	return env
}

// nomadTLSBlock is the tls block of a Nomad agent's configuration.
func (c *Cluster) nomadTLSBlock(f tlsutil.Files) string {
	if !c.cfg.NomadSecure {
		return ""
	}
	return fmt.Sprintf(`
tls {
  http                   = true
  rpc                    = true
  ca_file                = %q
  cert_file              = %q
  key_file               = %q
  verify_server_hostname = true
  verify_https_client    = false
}

acl {
  enabled = true
}
`, f.CAFile, f.CertFile, f.KeyFile)
}

// bootstrapACL makes the management token, once Nomad's server answers.
func (c *Cluster) bootstrapACL() (bool, error) {
	var tok struct{ SecretID string }
	if err := c.nomadWrite("POST", "/v1/acl/bootstrap", nil, &tok); err != nil {
		return false, err
	}
	c.token = tok.SecretID
	return c.token != "", nil
}

// ServerNomadToken is the token cohort's servers reach the Nomad of a
// cluster with ACLs (NomadSecure) with: a client token of the policy the
// install guide gives them (deploy.ServerPolicy), never the management
// token, so the tests show the policy is enough. "" without ACLs.
func (c *Cluster) ServerNomadToken() string { return c.serverToken }

// makeServerToken gives cohort's servers their token.
func (c *Cluster) makeServerToken() (err error) {
	c.serverToken, err = c.NomadPolicyToken(deploy.ServerPolicyName, deploy.ServerPolicy())
	return err
}

// NomadPolicyToken applies an ACL policy to the cluster's Nomad under
// name and makes a client token of it, named alike.
func (c *Cluster) NomadPolicyToken(name, rules string) (string, error) {
	policy, _ := json.Marshal(map[string]string{"Name": name, "Rules": rules})
	if err := c.nomadWrite("PUT", "/v1/acl/policy/"+name, policy, nil); err != nil {
		return "", fmt.Errorf("applying ACL policy %s: %w", name, err)
	}
	req, _ := json.Marshal(map[string]any{"Name": name, "Type": "client", "Policies": []string{name}})
	var tok struct{ SecretID string }
	if err := c.nomadWrite("POST", "/v1/acl/token", req, &tok); err != nil {
		return "", fmt.Errorf("making a token of ACL policy %s: %w", name, err)
	}
	if tok.SecretID == "" {
		return "", fmt.Errorf("making a token of ACL policy %s: nomad answered without one", name)
	}
	return tok.SecretID, nil
}

// nomadWrite sends one write to Nomad's API as the cluster's operator and
// decodes its answer into out, if not nil.
func (c *Cluster) nomadWrite(method, path string, body []byte, out any) error {
	resp, err := c.NomadDo(method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, bytes.TrimSpace(b))
	}
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// NomadDo sends one request to Nomad's API as the cluster's operator.
func (c *Cluster) NomadDo(method, path string, body []byte) (*http.Response, error) {
	req, err := http.NewRequest(method, c.NomadAddr()+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	if c.token != "" {
		req.Header.Set("X-Nomad-Token", c.token)
	}
	return c.http.Do(req)
}

// MicroVM says whether the cluster runs the microvm driver.
func (c *Cluster) MicroVM() bool { return c.cfg.MicroVM != nil }
