job "hello" {
  max_runtime = "1m"

  group "w" {
    count  = 3
    driver = "raw_exec"

    resources {
      cpu    = 50
      memory = 32
    }

    program {
      path = "/bin/sh"
      args = ["-c", "echo \"hello from rank $COHORT_RANK of $COHORT_SIZE in $COHORT_ADDRESS\"; echo to-stderr >&2"]
    }
  }
}
