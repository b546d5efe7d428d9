package devcluster

import (
	"fmt"
	"net"
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
func FreePorts() (Ports, error) {
	ps := make([]int, 9)
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for i := range ps {
		l, err := net.Listen("tcp", "0.0.0.0:0")
		if err != nil {
			return Ports{}, fmt.Errorf("finding a free port: %w", err)
		}
		ls = append(ls, l)
		ps[i] = l.Addr().(*net.TCPAddr).Port
	}
	return Ports{ps[0], ps[1], ps[2], ps[3], ps[4], ps[5], ps[6], ps[7], ps[8]}, nil
}
