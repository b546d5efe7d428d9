# A distributed sort: one coordinator and eight sorters that talk directly.
job "sort" {
  priority     = 60
  datacenters  = ["dc1"]
  node_pool    = "default"
  max_runtime  = "10m"
  gang_timeout = "45s"

  group "coordinator" {
    count   = 1
    address = "sort-coord"

    resources {
      cpu    = 500
      memory = 256
    }

    program {
      path = "/usr/local/bin/sort-coordinator"
      args = ["--input", "s3://bucket/in", "--output", "s3://bucket/out"]
      env  = { LOG_LEVEL = "info" }
    }

    port "rpc" {
      to = 7000
    }
  }

  group "sorter" {
    count          = 8
    distinct_hosts = true
    config         = { partitions = "64", "sort.buffer" = "32MiB" }

    resources {
      cpu    = 1000
      memory = 512

      device "nvidia/gpu" {
        count = 1
      }
    }

    program {
      artifact = "https://example.com/releases/sorter"
      args     = ["--coordinator", "w0.sort-coord.service.consul:7000"]
    }

    port "data" {
      to = 7001
    }
  }
}
