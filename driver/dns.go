package driver

// The workers' resolver. Each node's driver answers DNS on its workers'
// gateway: names under .consul go to the node's Consul agent (so
// w<rank>.<address>.service.consul resolves in every worker, on every
// node), other names to the host's own resolvers when egress is on, and
// are refused when it is off. Workers cannot reach Consul itself.
//
// Nothing about the workers goes upstream: .consul names never do, and
// reverse lookups of workers' addresses (programs look up their peers')
// are answered here, with no such name, instead of telling the host's
// resolvers (often a provider's) which workers talk to which. Reverse
// lookups of other private addresses go upstream with egress, as before:
// a provider's or a company's resolver may know those names.

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/miekg/dns"
)

type dnsForwarder struct {
	// workers is the cluster's worker range.
	workers  *net.IPNet
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
func startDNS(addr, consul string, workers *net.IPNet, egress bool, log hclog.Logger) (*dnsForwarder, error) {
	if consul == "" {
		consul = consulDNS(NetworkConfig{})
	}
	f := &dnsForwarder{workers: workers, consul: consul, upstream: hostResolvers(), egress: egress, log: log,
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
	if reverseIn(name, f.workers) {
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

// reverseIn says whether a (lower-case, fully qualified) name is the
// reverse name of an IPv4 address in rng, or of a part of rng.
func reverseIn(name string, rng *net.IPNet) bool {
	rest, ok := strings.CutSuffix(name, ".in-addr.arpa.")
	if !ok || rng == nil || rng.IP.To4() == nil {
		return false
	}
	labels := strings.Split(rest, ".")
	if len(labels) > 4 {
		// Names below an address (DNS-SD's b._dns-sd._udp.<address>)
		// tell as much about it.
		labels = labels[len(labels)-4:]
	}
	ip := make(net.IP, 4)
	for i, l := range labels {
		v, err := strconv.Atoi(l)
		if err != nil || v < 0 || v > 255 || (len(l) > 1 && l[0] == '0') {
			return false
		}
		ip[len(labels)-1-i] = byte(v)
	}
	ones, _ := rng.Mask.Size()
	return 8*len(labels) >= ones && rng.Contains(ip)
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
