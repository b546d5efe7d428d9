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
# Write each run's barrier token where only that gang's barrier tasks read
# it (nomad/jobs/<job>/<group>/cohort-barrier), and delete it after.
namespace "*" {
  capabilities = ["list-jobs", "read-job", "submit-job"]

  variables {
    path "nomad/jobs/*" {
      capabilities = ["write", "list", "destroy"]
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
