job "sleeper" {
  max_runtime = "10m"

  group "s" {
    count   = 2
    driver  = "raw_exec"
    address = "sleepers"

    resources {
      cpu    = 50
      memory = 32
    }

    program {
      path = "/bin/sleep"
      args = ["3600"]
    }
  }
}
