package tlsutil

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// pki makes a CA and writes a server, a node and a CLI certificate.
func pki(t *testing.T) (dir string, ca *CA, server, node, cli Files) {
	t.Helper()
	dir = t.TempDir()
	ca, err := NewCA("test CA", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	write := func(name string, c Cert) Files {
		cp, kp, err := ca.Issue(c)
		if err != nil {
			t.Fatal(err)
		}
		f, err := WriteFiles(dir, name, caFile, cp, kp)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	if _, err := WriteFiles(dir, "ca", caFile, ca.CertPEM, ca.KeyPEM); err != nil {
		t.Fatal(err)
	}
	return dir, ca, write("server", ServerCert(nil)), write("node", NodeCert("n1")), write("cli", CLICert())
}

func TestRoles(t *testing.T) {
	_, _, server, node, cli := pki(t)
	for _, c := range []struct {
		f            Files
		server       bool
		node         string
		serverConfig bool
	}{{server, true, "", true}, {node, false, "n1", false}, {cli, false, "", false}} {
		b, err := Load(c.f)
		if err != nil {
			t.Fatal(err)
		}
		if b.IsServer() != c.server || b.Node() != c.node {
			t.Errorf("%s: server %t node %q", c.f.CertFile, b.IsServer(), b.Node())
		}
		if _, err := b.ServerConfig(true); (err == nil) != c.serverConfig {
			t.Errorf("%s: serving with it: %v", c.f.CertFile, err)
		}
	}
}

func TestLoadRefusesAForeignCertificate(t *testing.T) {
	_, _, server, _, _ := pki(t)
	_, _, other, _, _ := pki(t)
	_, err := Load(Files{CAFile: server.CAFile, CertFile: other.CertFile, KeyFile: other.KeyFile})
	if err == nil || !strings.Contains(err.Error(), "not signed by the CA") {
		t.Fatalf("a certificate from another CA: %v", err)
	}
	if _, err := Load(Files{CertFile: server.CertFile, KeyFile: server.KeyFile}); err == nil {
		t.Fatal("no CA accepted")
	}
	if _, err := Load(Files{CAFile: server.CAFile, CertFile: server.CertFile}); err == nil {
		t.Fatal("a certificate without its key accepted")
	}
}

// TestSplit serves TLS and plain HTTP on one port: each client reaches its
// side, the TLS side sees who the client is, and a certificate from
// another CA is refused.
func TestSplit(t *testing.T) {
	_, _, server, node, _ := pki(t)
	_, _, _, foreign, _ := pki(t)
	sb, _ := Load(server)
	scfg, err := sb.ServerConfig(false)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tl, pl := Split(ln, scfg)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		role := PeerRole(r.TLS)
		fmt.Fprintf(w, "tls=%t server=%t node=%s", r.TLS != nil, role.Server, role.Node)
	})
	go http.Serve(tl, h)
	go http.Serve(pl, h)
	defer tl.Close()
	get := func(c *http.Client, scheme string) (string, error) {
		resp, err := c.Get(scheme + "://" + ln.Addr().String() + "/")
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b), nil
	}
	if got, err := get(http.DefaultClient, "http"); err != nil || got != "tls=false server=false node=" {
		t.Errorf("plain: %q %v", got, err)
	}
	nb, _ := Load(node)
	if got, err := get(nb.HTTPClient(5*time.Second), "https"); err != nil || got != "tls=true server=false node=n1" {
		t.Errorf("node: %q %v", got, err)
	}
	if got, err := get(sb.HTTPClient(5*time.Second), "https"); err != nil || got != "tls=true server=true node=" {
		t.Errorf("server: %q %v", got, err)
	}
	ca, _ := FromPEM(sb.CAPEM)
	if got, err := get(ca.HTTPClient(5*time.Second), "https"); err != nil || got != "tls=true server=false node=" {
		t.Errorf("no certificate: %q %v", got, err)
	}
	// A certificate from another CA: the handshake fails.
	fb, _ := Load(Files{CAFile: foreign.CAFile, CertFile: foreign.CertFile, KeyFile: foreign.KeyFile})
	fc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: sb.Pool, ServerName: ServerName, Certificates: []tls.Certificate{*fb.Cert}}}}
	if got, err := get(fc, "https"); err == nil {
		t.Errorf("a foreign client certificate was accepted: %q", got)
	}
}
