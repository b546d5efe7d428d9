// Package scheduler is cohort's gang scheduler: all-or-nothing placement of
// cluster jobs on Nomad, replicated with Raft.
package scheduler
