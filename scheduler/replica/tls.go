package replica

// Raft between servers over mutual TLS: both ends show a server
// certificate from the cluster's CA, so a plain TCP connection, or a TLS
// one without such a certificate, never reaches Raft.

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// handshakeTimeout bounds a peer's TLS handshake.
const handshakeTimeout = 10 * time.Second

func newTLSStream(bind string, server, client *tls.Config) (*stream, error) {
	if server == nil || client == nil || server.VerifyConnection == nil || client.VerifyConnection == nil {
		return nil, errors.New("raft over TLS needs both sides' configurations, each verifying the peer is a server")
	}
	if server.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("raft over TLS must require the peer's certificate")
	}
	return newStream(bind,
		// The connection goes to Raft before its handshake, which runs on
		// Raft's own goroutine for the connection at the first read, under
		// a deadline: a peer that never finishes it holds nothing else up.
		func(c net.Conn) net.Conn {
			c.SetDeadline(time.Now().Add(handshakeTimeout))
			return &handshaking{Conn: tls.Server(c, server)}
		},
		func(addr string, timeout time.Duration) (net.Conn, error) {
			return tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", addr, client)
		})
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
		// A peer that connected and left without a word (a follower
		// asking whether this port still listens) is an end of stream,
		// which Raft does not log as an error.
		if errors.Is(h.err, io.EOF) {
			return 0, io.EOF
		}
		return 0, h.err
	}
	return h.Conn.Read(b)
}
