job "hello" {
  max_runtime = "30s"

  group "w" {
    count  = 2
    driver = "raw_exec"

    program {
      path = "/bin/echo"
      args = ["hello from a worker"]
    }
  }
}
