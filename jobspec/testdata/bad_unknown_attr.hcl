job "sort" {
  max_runtime = "1m"

  group "sorter" {
    count     = 4
    instances = 4

    program {
      path = "/bin/sort"
    }
  }
}
