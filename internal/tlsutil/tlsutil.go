// Package tlsutil is cohort's mutual TLS: loading a cluster's CA and a
// member's certificate, the server and client configurations built from
// them, the roles a certificate grants, and making a CA and certificates
// (`cohort tls`, `cohort dev`, tests).
//
// Roles live in DNS names, as Nomad's do ("server.global.nomad"): a
// certificate naming server.cohort is a cohort server's, one naming
// <node>.node.cohort is the microvm driver's on the Nomad node of that
// name. Only certificates signed by the cluster's CA count.
package tlsutil

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"
)

// ServerName is the DNS name every cohort server certificate carries; a
// client verifies a server against it, whatever address it dialed.
const ServerName = "server.cohort"

// NodeSuffix ends the DNS name of a node's certificate:
// <nomad node name>.node.cohort.
const NodeSuffix = ".node.cohort"

// Files names a member's TLS material, as flags and plugin options give
// it.
type Files struct {
	CAFile, CertFile, KeyFile string
}

// Enabled says whether any TLS material is named.
func (f Files) Enabled() bool { return f.CAFile != "" || f.CertFile != "" || f.KeyFile != "" }

// Bundle is a loaded CA and, optionally, this member's certificate.
type Bundle struct {
	Pool  *x509.CertPool
	CAPEM []byte
	Cert  *tls.Certificate // nil for a client without a certificate
	// Leaf is Cert parsed.
	Leaf *x509.Certificate
}

// Load reads f. The CA is required; the certificate and key go together.
func Load(f Files) (*Bundle, error) {
	if f.CAFile == "" {
		return nil, errors.New("TLS needs the cluster's CA certificate (-ca-file)")
	}
	if (f.CertFile == "") != (f.KeyFile == "") {
		return nil, errors.New("a TLS certificate needs its key, and a key its certificate")
	}
	pem, err := os.ReadFile(f.CAFile)
	if err != nil {
		return nil, fmt.Errorf("reading the CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", f.CAFile)
	}
	b := &Bundle{Pool: pool, CAPEM: pem}
	if f.CertFile != "" {
		c, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("loading the certificate %s: %w", f.CertFile, err)
		}
		leaf, err := x509.ParseCertificate(c.Certificate[0])
		if err != nil {
			return nil, fmt.Errorf("parsing the certificate %s: %w", f.CertFile, err)
		}
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			return nil, fmt.Errorf("the certificate %s is not signed by the CA in %s: %w", f.CertFile, f.CAFile, err)
		}
		b.Cert, b.Leaf = &c, leaf
	}
	return b, nil
}

// FromPEM is a client bundle from a CA certificate alone (the barrier
// task, which gets the CA in its environment).
func FromPEM(caPEM []byte) (*Bundle, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("no PEM certificate in the CA given")
	}
	return &Bundle{Pool: pool, CAPEM: caPEM}, nil
}

// IsServer says whether the bundle's own certificate is a server's.
func (b *Bundle) IsServer() bool { return b.Leaf != nil && hasName(b.Leaf, ServerName) }

// Node is the node the bundle's own certificate is for, if it is a
// node's.
func (b *Bundle) Node() string {
	if b.Leaf == nil {
		return ""
	}
	return NodeOf(b.Leaf)
}

// ServerConfig is the listening side. requireClient refuses clients
// without a certificate from the CA (Raft; the API with
// -verify-incoming); otherwise one is verified when given.
func (b *Bundle) ServerConfig(requireClient bool) (*tls.Config, error) {
	if b.Cert == nil {
		return nil, errors.New("serving TLS needs a certificate and key (-cert-file, -key-file)")
	}
	if !b.IsServer() {
		return nil, fmt.Errorf("the certificate is not a cohort server's: it must name %s", ServerName)
	}
	auth := tls.VerifyClientCertIfGiven
	if requireClient {
		auth = tls.RequireAndVerifyClientCert
	}
	return &tls.Config{
		Certificates: []tls.Certificate{*b.Cert},
		ClientCAs:    b.Pool,
		ClientAuth:   auth,
		MinVersion:   tls.VersionTLS12,
	}, nil
}

// ClientConfig is the dialing side: the server must hold a server
// certificate from the CA, whatever address was dialed; this member's
// certificate, if any, is presented.
func (b *Bundle) ClientConfig() *tls.Config {
	c := &tls.Config{RootCAs: b.Pool, ServerName: ServerName, MinVersion: tls.VersionTLS12}
	if b.Cert != nil {
		c.Certificates = []tls.Certificate{*b.Cert}
	}
	return c
}

// HTTPClient is an HTTP client for cohort servers over TLS.
func (b *Bundle) HTTPClient(timeout time.Duration) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = b.ClientConfig()
	return &http.Client{Transport: t, Timeout: timeout}
}

// Role is what a verified peer certificate makes its holder.
type Role struct {
	Server bool
	Node   string // the node of a node certificate
}

// PeerRole is the role of a connection's verified client certificate;
// the zero Role when there is none. Only chains the handshake verified
// count.
func PeerRole(cs *tls.ConnectionState) Role {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.VerifiedChains[0]) == 0 {
		return Role{}
	}
	leaf := cs.VerifiedChains[0][0]
	return Role{Server: hasName(leaf, ServerName), Node: NodeOf(leaf)}
}

// RequireServerPeer is a tls.Config VerifyConnection that accepts only
// server certificates (Raft between servers).
func RequireServerPeer(cs tls.ConnectionState) error {
	if !PeerRole(&cs).Server {
		return fmt.Errorf("the peer's certificate is not a cohort server's (it must name %s)", ServerName)
	}
	return nil
}

// NodeOf is the node a certificate names, if any.
func NodeOf(c *x509.Certificate) string {
	for _, n := range c.DNSNames {
		if node, ok := strings.CutSuffix(n, NodeSuffix); ok && node != "" {
			return node
		}
	}
	return ""
}

func hasName(c *x509.Certificate, name string) bool {
	for _, n := range c.DNSNames {
		if n == name {
			return true
		}
	}
	return false
}

// RaftConfigs are both sides of Raft between servers: each end must show
// a server certificate of the CA.
func (b *Bundle) RaftConfigs() (server, client *tls.Config, err error) {
	if server, err = b.ServerConfig(true); err != nil {
		return nil, nil, err
	}
	server.VerifyConnection = RequireServerPeer
	client = b.ClientConfig()
	client.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 || !hasName(cs.PeerCertificates[0], ServerName) {
			return fmt.Errorf("the raft peer's certificate is not a cohort server's")
		}
		return nil
	}
	return server, client, nil
}

// Must is b, for tests and constants: it panics on err.
func Must(b *Bundle, err error) *Bundle {
	if err != nil {
		panic(err)
	}
	return b
}
