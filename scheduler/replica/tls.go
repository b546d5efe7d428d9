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

	"github.com/hashicorp/go-hclog"
)

// handshakeTimeout bounds a peer's TLS handshake.
const handshakeTimeout = 10 * time.Second

func newTLSStream(bind string, server, client *tls.Config, log hclog.Logger) (*stream, error) {
	if server == nil || client == nil || server.VerifyConnection == nil || client.VerifyConnection == nil {
		return nil, errors.New("raft over TLS needs both sides' configurations, each verifying the peer is a server")
	}
	if server.ClientAuth != tls.RequireAndVerifyClientCert {
		return nil, errors.New("raft over TLS must require the peer's certificate")
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	refused := &refusals{log: log}
	return newStream(bind,
		// The connection goes to Raft before its handshake, which runs on
		// Raft's own goroutine for the connection at the first read, under
		// a deadline: a peer that never finishes it holds nothing else up.
		func(c net.Conn) net.Conn {
			c.SetDeadline(time.Now().Add(handshakeTimeout))
			return &handshaking{Conn: tls.Server(c, server), refused: refused}
		},
		func(addr string, timeout time.Duration) (net.Conn, error) {
			return tls.DialWithDialer(&net.Dialer{Timeout: timeout}, "tcp", addr, client)
		})
}

// handshaking completes the server side's handshake at the first read and
// then lifts the handshake's deadline.
type handshaking struct {
	*tls.Conn
	once    sync.Once
	err     error
	refused *refusals
}

func (h *handshaking) Read(b []byte) (int, error) {
	h.once.Do(func() {
		if h.err = h.Conn.Handshake(); h.err == nil {
			h.Conn.SetDeadline(time.Time{})
		} else if !errors.Is(h.err, io.EOF) {
			h.refused.add(h.Conn.RemoteAddr(), h.err)
		}
	})
	if h.err != nil {
		h.Conn.Close()
		// To Raft, a connection refused here is an end of stream, which
		// it does not log: anyone can reach the port, and Raft would log
		// each refusal at ERROR. They are logged here, at most one line a
		// minute. A peer that connected and left without a word (a
		// follower asking whether this port still listens) is not
		// logged at all.
		return 0, io.EOF
	}
	return h.Conn.Read(b)
}

// refusalLogEvery is the most often refused handshakes are logged.
const refusalLogEvery = time.Minute

// refusals logs refused handshakes, at most once per refusalLogEvery, with
// how many were refused since the last line.
type refusals struct {
	log    hclog.Logger
	mu     sync.Mutex
	last   time.Time
	unsaid int
}

func (r *refusals) add(from net.Addr, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.unsaid++
	if now := time.Now(); r.last.IsZero() || now.Sub(r.last) >= refusalLogEvery {
		r.log.Warn("refused a connection to the raft port: only the group's servers may connect",
			"from", from.String(), "error", err, "refused_since_last_message", r.unsaid)
		r.last, r.unsaid = now, 0
	}
}
