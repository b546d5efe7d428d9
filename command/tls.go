package command

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/mitchellh/cli"
)

// TLSCommand makes the cluster's CA and certificates.
type TLSCommand struct{ UI cli.Ui }

const tlsHelp = `
Usage: cohort tls ca create [-dir=<path>]
       cohort tls cert create (-server | -node=<name> | -cli) [options]

  Makes what mutual TLS between cohort's servers, the microvm drivers and
  callers needs, as "nomad tls" does for Nomad:

  ca create     A CA: cohort-agent-ca.pem and cohort-agent-ca-key.pem.
  cert create   A certificate and key signed by the CA, for one of:
    -server        a cohort server (it names server.cohort, which every
                   caller verifies, and localhost);
    -node=<name>   the microvm driver on the Nomad node named <name> (it
                   names <name>.node.cohort: that node's subnet lease and
                   its workers' boot reports, no other node's);
    -cli           a caller, for servers started with -verify-incoming.

Options:

  -dir=<path>                  Where files are written and the CA is read.
                               Default: the current directory.
  -ca=<path>, -key=<path>      The CA to sign with. Default:
                               cohort-agent-ca.pem and its key in -dir.
  -additional-ipaddress=<ip>   More IP addresses for a server; repeatable.
  -additional-dnsname=<name>   More DNS names for a server; repeatable.
  -days=<n>                    Validity. Default: 365 (CA: 1825).
`

func (c *TLSCommand) Help() string     { return tlsHelp }
func (c *TLSCommand) Synopsis() string { return "Make the cluster's CA and certificates" }

func (c *TLSCommand) Run(args []string) int {
	if len(args) < 2 || args[1] != "create" || (args[0] != "ca" && args[0] != "cert") {
		c.UI.Error("Error: expected \"ca create\" or \"cert create\"\n\n" + strings.TrimSpace(tlsHelp))
		return ExitUsage
	}
	fs := flagSet("tls")
	dir := fs.String("dir", ".", "")
	days := fs.Int("days", 0, "")
	if args[0] == "ca" {
		if ok, code := parse(c.UI, fs, args[2:], 0, tlsHelp); !ok {
			return code
		}
		if *days == 0 {
			*days = 1825
		}
		ca, err := tlsutil.NewCA("cohort CA", time.Duration(*days)*24*time.Hour)
		if err != nil {
			c.UI.Error(fmt.Sprintf("Error making the CA: %v", err))
			return ExitError
		}
		return c.write(*dir, "cohort-agent-ca", ca.CertPEM, ca.KeyPEM)
	}
	server := fs.Bool("server", false, "")
	node := fs.String("node", "", "")
	cliCert := fs.Bool("cli", false, "")
	caFile := fs.String("ca", "", "")
	keyFile := fs.String("key", "", "")
	var ips, names stringList
	fs.Var(&ips, "additional-ipaddress", "")
	fs.Var(&names, "additional-dnsname", "")
	if ok, code := parse(c.UI, fs, args[2:], 0, tlsHelp); !ok {
		return code
	}
	kinds := 0
	for _, b := range []bool{*server, *node != "", *cliCert} {
		if b {
			kinds++
		}
	}
	if kinds != 1 {
		c.UI.Error("Error: give exactly one of -server, -node=<name> and -cli\n\n" + strings.TrimSpace(tlsHelp))
		return ExitUsage
	}
	if *caFile == "" {
		*caFile = filepath.Join(*dir, "cohort-agent-ca.pem")
	}
	if *keyFile == "" {
		*keyFile = strings.TrimSuffix(*caFile, ".pem") + "-key.pem"
	}
	ca, err := tlsutil.LoadCA(*caFile, *keyFile)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error reading the CA (make one with \"cohort tls ca create\"): %v", err))
		return ExitError
	}
	var cert tlsutil.Cert
	var name string
	switch {
	case *server:
		var extra []net.IP
		for _, s := range ips {
			ip := net.ParseIP(s)
			if ip == nil {
				c.UI.Error(fmt.Sprintf("Error: -additional-ipaddress %q is not an IP address", s))
				return ExitUsage
			}
			extra = append(extra, ip)
		}
		cert, name = tlsutil.ServerCert(extra, names...), "cohort-server"
	case *node != "":
		if strings.ContainsAny(*node, " /,*") {
			c.UI.Error(fmt.Sprintf("Error: -node %q is not a Nomad node name usable in a DNS name", *node))
			return ExitUsage
		}
		cert, name = tlsutil.NodeCert(*node), "cohort-node-"+*node
	default:
		cert, name = tlsutil.CLICert(), "cohort-cli"
	}
	if *days > 0 {
		cert.Validity = time.Duration(*days) * 24 * time.Hour
	}
	cp, kp, err := ca.Issue(cert)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error making the certificate: %v", err))
		return ExitError
	}
	return c.write(*dir, name, cp, kp)
}

// write writes a certificate and key, refusing to overwrite either.
func (c *TLSCommand) write(dir, name string, certPEM, keyPEM []byte) int {
	for _, f := range []string{name + ".pem", name + "-key.pem"} {
		if _, err := os.Stat(filepath.Join(dir, f)); err == nil {
			c.UI.Error(fmt.Sprintf("Error: %s already exists; remove it first", filepath.Join(dir, f)))
			return ExitError
		}
	}
	f, err := tlsutil.WriteFiles(dir, name, "", certPEM, keyPEM)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error writing: %v", err))
		return ExitError
	}
	c.UI.Output(fmt.Sprintf("==> Wrote %s\n==> Wrote %s", f.CertFile, f.KeyFile))
	return ExitOK
}
