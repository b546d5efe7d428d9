job "sort" {
  max_runtime = "1m"

  group "sorter" {
    resources {
      memory = 16
    }

    program {
      path = "/bin/sort"
    }
  }
}
