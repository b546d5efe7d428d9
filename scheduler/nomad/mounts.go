package nomad

// Volume mounts are the one permission cohort cannot ask Nomad about with
// the caller's token. Nomad's job plan checks submit-job only; the mounts
// are checked at registration, and cohort registers a gang later, once it
// fits, with its own token. So cohort reads the policies the caller's
// token holds, with that token (Nomad lets a token read its own policies
// and roles), and evaluates them with Nomad's own ACL package, by the
// rules Nomad's job registration applies (nomad/job_endpoint.go, Register).

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/hashicorp/nomad/acl"
	"github.com/hashicorp/nomad/api"
)

// mountNeed is one thing a job mounts or registers that Nomad checks at
// registration.
type mountNeed struct {
	group  string
	kind   string // "host", "csi", or "plugin" (a task that is a CSI plugin)
	source string // the host volume's or CSI volume's name
	write  bool   // a host volume mounted read-write
	task   string // for "plugin", and a bidirectional mount
}

// known is a volume Nomad keeps: its HTTP API drops volumes of any type
// but host and csi from a job it is given, so they mount nothing.
func known(v *api.VolumeRequest) *api.VolumeRequest {
	if v == nil || (v.Type != "host" && v.Type != "csi") {
		return nil
	}
	return v
}

// mountNeeds lists what a job mounts, in a stable order.
func mountNeeds(job *api.Job) []mountNeed {
	var out []mountNeed
	for _, tg := range job.TaskGroups {
		group := deref(tg.Name)
		names := make([]string, 0, len(tg.Volumes))
		for name := range tg.Volumes {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			if v := known(tg.Volumes[name]); v != nil {
				out = append(out, mountNeed{group: group, kind: v.Type, source: v.Source, write: !v.ReadOnly})
			}
		}
		for _, t := range tg.Tasks {
			for _, vm := range t.VolumeMounts {
				if vm == nil || vm.PropagationMode == nil || *vm.PropagationMode != "bidirectional" {
					continue
				}
				if v := known(tg.Volumes[deref(vm.Volume)]); v != nil {
					// Nomad asks read-write on the volume's source, whatever
					// its type, for a bidirectional mount.
					out = append(out, mountNeed{group: group, kind: "host", source: v.Source, write: true, task: t.Name})
				}
			}
			if t.CSIPluginConfig != nil {
				out = append(out, mountNeed{group: group, kind: "plugin", task: t.Name})
			}
		}
	}
	return out
}

// mountsAllowed checks needs against an ACL as Nomad's registration
// would, for a job in namespace.
func mountsAllowed(a *acl.ACL, namespace string, needs []mountNeed) error {
	for _, n := range needs {
		switch n.kind {
		case "host":
			ok := a.AllowHostVolumeOperation(n.source, acl.HostVolumeCapabilityMountReadWrite)
			if !n.write {
				ok = ok || a.AllowHostVolumeOperation(n.source, acl.HostVolumeCapabilityMountReadOnly)
			}
			if !ok {
				mode, want := "read-only", `mount-readonly (policy = "read")`
				if n.write {
					mode, want = "read-write", `mount-readwrite (policy = "write")`
				}
				if n.task != "" {
					mode = "with bidirectional propagation in task " + n.task
				}
				return fmt.Errorf("%w: group %s mounts host volume %q %s: that needs host_volume %q with %s", ErrDenied, n.group, n.source, mode, n.source, want)
			}
		case "csi":
			if !a.AllowPluginRead() || !a.AllowNsOp(namespace, acl.NamespaceCapabilityCSIMountVolume) {
				return fmt.Errorf("%w: group %s mounts CSI volume %q: that needs the csi-mount-volume capability on namespace %s and plugin read", ErrDenied, n.group, n.source, namespace)
			}
		case "plugin":
			if !a.AllowNsOp(namespace, acl.NamespaceCapabilityCSIRegisterPlugin) {
				return fmt.Errorf("%w: task %s of group %s is a CSI plugin: that needs the csi-register-plugin capability on namespace %s", ErrDenied, n.task, n.group, namespace)
			}
		}
	}
	return nil
}

// CanMount checks that token may mount what job mounts (and register the
// CSI plugins it is), as Nomad checks it when the job is registered.
// Callers ask only while Nomad's ACLs are on. A job without volumes asks
// Nomad nothing. No token is judged by the anonymous policy, as Nomad
// judges it.
func (c *Client) CanMount(token string, job *api.Job) error {
	needs := mountNeeds(job)
	if len(needs) == 0 {
		return nil
	}
	a, err := c.tokenACL(token)
	if err != nil {
		return err
	}
	return mountsAllowed(a, ns(deref(job.Namespace)), needs)
}

// MountSummary says, in one line that is the same for the same mounts,
// what job mounts and registers that Nomad checks at registration; "" for
// nothing. cohort signs it when it admits a job (after checking the
// caller), and registers a job with mounts only with that signature.
func MountSummary(job *api.Job) string {
	var b strings.Builder
	for _, n := range mountNeeds(job) {
		fmt.Fprintf(&b, "%s\x00%s\x00%s\x00%t\x00%s\n", n.group, n.kind, n.source, n.write, n.task)
	}
	return b.String()
}

// tokenACL is the ACL Nomad resolves token to: its policies, its own and
// its roles', or the anonymous policy for no token (which Nomad lets
// anyone read).
func (c *Client) tokenACL(token string) (*acl.ACL, error) {
	names, q := []string{"anonymous"}, (*api.QueryOptions)(nil)
	if token != "" {
		q = &api.QueryOptions{AuthToken: token}
		self, _, err := c.anon.ACLTokens().Self(q)
		if err != nil {
			if e := refused(err); errors.As(e, new(*RefusedError)) {
				// Among them a workload identity, which Nomad resolves
				// for its calls but knows no ACL token of.
				return nil, fmt.Errorf("%w: nomad knows no ACL token of this secret, so cohort cannot tell which volumes it may mount (%v)", ErrDenied, err)
			}
			return nil, fmt.Errorf("asking nomad about the token: %w", err)
		}
		if expired(self) {
			// Nomad's self-lookup answers an expired token until it is
			// collected; Nomad's registration would refuse it.
			return nil, fmt.Errorf("%w: the token has expired", ErrDenied)
		}
		if self.Type == "management" {
			return acl.ManagementACL, nil
		}
		names = append([]string(nil), self.Policies...)
		for _, link := range self.Roles {
			if link == nil {
				continue
			}
			role, _, err := c.anon.ACLRoles().Get(link.ID, q)
			if err != nil {
				if err := readError(err, "role "+link.Name); err != nil {
					return nil, err
				}
				continue // a role deleted since: Nomad skips it too
			}
			for _, p := range role.Policies {
				if p != nil {
					names = append(names, p.Name)
				}
			}
		}
	}
	seen := map[string]bool{}
	var policies []*acl.Policy
	for _, name := range names {
		if seen[name] {
			continue
		}
		seen[name] = true
		p, _, err := c.anon.ACLPolicies().Info(name, q)
		if err != nil {
			if err := readError(err, "policy "+name); err != nil {
				return nil, err
			}
			continue // a policy deleted since: Nomad skips it too
		}
		parsed, err := acl.Parse(p.Rules)
		if err != nil {
			return nil, fmt.Errorf("reading the token's policy %s: %w", name, err)
		}
		policies = append(policies, parsed)
	}
	return acl.NewACL(false, policies)
}

// readError sorts a failed read of one of the token's roles or policies:
// nil when it no longer exists, a refusal when the token may not read it,
// else Nomad failing.
func readError(err error, what string) error {
	var re *RefusedError
	if e := refused(err); errors.As(e, &re) && re.Status == 404 {
		return nil
	}
	if e := denied(err, "the token may not read its "+what); errors.Is(e, ErrDenied) {
		return e
	}
	return fmt.Errorf("reading the token's %s: %w", what, err)
}

// expired says whether Nomad would refuse t for its age.
func expired(t *api.ACLToken) bool {
	return t.ExpirationTime != nil && !t.ExpirationTime.IsZero() && t.ExpirationTime.Before(time.Now())
}
