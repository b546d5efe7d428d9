# The demo's main job: a distributed sort over twelve workers spread over
# the cluster's hosts (at most four on one), each a microVM restored from
# its node's template snapshot. Every worker generates 20,000 records
# (gensort's layout), sends each to the worker that owns its key range,
# sorts its range, and reports to rank 0, which checks the global order,
# the count and the checksum. @SORT@ is replaced by demo/run.sh with the
# path of the static sort program.
job "sort" {
  max_runtime  = "5m"
  gang_timeout = "2m"

  group "sort" {
    count        = 12
    max_per_node = 4

    resources {
      cpu    = 100
      memory = 128
    }

    program {
      path = "@SORT@"
      # The program gives up a minute before max_runtime, so a sort
      # that cannot finish says why instead of being stopped mute.
      args = ["-records", "20000", "-timeout", "4m"]
    }
  }
}
