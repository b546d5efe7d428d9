# The Nomad ACL policy of cohort's servers: what they do with Nomad, and
# nothing more. Apply it and give the servers a client token of it:
#
#   nomad acl policy apply -description "cohort servers" cohort-server cohort-server.policy.hcl
#   nomad acl token create -name cohort-server -policy cohort-server
#
# What a caller may do is asked of Nomad with the caller's own token, its
# volume mounts judged on the policies that token holds; this one is only
# the servers' own.

# Register, read and stop the Nomad jobs of gangs, in every namespace the
# servers serve, and read their allocations (the Allocation event topic).
#
# Nomad checks a job's volume mounts (and CSI plugin tasks) when the job is
# registered, with the registering token: the servers'. So the servers may
# mount every volume, and cohort checks each caller's own right to mount
# the job's volumes before it admits the job, on the policies of the
# caller's token, as Nomad's registration would.
namespace "*" {
  capabilities = ["list-jobs", "read-job", "submit-job", "csi-mount-volume", "csi-register-plugin"]

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

# Host volumes and CSI volumes that gangs mount (see above).
host_volume "*" {
  policy = "write"
}

plugin {
  policy = "read"
}

# A gang's Nomad job names its node pool.
node_pool "*" {
  policy = "read"
}
