package driver

// The workers' resolver. Each node's driver answers DNS on its workers'
// gateway: names under .consul go to the node's Consul agent (so
// w<rank>.<address>.service.consul resolves in every worker, on every
// node), other names to the host's own resolvers when egress is on, and
// are refused when it is off. Workers cannot reach Consul itself.
//
// Nothing about the cluster goes upstream: .consul names never do, and
// reverse lookups of private addresses (workers look up their peers'
// addresses) are answered here, with no such name, as RFC 6303 asks of
// resolvers, instead of telling the host's resolvers (often a provider's)
// which private addresses the workers talk to.

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/dns"
)

type dnsForwarder struct {
	consul   string
	upstream []string
	egress   bool
	log      hclog.Logger
	servers  []*dns.Server
	client   *dns.Client
	tcp      *dns.Client
	once     sync.Once
}

// consulDNS is the node's Consul DNS.
func consulDNS(cfg NetworkConfig) string {
	if cfg.ConsulDNS == "" {
		return "127.0.0.1:8600"
	}
	return cfg.ConsulDNS
}

// startDNS serves DNS on addr (UDP and TCP).
func startDNS(addr, consul string, egress bool, log hclog.Logger) (*dnsForwarder, error) {
	if consul == "" {
		consul = consulDNS(NetworkConfig{})
	}
	f := &dnsForwarder{consul: consul, upstream: hostResolvers(), egress: egress, log: log,
		client: &dns.Client{Net: "udp", Timeout: 2 * time.Second},
		tcp:    &dns.Client{Net: "tcp", Timeout: 2 * time.Second}}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("serving DNS to workers on %s: %w", addr, err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("serving DNS to workers on %s: %w", addr, err)
	}
	udp := &dns.Server{PacketConn: pc, Handler: f}
	tcp := &dns.Server{Listener: l, Handler: f}
	f.servers = []*dns.Server{udp, tcp}
	for _, s := range f.servers {
		go s.ActivateAndServe()
	}
	return f, nil
}

// Close stops serving.
func (f *dnsForwarder) Close() {
	f.once.Do(func() {
		for _, s := range f.servers {
			s.Shutdown()
		}
	})
}

func (f *dnsForwarder) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	if len(req.Question) != 1 {
		// Not a query any resolver sends; its names could go anywhere.
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	name := strings.ToLower(req.Question[0].Name)
	if privateReverse(name) {
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeNameError)
		m.Authoritative = true
		w.WriteMsg(m)
		return
	}
	var targets []string
	if strings.HasSuffix(name, ".consul.") || name == "consul." {
		targets = []string{f.consul}
	} else if f.egress {
		targets = f.upstream
	}
	if len(targets) == 0 {
		m := new(dns.Msg)
		m.SetRcode(req, dns.RcodeRefused)
		w.WriteMsg(m)
		return
	}
	c := f.client
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		c = f.tcp
	}
	for _, t := range targets {
		resp, _, err := c.Exchange(req, t)
		if err == nil {
			w.WriteMsg(resp)
			return
		}
		f.log.Debug("forwarding a worker's query", "to", t, "error", err)
	}
	m := new(dns.Msg)
	m.SetRcode(req, dns.RcodeServerFailure)
	w.WriteMsg(m)
}

// privateZones are the reverse zones of private and local addresses that
// RFC 6303 says resolvers answer themselves.
var privateZones = func() []string {
	z := []string{"10.in-addr.arpa.", "168.192.in-addr.arpa.", "254.169.in-addr.arpa.", "127.in-addr.arpa.",
		"0.in-addr.arpa.", "d.f.ip6.arpa.", "8.e.f.ip6.arpa.", "9.e.f.ip6.arpa.", "a.e.f.ip6.arpa.", "b.e.f.ip6.arpa.",
		"1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.ip6.arpa."}
	for i := 16; i < 32; i++ {
		z = append(z, fmt.Sprintf("%d.172.in-addr.arpa.", i))
	}
	for i := 64; i < 128; i++ {
		z = append(z, fmt.Sprintf("%d.100.in-addr.arpa.", i)) // shared address space (RFC 6598)
	}
	return z
}()

// privateReverse says whether a (lower-case, fully qualified) name is in
// a private reverse zone.
func privateReverse(name string) bool {
	if !strings.HasSuffix(name, ".arpa.") {
		return false
	}
	for _, z := range privateZones {
		if name == z || strings.HasSuffix(name, "."+z) {
			return true
		}
	}
	return false
}

// hostResolvers are the nameservers of the host's /etc/resolv.conf.
func hostResolvers() []string {
	b, err := os.ReadFile("/etc/resolv.conf")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			out = append(out, net.JoinHostPort(f[1], "53"))
		}
	}
	return out
}
