job "Sort_Job" {
  max_runtime = "1m"

  group "sorter" {
    program {
      path = "/bin/sort"
    }
  }
}
