package replica

import (
	"crypto/tls"
	"errors"
	"github.com/hashicorp/go-hclog"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/scheduler/state"
)

// TestRaftOverTLS: a group over mutual TLS elects and replicates; a plain
// TCP connection to a member's Raft port, a TLS one without a
// certificate, and one with a node's certificate get nothing from Raft.
func TestRaftOverTLS(t *testing.T) {
	dir := t.TempDir()
	ca, err := tlsutil.NewCA("raft test", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	load := func(name string, c tlsutil.Cert) *tlsutil.Bundle {
		b, err := ca.IssueBundle(dir, name, c)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	server := load("server", tlsutil.ServerCert(nil))
	sc, cc, err := server.RaftConfigs()
	if err != nil {
		t.Fatal(err)
	}
	g := newGroupTLS(t, 3, sc, cc)
	g.waitLeader("")
	if res, _ := g.apply(&state.Command{Op: state.OpMember, At: time.Now(), Member: &state.Member{ID: "x", HTTPAddr: "https://x"}}); res.Err != "" {
		t.Fatal(res.Err)
	}
	var addr string
	for _, a := range g.peers {
		addr = a
	}
	// Plain TCP, speaking Raft's framing: the handshake fails, the
	// connection closes, nothing comes back.
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte{0, 0x83, 0xa4, 'T', 'e', 'r', 'm', 1}) // rpcAppendEntries and a msgpack start
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if b, err := io.ReadAll(c); len(b) != 0 || err != nil {
		t.Errorf("plain TCP got %d bytes back (%v), want the connection closed", len(b), err)
	}
	c.Close()
	// Over TLS: a server's certificate is let in (Raft then waits for the
	// rest of the request: the read times out); every other connection is
	// closed by the handshake.
	for name, cfg := range map[string]*tls.Config{
		"server certificate": server.ClientConfig(),
		"no certificate":     tlsutil.Must(tlsutil.FromPEM(ca.CertPEM)).ClientConfig(),
		"node certificate":   load("node", tlsutil.NodeCert("n1")).ClientConfig(),
		"foreign CA's cert":  foreignServer(t).ClientConfig(),
	} {
		cfg.InsecureSkipVerify = true // the client's side does not matter here
		c, err := tls.DialWithDialer(&net.Dialer{Timeout: time.Second}, "tcp", addr, cfg)
		if err == nil {
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			c.Write([]byte{0})
			_, err = c.Read(make([]byte, 1))
			c.Close()
		}
		var ne net.Error
		timedOut := errors.As(err, &ne) && ne.Timeout()
		if accepted := name == "server certificate"; timedOut != accepted {
			t.Errorf("%s: accepted %t, want %t (%v)", name, timedOut, accepted, err)
		}
	}
}

func foreignServer(t *testing.T) *tlsutil.Bundle {
	ca, _ := tlsutil.NewCA("other", time.Hour)
	b, err := ca.IssueBundle(t.TempDir(), "s", tlsutil.ServerCert(nil))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRefusedHandshakesLoggedOnce: connections the Raft port refuses
// reach Raft as an end of stream (which it does not log) and are logged
// here once, as a warning, however many come.
func TestRefusedHandshakesLoggedOnce(t *testing.T) {
	sc, cc := raftTLS(t)
	var mu sync.Mutex
	var out strings.Builder
	log := hclog.New(&hclog.LoggerOptions{Output: writerFunc(func(b []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return out.Write(b)
	}), Level: hclog.Debug})
	st, err := newTLSStream("127.0.0.1:0", sc, cc, log)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	reads := make(chan error, 3)
	go func() {
		for {
			c, err := st.Accept()
			if err != nil {
				return
			}
			go func() { _, err := c.Read(make([]byte, 1)); reads <- err }()
		}
	}()
	for i := 0; i < 3; i++ {
		cfg := foreignServer(t).ClientConfig()
		cfg.InsecureSkipVerify = true
		if c, err := tls.Dial("tcp", st.Addr().String(), cfg); err == nil {
			c.Read(make([]byte, 1))
			c.Close()
		}
		if err := <-reads; err != io.EOF {
			t.Errorf("Raft read %v from a refused connection, want the end of stream", err)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(out.String(), "refused a connection to the raft port"); n != 1 || !strings.Contains(out.String(), "[WARN]") {
		t.Errorf("3 refusals logged %d times:\n%s", n, out.String())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }
