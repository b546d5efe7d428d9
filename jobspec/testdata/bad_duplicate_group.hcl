job "sort" {
  max_runtime = "1m"

  group "sorter" {
    program {
      path = "/bin/sort"
    }
  }

  group "sorter" {
    count = 2
    program {
      path = "/bin/sort"
    }
  }
}
