package tlsutil

// One port, two protocols: a server with TLS still answers plain HTTP for
// the few things that must be reachable without cohort's CA (Nomad's
// artifact fetcher trusts only the system's CAs when it downloads the
// barrier task's program, which the job pins by checksum). The first
// byte of a connection tells: 0x16 opens a TLS handshake.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"
)

// sniffTimeout bounds how long a connection may take to send its first
// byte.
const sniffTimeout = 10 * time.Second

// Split returns a TLS listener and a plain one over ln.
func Split(ln net.Listener, cfg *tls.Config) (tlsLn, plainLn net.Listener) {
	s := &splitter{ln: ln, tls: make(chan net.Conn), plain: make(chan net.Conn), done: make(chan struct{})}
	go s.loop()
	return tls.NewListener(&side{s, s.tls}, cfg), &side{s, s.plain}
}

type splitter struct {
	ln         net.Listener
	tls, plain chan net.Conn
	done       chan struct{}
	once       sync.Once
	err        error
}

// loop accepts until the listener is closed. Any other error (out of
// file descriptors, say) is waited out, as net/http's server does.
func (s *splitter) loop() {
	backoff := 5 * time.Millisecond
	for {
		c, err := s.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				s.close(err)
				return
			}
			select {
			case <-s.done:
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, time.Second)
			continue
		}
		backoff = 5 * time.Millisecond
		go s.classify(c)
	}
}

func (s *splitter) classify(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(sniffTimeout))
	br := bufio.NewReader(c)
	first, err := br.Peek(1)
	if err != nil {
		c.Close()
		return
	}
	c.SetReadDeadline(time.Time{})
	to := s.plain
	if first[0] == 0x16 {
		to = s.tls
	}
	select {
	case to <- &peeked{Conn: c, r: br}:
	case <-s.done:
		c.Close()
	}
}

func (s *splitter) close(err error) {
	s.once.Do(func() {
		s.err = err
		close(s.done)
		s.ln.Close()
	})
}

// side is one of the two listeners. Closing either closes both, and the
// listener under them.
type side struct {
	s  *splitter
	ch chan net.Conn
}

func (l *side) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.s.done:
		return nil, net.ErrClosed
	}
}

func (l *side) Close() error {
	l.s.close(net.ErrClosed)
	return nil
}

func (l *side) Addr() net.Addr { return l.s.ln.Addr() }

// peeked is a connection whose first bytes sit in a reader.
type peeked struct {
	net.Conn
	r *bufio.Reader
}

func (p *peeked) Read(b []byte) (int, error) { return p.r.Read(b) }
