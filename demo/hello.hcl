# The demo job: four workers, each a microVM restored from the node's
# template snapshot, that report who and where they are. @WORKER@ is
# replaced by demo/run.sh with the path of the static demo worker.
job "demo" {
  max_runtime  = "2m"
  gang_timeout = "30s"

  group "worker" {
    count   = 4
    address = "demo"

    resources {
      cpu    = 100
      memory = 128
    }

    program {
      path = "@WORKER@"
    }
  }
}
