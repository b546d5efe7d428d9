package tlsutil

// Making a CA and certificates, for `cohort tls`, `cohort dev` and tests.
// ECDSA P-256 keys; certificates usable both to serve and to dial, since
// servers dial each other.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority that can sign certificates.
type CA struct {
	CertPEM, KeyPEM []byte
	cert            *x509.Certificate
	key             *ecdsa.PrivateKey
}

// NewCA makes a self-signed CA valid for validity.
func NewCA(name string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"cohort"}},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &CA{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}),
		cert:    cert, key: key,
	}, nil
}

// LoadCA reads a CA's certificate and key.
func LoadCA(certFile, keyFile string) (*CA, error) {
	cp, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	kp, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, err
	}
	cb, _ := pem.Decode(cp)
	kb, _ := pem.Decode(kp)
	if cb == nil || kb == nil {
		return nil, fmt.Errorf("%s or %s is not PEM", certFile, keyFile)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing %s: %w", certFile, err)
	}
	key, err := x509.ParseECPrivateKey(kb.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parsing %s (an EC private key): %w", keyFile, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%s is not a CA certificate", certFile)
	}
	return &CA{CertPEM: cp, KeyPEM: kp, cert: cert, key: key}, nil
}

// Cert is what a certificate says of its holder.
type Cert struct {
	CommonName string
	DNSNames   []string
	IPs        []net.IP
	Validity   time.Duration
}

// Issue signs a certificate for c and returns it and its key, PEM.
func (ca *CA) Issue(c Cert) (certPEM, keyPEM []byte, err error) {
	if c.CommonName == "" && len(c.DNSNames) == 0 {
		return nil, nil, errors.New("a certificate needs a name")
	}
	if c.Validity <= 0 {
		c.Validity = 365 * 24 * time.Hour
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: c.CommonName, Organization: []string{"cohort"}},
		DNSNames:     c.DNSNames,
		IPAddresses:  c.IPs,
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(c.Validity),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), nil
}

// ServerCert is a cohort server's certificate, valid for its addresses.
func ServerCert(ips []net.IP, dns ...string) Cert {
	return Cert{CommonName: ServerName, DNSNames: append([]string{ServerName, "localhost"}, dns...), IPs: append([]net.IP{net.IPv4(127, 0, 0, 1)}, ips...)}
}

// NodeCert is the microvm driver's certificate on the Nomad node named
// node.
func NodeCert(node string) Cert {
	return Cert{CommonName: node + NodeSuffix, DNSNames: []string{node + NodeSuffix}}
}

// CLICert is a certificate for people and tools that call the API: it
// proves nothing but membership of the CA's cluster (for
// -verify-incoming); what they may do is their Nomad token's business.
func CLICert() Cert { return Cert{CommonName: "cli.cohort", DNSNames: []string{"cli.cohort"}} }

// WriteFiles writes a certificate and its key into dir as name.pem and
// name-key.pem (the key readable by its owner only) and returns Files
// for them with the CA at caFile.
func WriteFiles(dir, name, caFile string, certPEM, keyPEM []byte) (Files, error) {
	f := Files{CAFile: caFile, CertFile: filepath.Join(dir, name+".pem"), KeyFile: filepath.Join(dir, name+"-key.pem")}
	if err := os.WriteFile(f.CertFile, certPEM, 0o644); err != nil {
		return f, err
	}
	if err := os.WriteFile(f.KeyFile, keyPEM, 0o600); err != nil {
		return f, err
	}
	return f, nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n
}

// IssueBundle signs c, writes it and the CA into dir (ca.pem, name.pem,
// name-key.pem) and loads it: a member's TLS in one call, for tests and
// dev clusters.
func (ca *CA) IssueBundle(dir, name string, c Cert) (*Bundle, error) {
	cp, kp, err := ca.Issue(c)
	if err != nil {
		return nil, err
	}
	caFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(caFile, ca.CertPEM, 0o644); err != nil {
		return nil, err
	}
	f, err := WriteFiles(dir, name, caFile, cp, kp)
	if err != nil {
		return nil, err
	}
	return Load(f)
}
