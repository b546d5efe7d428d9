package nomad

// What a caller of cohort may do is what Nomad's ACLs let its token do:
// cohort asks Nomad with the caller's own token, through calls that need
// exactly the capability in question, so Nomad's policy engine (and its
// ACLs being off) decides, never a copy of it. Volume mounts, which no
// such call checks, are the exception: see mounts.go.

import (
	"errors"
	"fmt"
	"strings"

	"github.com/hashicorp/nomad/api"
)

// ErrDenied is a refusal by Nomad's ACLs.
var ErrDenied = errors.New("permission denied")

// denied turns Nomad's 403 into ErrDenied with what was missing.
func denied(err error, what string) error {
	var re *RefusedError
	if e := refused(err); errors.As(e, &re) && re.Status == 403 {
		return fmt.Errorf("%w: %s", ErrDenied, what)
	}
	return err
}

// CanSubmit asks Nomad to plan job with token: that needs the submit-job
// capability on the job's namespace (and the job to be one Nomad
// accepts).
func (c *Client) CanSubmit(token string, job *api.Job) error {
	_, _, err := c.anon.Jobs().Plan(job, false, &api.WriteOptions{Namespace: ns(deref(job.Namespace)), AuthToken: token})
	if err == nil {
		return nil
	}
	if e := denied(err, fmt.Sprintf("submitting or stopping a job in namespace %s needs the submit-job capability", ns(deref(job.Namespace)))); errors.Is(e, ErrDenied) {
		return e
	}
	return fmt.Errorf("asking nomad to plan %s: %w", deref(job.ID), refused(err))
}

// CanReadJob reads a job with token: that needs read-job on its
// namespace, whether or not the job exists in Nomad.
func (c *Client) CanReadJob(token, namespace string) error {
	_, _, err := c.anon.Jobs().Info("cohort-acl-probe", &api.QueryOptions{Namespace: ns(namespace), AuthToken: token})
	if err == nil {
		return nil
	}
	if e := denied(err, fmt.Sprintf("reading jobs in namespace %s needs the read-job capability", ns(namespace))); errors.Is(e, ErrDenied) {
		return e
	}
	var re *RefusedError
	if e := refused(err); errors.As(e, &re) && re.Status == 404 {
		return nil // allowed to look; there is no such job
	}
	return fmt.Errorf("asking nomad whether the token may read jobs: %w", err)
}

// CanReadNodes lists nodes with token: that needs node:read.
func (c *Client) CanReadNodes(token string) error {
	_, _, err := c.anon.Nodes().List(&api.QueryOptions{Prefix: "ffffffff", AuthToken: token})
	if err == nil {
		return nil
	}
	if e := denied(err, "reading nodes needs the node read capability"); errors.Is(e, ErrDenied) {
		return e
	}
	return fmt.Errorf("asking nomad whether the token may read nodes: %w", err)
}

// IsManagement says whether token is a management token. Callers ask
// only while Nomad's ACLs are on; with them off, any token Nomad is shown
// passes.
func (c *Client) IsManagement(token string) error {
	if token == "" {
		// Nomad answers a lookup of no token with a 500, not a refusal.
		return fmt.Errorf("%w: server membership and operator calls need a management token; none was given", ErrDenied)
	}
	t, _, err := c.anon.ACLTokens().Self(&api.QueryOptions{AuthToken: token})
	switch {
	case err != nil && strings.Contains(err.Error(), "ACL support disabled"):
		return nil
	case err != nil:
		if e := denied(err, "server membership and operator calls need a management token"); errors.Is(e, ErrDenied) {
			return e
		}
		if e := refused(err); errors.As(e, new(*RefusedError)) {
			return fmt.Errorf("%w: server membership and operator calls need a management token", ErrDenied)
		}
		return fmt.Errorf("asking nomad about the token: %w", err)
	case expired(t):
		// Nomad's self-lookup answers an expired token until it is
		// collected; Nomad itself refuses it.
		return fmt.Errorf("%w: server membership and operator calls need a management token; this one has expired", ErrDenied)
	case t.Type != "management":
		return fmt.Errorf("%w: server membership and operator calls need a management token; this one is a %s token", ErrDenied, t.Type)
	}
	return nil
}

// ACLsEnabled says whether Nomad enforces ACLs, asked with cohort's own
// token.
func (c *Client) ACLsEnabled() (bool, error) {
	_, _, err := c.api.ACLTokens().Self(nil)
	switch {
	case err == nil:
		return true, nil
	case strings.Contains(err.Error(), "ACL support disabled"):
		return false, nil
	}
	var re *RefusedError
	if e := refused(err); errors.As(e, &re) {
		return true, nil // a token Nomad refuses: ACLs are on
	}
	return false, err
}
