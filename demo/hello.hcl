# The demo job until the microvm driver lands: four workers that each print
# who they are in the gang. Step by step this becomes the distributed sort.
job "demo" {
  max_runtime  = "2m"
  gang_timeout = "30s"

  group "worker" {
    count   = 4
    driver  = "raw_exec"
    address = "demo"

    resources {
      cpu    = 100
      memory = 64
    }

    program {
      path = "/bin/sh"
      args = ["-c", "echo \"worker $COHORT_RANK of $COHORT_SIZE, reachable as w$COHORT_RANK.$COHORT_ADDRESS.service.consul\""]
    }
  }
}
