package replica

import (
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// stream is the raft.StreamLayer under the network transport, plain or
// TLS. It does two things Raft's own TCP layer does not:
//   - it tells the replica when a connection that carried Raft traffic to
//     this server ends from the other side (peerGone), the first sign that
//     a leader's process has died, long before a heartbeat timeout;
//   - Close closes every connection it made or accepted, as the end of a
//     process would. Raft's transport closes only its listener, so a
//     replica shut down inside a longer-lived process (tests, the bench)
//     otherwise leaves its peers' connections open as though it lived.
type stream struct {
	ln        net.Listener
	advertise net.Addr
	server    func(net.Conn) net.Conn
	dial      func(addr string, timeout time.Duration) (net.Conn, error)
	// peerGone holds one signal; more while it is full are the same news.
	peerGone chan struct{}

	mu     sync.Mutex
	conns  map[*watchedConn]struct{}
	closed bool
}

func newStream(bind string, server func(net.Conn) net.Conn, dial func(string, time.Duration) (net.Conn, error)) (*stream, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("raft listening on %s: %w", bind, err)
	}
	// Peers dial what this replica says its address is.
	if a, ok := ln.Addr().(*net.TCPAddr); !ok || a.IP == nil || a.IP.IsUnspecified() {
		ln.Close()
		return nil, fmt.Errorf("raft address %s is not one peers can dial: give a specific IP address", bind)
	}
	if server == nil {
		server = func(c net.Conn) net.Conn { return c }
	}
	if dial == nil {
		dial = func(addr string, timeout time.Duration) (net.Conn, error) {
			return net.DialTimeout("tcp", addr, timeout)
		}
	}
	return &stream{ln: ln, advertise: ln.Addr(), server: server, dial: dial,
		peerGone: make(chan struct{}, 1), conns: map[*watchedConn]struct{}{}}, nil
}

func (s *stream) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	return s.track(s.server(c), true)
}

func (s *stream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	c, err := s.dial(string(addr), timeout)
	if err != nil {
		return nil, err
	}
	return s.track(c, false)
}

func (s *stream) Addr() net.Addr { return s.advertise }

func (s *stream) Close() error {
	// The listener first: a peer that sees its connection end and asks
	// whether the port still listens must hear that it does not.
	err := s.ln.Close()
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for c := range conns {
		c.closing.Store(true)
		closeSocket(c.Conn)
	}
	return err
}

func (s *stream) track(c net.Conn, accepted bool) (net.Conn, error) {
	w := &watchedConn{Conn: c, s: s, accepted: accepted}
	s.mu.Lock()
	closed := s.closed
	if !closed {
		s.conns[w] = struct{}{}
	}
	s.mu.Unlock()
	if closed {
		w.closing.Store(true)
		closeSocket(c)
		return nil, net.ErrClosed
	}
	return w, nil
}

// closeSocket closes a connection's socket, as a process's end would:
// closing a TLS connection first writes its close alert, which a peer
// that does not read could hold up for seconds.
func closeSocket(c net.Conn) {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok {
		tc.NetConn().Close()
		return
	}
	c.Close()
}

func (s *stream) forget(w *watchedConn) {
	s.mu.Lock()
	if s.conns != nil {
		delete(s.conns, w)
	}
	s.mu.Unlock()
}

// watchedConn reports the end of an accepted connection that carried
// traffic: one that never did (a port scan, a peer whose certificate was
// refused) says nothing about the leader.
type watchedConn struct {
	net.Conn
	s        *stream
	accepted bool
	carried  atomic.Bool
	closing  atomic.Bool
	once     sync.Once
}

func (w *watchedConn) Read(b []byte) (int, error) {
	n, err := w.Conn.Read(b)
	if n > 0 {
		w.carried.Store(true)
	}
	if err != nil && w.closing.Load() {
		// Closed here: the end of the stream, which Raft's transport
		// does not log as an error.
		return n, io.EOF
	}
	if err != nil && w.accepted && w.carried.Load() && !errors.Is(err, net.ErrClosed) && !isTimeout(err) {
		w.once.Do(func() {
			select {
			case w.s.peerGone <- struct{}{}:
			default:
			}
		})
	}
	return n, err
}

func (w *watchedConn) Close() error {
	w.closing.Store(true)
	w.s.forget(w)
	return w.Conn.Close()
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
