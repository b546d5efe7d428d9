package replica

// Raft between servers over mutual TLS: both ends show a server
// certificate from the cluster's CA, so a plain TCP connection, or a TLS
// one without such a certificate, never reaches Raft.

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// handshakeTimeout bounds a peer's TLS handshake.
const handshakeTimeout = 10 * time.Second

// tlsStream is a raft.StreamLayer over TLS.
type tlsStream struct {
	ln        net.Listener
	advertise net.Addr
	server    *tls.Config
	client    *tls.Config
}

func newTLSStream(bind string, server, client *tls.Config) (*tlsStream, error) {
	if server == nil || client == nil || server.VerifyConnection == nil || client.VerifyConnection == nil {
		return nil, errors.New("raft over TLS needs both sides' configurations, each verifying the peer is a server")
	}
	if server.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("raft over TLS must require the peer's certificate")
	}
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("raft listening on %s: %w", bind, err)
	}
	// Peers dial what this replica says its address is.
	if a, ok := ln.Addr().(*net.TCPAddr); !ok || a.IP == nil || a.IP.IsUnspecified() {
		ln.Close()
		return nil, fmt.Errorf("raft address %s is not one peers can dial: give a specific IP address", bind)
	}
	return &tlsStream{ln: ln, advertise: ln.Addr(), server: server, client: client}, nil
}

// Accept hands Raft the connection before its handshake, which runs on
// Raft's own goroutine for the connection at the first read, under a
// deadline: a peer that never finishes it holds nothing else up.
func (s *tlsStream) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(handshakeTimeout))
	return &handshaking{Conn: tls.Server(c, s.server)}, nil
}

func (s *tlsStream) Close() error   { return s.ln.Close() }
func (s *tlsStream) Addr() net.Addr { return s.advertise }

func (s *tlsStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	return tls.DialWithDialer(d, "tcp", string(addr), s.client)
}

// handshaking completes the server side's handshake at the first read and
// then lifts the handshake's deadline.
type handshaking struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (h *handshaking) Read(b []byte) (int, error) {
	h.once.Do(func() {
		if h.err = h.Conn.Handshake(); h.err == nil {
			h.Conn.SetDeadline(time.Time{})
		}
	})
	if h.err != nil {
		h.Conn.Close()
		return 0, h.err
	}
	return h.Conn.Read(b)
}
