# The Nomad ACL policy of cohort's servers: what they do with Nomad, and
# nothing more. Apply it and give the servers a client token of it:
#
#   nomad acl policy apply -description "cohort servers" cohort-server cohort-server.policy.hcl
#   nomad acl token create -name cohort-server -policy cohort-server
#
# What a caller may do is always asked of Nomad with the caller's own token;
# this one is only the servers' own.

# Register, read and stop the Nomad jobs of gangs, in every namespace the
# servers serve, and read their allocations (the Allocation event topic).
#
# Gangs that mount host or CSI volumes are refused by Nomad under this
# policy (their registration fails with "Permission denied"). Granting the
# servers those mounts (host_volume "*" write, csi-mount-volume) would let
# every caller who may submit jobs mount any volume through cohort: cohort
# asks Nomad whether a caller may submit a job by planning it with the
# caller's token, and Nomad checks volume mounts only at registration.
namespace "*" {
  capabilities = ["list-jobs", "read-job", "submit-job"]

  # Each run's barrier token goes into the item cohort_barrier_token of the
  # job's own variable, nomad/jobs/<job>, which the job's tasks read with
  # their workload identities and a read-job token cannot; cohort leaves
  # the variable's other items alone and takes its item out when the run
  # ends.
  variables {
    path "nomad/jobs/*" {
      capabilities = ["read", "write", "destroy"]
    }
  }
}

# The inventory: nodes with their resources (the Node event topic).
node {
  policy = "read"
}

# A gang's Nomad job names its node pool.
node_pool "*" {
  policy = "read"
}
