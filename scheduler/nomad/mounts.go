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

	"github.com/hashicorp/nomad/acl"
	"github.com/hashicorp/nomad/api"
)

// mountNeed is one thing a job mounts or registers that Nomad checks at
// registration.
type mountNeed struct {
	group  string
	kind   string // "host", "csi", "plugin" (a task that is a CSI plugin), or another volume type
	source string // the host volume's or CSI volume's name
	write  bool   // a host volume mounted read-write
	task   string // for "plugin", and a bidirectional mount
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
			v := tg.Volumes[name]
			if v == nil {
				continue
			}
			out = append(out, mountNeed{group: group, kind: v.Type, source: v.Source, write: !v.ReadOnly})
		}
		for _, t := range tg.Tasks {
			for _, vm := range t.VolumeMounts {
				if vm == nil || vm.PropagationMode == nil || *vm.PropagationMode != "bidirectional" {
					continue
				}
				if v := tg.Volumes[deref(vm.Volume)]; v != nil {
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
		default:
			// Nomad refuses a volume type it does not know under ACLs.
			return fmt.Errorf("%w: group %s has a volume of type %q, which Nomad refuses under ACLs", ErrDenied, n.group, n.kind)
		}
	}
	return nil
}

// CanMount checks that token may mount what job mounts (and register the
// CSI plugins it is), as Nomad checks it when the job is registered.
// Callers ask only while Nomad's ACLs are on. A job without volumes asks
// Nomad nothing.
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

// tokenACL is the ACL of token's policies, its own and its roles'.
func (c *Client) tokenACL(token string) (*acl.ACL, error) {
	if token == "" {
		// The anonymous policy is not readable without a token; and Nomad
		// answers a lookup of no token with a 500.
		return nil, fmt.Errorf("%w: a gang that mounts volumes needs a Nomad ACL token allowed to mount them; none was given", ErrDenied)
	}
	q := &api.QueryOptions{AuthToken: token}
	self, _, err := c.anon.ACLTokens().Self(q)
	if err != nil {
		if e := denied(err, "the token was not found"); errors.Is(e, ErrDenied) {
			return nil, e
		}
		var re *RefusedError
		if e := refused(err); errors.As(e, &re) {
			return nil, fmt.Errorf("%w: the token was not found (%v)", ErrDenied, err)
		}
		return nil, fmt.Errorf("asking nomad about the token: %w", err)
	}
	if self.Type == "management" {
		return acl.ManagementACL, nil
	}
	names := append([]string(nil), self.Policies...)
	for _, link := range self.Roles {
		if link == nil {
			continue
		}
		role, _, err := c.anon.ACLRoles().Get(link.ID, q)
		if err != nil {
			return nil, fmt.Errorf("reading the token's role %s: %w", link.Name, refused(err))
		}
		for _, p := range role.Policies {
			if p != nil {
				names = append(names, p.Name)
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
			var re *RefusedError
			if e := refused(err); errors.As(e, &re) && re.Status == 404 {
				continue // Nomad skips a policy that no longer exists
			}
			return nil, fmt.Errorf("reading the token's policy %s: %w", name, refused(err))
		}
		parsed, err := acl.Parse(p.Rules)
		if err != nil {
			return nil, fmt.Errorf("reading the token's policy %s: %w", name, err)
		}
		policies = append(policies, parsed)
	}
	return acl.NewACL(false, policies)
}
