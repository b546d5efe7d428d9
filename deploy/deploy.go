// Package deploy holds what installs cohort on hosts: install.sh (the
// binaries and systemd units), server.sh (a Consul, Nomad and cohort
// server), node.sh (a Nomad client with cohort's plugins beside a Consul
// agent) and the Nomad ACL policy of cohort's servers. The install guide,
// the Vagrant cluster and `cohort dev` all set hosts up with these same
// scripts; they are embedded so that a cohort binary carries the ones it
// was built with.
package deploy

import (
	"embed"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

//go:embed host/*.sh systemd/*.service nomad/*.hcl
var files embed.FS

// Script paths, relative to the directory WriteTo writes into.
const (
	Install = "host/install.sh"
	Server  = "host/server.sh"
	Node    = "host/node.sh"
)

// ServerPolicyName is the name the install guide and the dev cluster give
// ServerPolicy in Nomad.
const ServerPolicyName = "cohort-server"

// ServerPolicy is the Nomad ACL policy of cohort's servers
// (nomad/cohort-server.policy.hcl): the secured dev cluster runs its
// servers with a token of it, so the e2e tests show it is enough.
func ServerPolicy() string {
	b, err := files.ReadFile("nomad/cohort-server.policy.hcl")
	if err != nil {
		panic(err) // embedded at build time
	}
	return string(b)
}

// WriteTo writes the scripts and units into dir, keeping their layout
// (install.sh finds the units beside it), and returns dir.
func WriteTo(dir string) (string, error) {
	err := fs.WalkDir(files, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := files.ReadFile(p)
		if err != nil {
			return err
		}
		dst := filepath.Join(dir, p)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		mode := os.FileMode(0o644)
		if filepath.Ext(p) == ".sh" {
			mode = 0o755
		}
		return os.WriteFile(dst, b, mode)
	})
	if err != nil {
		return "", fmt.Errorf("writing cohort's host scripts to %s: %w", dir, err)
	}
	return dir, nil
}
