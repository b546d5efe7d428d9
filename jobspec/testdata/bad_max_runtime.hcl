job "sort" {
  max_runtime = "0s"

  group "sorter" {
    program {
      path = "/bin/sort"
    }
  }
}
