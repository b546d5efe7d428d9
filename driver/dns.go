package driver

// The workers' resolver. Each node's driver answers DNS on its workers'
// gateway: names under .consul go to the node's Consul agent (so
// w<rank>.<address>.service.consul resolves in every worker, on every
// node), other names to the host's own resolvers when egress is on, and
// are refused when it is off. Workers cannot reach Consul itself.

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
	var targets []string
	if len(req.Question) == 1 && strings.HasSuffix(strings.ToLower(req.Question[0].Name), ".consul.") {
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
