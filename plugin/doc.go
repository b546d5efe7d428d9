// Package plugin holds Nomad plugin plumbing shared by cohort's plugins and
// the accelerator device plugin.
package plugin
