job "sort" {
  max_runtime = "1m"

  group "sorter" {
    count = 0

    program {
      path = "/bin/sort"
    }
  }
}
