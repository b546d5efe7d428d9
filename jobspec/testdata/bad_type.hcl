job "sort" {
  max_runtime = "1m"

  group "sorter" {
    count = "many"

    program {
      path = "/bin/sort"
    }
  }
}
