package devcluster

import (
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
)

// Ports are the TCP ports the cluster's servers (Consul's and Nomad's)
// listen on, in the host's own network namespace. Each node runs its
// Nomad client and Consul agent in a namespace of its own, on the agents'
// usual ports.
type Ports struct {
	ConsulHTTP, ConsulDNS, ConsulServer, ConsulSerfLAN, ConsulSerfWAN, ConsulGRPC int
	NomadHTTP, NomadRPC, NomadSerf                                                int
}

// DefaultPorts are the agents' usual ports, so that the nomad and consul
// CLIs work without setting an address.
func DefaultPorts() Ports {
	return Ports{
		ConsulHTTP: 8500, ConsulDNS: 8600, ConsulServer: 8300, ConsulSerfLAN: 8301,
		ConsulSerfWAN: 8302, ConsulGRPC: 8502,
		NomadHTTP: 4646, NomadRPC: 4647, NomadSerf: 4648,
	}
}

// FreePorts picks unused ports, for tests that run beside a dev cluster.
// They come from below the kernel's range for outgoing connections (on
// Linux 32768 and up by default): a port the kernel picked as free could
// otherwise be taken by some connection before the agent binds it.
func FreePorts() (Ports, error) {
	ps := make([]int, 9)
	for i := range ps {
		p, err := FreePort()
		if err != nil {
			return Ports{}, err
		}
		ps[i] = p
	}
	return Ports{ps[0], ps[1], ps[2], ps[3], ps[4], ps[5], ps[6], ps[7], ps[8]}, nil
}

var (
	portMu   sync.Mutex
	portNext = 20000 + rand.IntN(10000)
)

// FreePort is a TCP port free on every address now, from 20000-31999,
// never the same twice in a process.
func FreePort() (int, error) {
	portMu.Lock()
	defer portMu.Unlock()
	for tries := 0; tries < 12000; tries++ {
		p := portNext
		portNext++
		if portNext >= 32000 {
			portNext = 20000
		}
		l, err := net.Listen("tcp", fmt.Sprintf("0.0.0.0:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		if u, err := net.ListenPacket("udp", fmt.Sprintf("0.0.0.0:%d", p)); err == nil {
			u.Close()
			return p, nil
		}
	}
	return 0, fmt.Errorf("no free port in 20000-31999")
}
