package server

// Who may do what. People and tools carry a Nomad ACL token
// (X-Nomad-Token, as Nomad's CLI sends it) and may do with cohort what
// Nomad's ACLs let the token do with Nomad: Nomad itself is asked, with
// the caller's token, through calls that need the capability in question
// (see nomad/acl.go); answers are cached briefly. With Nomad's ACLs off,
// cohort is open as Nomad is.
//
// Servers and nodes prove who they are with certificates from the
// cluster's CA (see internal/tlsutil): joining the group, registering a
// member and forwarding take a server's; leasing a subnet and reporting a
// microvm worker's boot take the node's own. A barrier task proves it
// belongs to its job with the job's barrier token. A server without TLS
// has no way to tell a server or a node from anyone else: it refuses
// every server-to-server call and trusts node calls as far as Nomad's
// answers about the allocation go, and says so at start-up.

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cohort-dev/cohort/api"
	"github.com/cohort-dev/cohort/internal/tlsutil"
	"github.com/cohort-dev/cohort/jobspec"
	"github.com/cohort-dev/cohort/scheduler/nomad"
	"github.com/cohort-dev/cohort/scheduler/state"
	nomadapi "github.com/hashicorp/nomad/api"
)

// nodeHeader and serverHeader carry, on a request a server forwards, who
// the forwarding server verified the caller to be: the node of a node
// certificate, or "1" for a server's. The leader sees the forwarding
// server's certificate, not the caller's, so on a forwarded request from
// a server these headers are the caller's role, and nothing else is; a
// server strips both from what it receives before it forwards.
const (
	nodeHeader   = "X-Cohort-Node"
	serverHeader = "X-Cohort-Server"
)

// How long Nomad's answers about a token are kept: an allowed call is
// not asked again for allowTTL, a refused one for denyTTL. A revoked
// token keeps what it had for at most allowTTL, as with Nomad's own
// caches.
const (
	allowTTL    = 30 * time.Second
	denyTTL     = 5 * time.Second
	aclModeTTL  = 30 * time.Second
	maxACLCache = 4096
)

// caller is who sent a request.
type caller struct {
	token  string
	server bool   // a verified server certificate
	node   string // a verified node certificate's node
}

func (s *Server) callerOf(r *http.Request) caller {
	c := caller{token: tokenOf(r)}
	role := tlsutil.PeerRole(r.TLS)
	c.server, c.node = role.Server, role.Node
	if c.server && r.Header.Get(forwardedHeader) != "" {
		c.server, c.node = r.Header.Get(serverHeader) == "1", r.Header.Get(nodeHeader)
	}
	return c
}

// tokenOf is the caller's Nomad token, from either header Nomad takes.
func tokenOf(r *http.Request) string {
	if t := r.Header.Get(api.TokenHeader); t != "" {
		return t
	}
	if t, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return strings.TrimSpace(t)
	}
	return ""
}

// aclCache remembers Nomad's verdicts on tokens.
type aclCache struct {
	mu      sync.Mutex
	entries map[string]aclEntry
	on      bool
	known   bool // on was answered by Nomad
	onUntil time.Time
}

type aclEntry struct {
	err   error
	until time.Time
}

// check answers what (for token) from the cache or from ask.
func (s *Server) check(token, what string, ask func() error) error {
	sum := sha256.Sum256([]byte(token))
	key := what + "\x00" + string(sum[:])
	now := time.Now()
	c := &s.acl
	c.mu.Lock()
	if e, ok := c.entries[key]; ok && now.Before(e.until) {
		c.mu.Unlock()
		return e.err
	}
	c.mu.Unlock()
	err := ask()
	if err != nil && !errors.Is(err, nomad.ErrDenied) {
		return err // Nomad did not answer: nothing to remember
	}
	ttl := allowTTL
	if err != nil {
		ttl = denyTTL
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.entries == nil || len(c.entries) >= maxACLCache {
		for k, e := range c.entries {
			if !now.Before(e.until) {
				delete(c.entries, k)
			}
		}
		if c.entries == nil || len(c.entries) >= maxACLCache {
			c.entries = map[string]aclEntry{}
		}
	}
	c.entries[key] = aclEntry{err: err, until: now.Add(ttl)}
	return err
}

// aclsOn says whether Nomad enforces ACLs, asked at most every
// aclModeTTL. When Nomad cannot be asked, ACLs count as on.
func (s *Server) aclsOn() bool {
	c := &s.acl
	c.mu.Lock()
	if time.Now().Before(c.onUntil) {
		on := c.on
		c.mu.Unlock()
		return on
	}
	c.mu.Unlock()
	on, err := s.nomad.ACLsEnabled()
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		// Keep what was known; never known counts as on. Asked again
		// in a few seconds, not on every request.
		if !c.known {
			c.on = true
		}
		s.log.Warn("asking nomad whether its ACLs are on", "error", err, "treating_as_on", c.on)
		c.onUntil = time.Now().Add(denyTTL)
		return c.on
	}
	if on != c.on || !c.known {
		if on {
			s.log.Info("nomad ACLs are on: every call to cohort needs a Nomad token allowed to do it")
		} else {
			s.log.Warn("nomad ACLs are off: cohort's API is open to every caller, as Nomad's is")
		}
	}
	c.on, c.known, c.onUntil = on, true, time.Now().Add(aclModeTTL)
	return on
}

// ACLsOn is aclsOn, for the start-up message.
func (s *Server) ACLsOn() bool { return s.aclsOn() }

// mayRead checks read-job on a namespace.
func (s *Server) mayRead(c caller, ns string) error {
	if c.server || !s.aclsOn() {
		return nil
	}
	return s.check(c.token, "read-job:"+nomadNS(ns), func() error { return s.nomad.CanReadJob(c.token, nomadNS(ns)) })
}

// maySubmit checks submit-job on a job's namespace, by asking Nomad to
// plan the job as cohort would register it. It is never cached: besides
// the namespace, Nomad checks what this one job uses (its node pool), and
// cohort registers it with its own token. Its volumes the plan does not
// check: mayMount does.
func (s *Server) maySubmit(c caller, job *nomadapi.Job) error {
	if !s.aclsOn() {
		return nil
	}
	return s.nomad.CanSubmit(c.token, job)
}

// mayMount checks that the caller may mount the host and CSI volumes of a
// job it submits. Nomad checks mounts when a job is registered, and
// cohort registers it later with its own token, which may mount any
// volume: without this any caller who may submit could mount any volume
// through cohort. Stopping a gang does not ask it, as Nomad's deregister
// does not.
func (s *Server) mayMount(c caller, job *nomadapi.Job) error {
	if !s.aclsOn() {
		return nil
	}
	return s.nomad.CanMount(c.token, job)
}

// mountsMarkVersion names what a mark signs (nomad.MountSummary's form):
// a mark of another version is not this one's, and is refused.
const mountsMarkVersion = "1"

// mountsMark is the signature admission puts on a job's volume mounts
// (jobspec.MetaMounts): the group's secret signs the job's key and what it
// mounts, so a job can carry no other job's, and no mounts but its own.
func mountsMark(secret []byte, key, mounts string) string {
	return mountsMarkVersion + ":" + sign(secret, "cohort mounts %s\x00%s\x00%s", mountsMarkVersion, key, mounts)
}

// signMounts signs the mounts of a job being admitted while Nomad's ACLs
// are on, after mayMount (or Nomad, for a gang registered with it
// directly) allowed them. With ACLs off nothing was checked, and nothing
// is signed: a gang admitted then is not registered with mounts once they
// are on.
func (s *Server) signMounts(nj *nomadapi.Job, key string) error {
	mounts := nomad.MountSummary(nj)
	if nj.Meta != nil {
		delete(nj.Meta, jobspec.MetaMounts) // never the caller's own
	}
	if mounts == "" || !s.aclsOn() {
		return nil
	}
	sec, err := s.secret()
	if err != nil {
		return err
	}
	if nj.Meta == nil {
		nj.Meta = map[string]string{}
	}
	nj.Meta[jobspec.MetaMounts] = mountsMark(sec, key, mounts)
	return nil
}

// signedMounts says whether a stored job's mounts carry admission's
// signature: a gang admitted by a server from before the check, or while
// Nomad's ACLs were off, whose mounts no one checked, does not, and is not
// registered with cohort's token while Nomad's ACLs are on.
func (s *Server) signedMounts(nj *nomadapi.Job, key string) bool {
	mounts := nomad.MountSummary(nj)
	if mounts == "" || !s.aclsOn() {
		return true
	}
	var sec []byte
	s.r.Read(func(st *state.State) { sec = st.Secret })
	return len(sec) > 0 && hmac.Equal([]byte(mountsMark(sec, key, mounts)), []byte(nj.Meta[jobspec.MetaMounts]))
}

// errUncheckedMounts is registerAttempt's refusal of a gang whose mounts
// no one checked: cohort's own verdict, the same at every attempt, so the
// gang fails at once instead of being placed and refused again.
var errUncheckedMounts = errors.New("its volume mounts were never checked against the token that submitted it (it was admitted by a cohort server older than that check, or while Nomad's ACLs were off): submit it again")

// mayReadNodes checks node read.
func (s *Server) mayReadNodes(c caller) error {
	if c.server || !s.aclsOn() {
		return nil
	}
	return s.check(c.token, "node:read", func() error { return s.nomad.CanReadNodes(c.token) })
}

// mayOperate checks a management token, or a server's certificate.
func (s *Server) mayOperate(c caller) error {
	if c.server || !s.aclsOn() {
		return nil
	}
	return s.check(c.token, "management", func() error { return s.nomad.IsManagement(c.token) })
}

// errNotServer refuses a server-to-server call from anyone else.
func (s *Server) errNotServer(what string) error {
	if s.tls == nil {
		return fmt.Errorf("%w: %s needs a cohort server's certificate, and this server runs without TLS: a group of servers needs -ca-file, -cert-file and -key-file", nomad.ErrDenied, what)
	}
	return fmt.Errorf("%w: %s needs a certificate of the cluster's CA naming %s", nomad.ErrDenied, what, tlsutil.ServerName)
}

// mayNode checks that the caller is the node named, where the servers can
// tell (TLS); without TLS anyone may speak for a node.
func (s *Server) mayNode(c caller, node string) error {
	if s.tls == nil {
		return nil
	}
	switch {
	case c.node == "":
		return fmt.Errorf("%w: node calls need the node's certificate from the cluster's CA (naming <node>%s)", nomad.ErrDenied, tlsutil.NodeSuffix)
	case node != "" && c.node != node:
		return fmt.Errorf("%w: the certificate is node %s's, not %s's", nomad.ErrDenied, c.node, node)
	}
	return nil
}

// refusal is a failed check's answer: 403 when refused, 502 when Nomad
// could not be asked.
func refusal(err error) (int, error) {
	if errors.Is(err, nomad.ErrDenied) {
		return http.StatusForbidden, err
	}
	return http.StatusBadGateway, fmt.Errorf("checking the caller's permissions with nomad: %w", err)
}

// refuse writes a failed check's answer (refusal).
func refuse(w http.ResponseWriter, err error) {
	code, err := refusal(err)
	writeErr(w, code, err)
}

// allowed runs a check and answers its refusal; it says whether to go on.
func allowed(w http.ResponseWriter, err error) bool {
	if err != nil {
		refuse(w, err)
		return false
	}
	return true
}

// secret is the group's key, made by the leader the first time one is
// needed.
func (s *Server) secret() ([]byte, error) {
	var sec []byte
	s.r.Read(func(st *state.State) { sec = st.Secret })
	if len(sec) > 0 {
		return sec, nil
	}
	if !s.r.IsLeader() {
		return nil, errors.New("the server group has no secret yet; the leader makes it")
	}
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	if _, err := s.apply(&state.Command{Op: state.OpSecret, At: s.now(), Secret: b}); err != nil {
		return nil, fmt.Errorf("recording the group's secret: %w", err)
	}
	s.r.Read(func(st *state.State) { sec = st.Secret })
	return sec, nil
}

// barrierToken is the token of a run's barrier tasks: the group's secret
// signs the job's key and run, so any server can check it, and no job's
// token opens another's barrier or a later run's.
func barrierToken(secret []byte, key string, run int) string {
	return sign(secret, "cohort barrier token\x00%s\x00%d", key, run)
}

// sign is the group's secret's HMAC-SHA256 of a message, in unpadded
// URL-safe base64. Each use opens its message with its own words, so no
// signature of one kind stands for another.
func sign(secret []byte, format string, a ...any) string {
	m := hmac.New(sha256.New, secret)
	fmt.Fprintf(m, format, a...)
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// runOf is the run a submission of key now joins: the live one, or the
// next.
func (s *Server) runOf(key string) int {
	run := 1
	s.r.Read(func(st *state.State) { run = st.NextRun(key) })
	return run
}

// validBarrierToken checks a barrier task's token for the job's current
// run.
func (s *Server) validBarrierToken(key, token string) bool {
	if token == "" {
		return false
	}
	var sec []byte
	run := 0
	s.r.Read(func(st *state.State) {
		sec = st.Secret
		if j, ok := st.Jobs[key]; ok && !j.Ended() {
			run = j.Run
		}
	})
	return len(sec) > 0 && run > 0 && hmac.Equal([]byte(barrierToken(sec, key, run)), []byte(token))
}
