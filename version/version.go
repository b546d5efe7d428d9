// Package version holds cohort's version, set at build time with
// -ldflags "-X github.com/cohort-dev/cohort/version.Version=...".
package version

// Version is cohort's release version.
var Version = "0.1.0-dev"
