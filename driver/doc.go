// Package driver is the microvm Nomad task driver: each worker of a cluster
// job boots as a minimal Linux VM whose PID 1 is cohort's init.
package driver
