package jobspec

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden .err files under testdata/")

func TestParseFull(t *testing.T) {
	job, err := ParseFile("testdata/full.hcl")
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if job.Name != "sort" || job.Priority != 60 || job.NodePool != "default" {
		t.Errorf("job header = %q/%d/%q", job.Name, job.Priority, job.NodePool)
	}
	if job.MaxRuntime != 10*time.Minute || job.GangTimeout != 45*time.Second {
		t.Errorf("durations = %v, %v", job.MaxRuntime, job.GangTimeout)
	}
	if len(job.Groups) != 2 {
		t.Fatalf("groups = %d, want 2", len(job.Groups))
	}
	coord, sorter := job.Groups[0], job.Groups[1]
	if coord.Address != "sort-coord" || coord.Count != 1 || coord.Driver != DriverMicroVM {
		t.Errorf("coordinator = %+v", coord)
	}
	if want := (Program{
		Path: "/usr/local/bin/sort-coordinator",
		Args: []string{"--input", "s3://bucket/in", "--output", "s3://bucket/out"},
		Env:  map[string]string{"LOG_LEVEL": "info"},
	}); !reflect.DeepEqual(coord.Program, want) {
		t.Errorf("coordinator program = %+v, want %+v", coord.Program, want)
	}
	if sorter.Address != "sort-sorter" {
		t.Errorf("default address = %q, want sort-sorter", sorter.Address)
	}
	if !sorter.DistinctHosts || sorter.Count != 8 {
		t.Errorf("sorter = %+v", sorter)
	}
	if want := (Resources{CPU: 1000, MemoryMB: 512, Devices: []Device{{Name: "nvidia/gpu", Count: 1}}}); !reflect.DeepEqual(sorter.Resources, want) {
		t.Errorf("sorter resources = %+v", sorter.Resources)
	}
	if sorter.Program.Path != "local/sorter" || sorter.Program.Artifact == "" {
		t.Errorf("artifact program = %+v", sorter.Program)
	}
	if sorter.Config["sort.buffer"] != "32MiB" {
		t.Errorf("config = %v", sorter.Config)
	}
	if !reflect.DeepEqual(sorter.Ports, []Port{{Label: "data", To: 7001}}) {
		t.Errorf("ports = %+v", sorter.Ports)
	}
}

func TestParseDefaults(t *testing.T) {
	job, err := ParseFile("testdata/minimal.hcl")
	if err != nil {
		t.Fatal(err)
	}
	if job.Priority != DefaultPriority || job.GangTimeout != DefaultGangTimeout ||
		!reflect.DeepEqual(job.Datacenters, []string{"*"}) {
		t.Errorf("defaults not applied: %+v", job)
	}
	g := job.Groups[0]
	if g.Resources.CPU != DefaultCPU || g.Resources.MemoryMB != DefaultMemoryMB || g.Address != "hello-w" {
		t.Errorf("group defaults not applied: %+v", g)
	}
}

// TestBadSpecs checks every testdata/bad_*.hcl against its golden .err file:
// the exact message a user sees, position included.
func TestBadSpecs(t *testing.T) {
	files, _ := filepath.Glob("testdata/bad_*.hcl")
	if len(files) < 5 {
		t.Fatalf("found %d bad specs, want at least 5", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			_, err := ParseFile(f)
			if err == nil {
				t.Fatal("parse succeeded, want an error")
			}
			var diags Diagnostics
			if !errors.As(err, &diags) {
				t.Fatalf("error %T is not Diagnostics: %v", err, err)
			}
			for _, d := range diags {
				if d.Subject == nil {
					t.Errorf("diagnostic without a position: %s", d.Summary)
				}
			}
			golden := strings.TrimSuffix(f, ".hcl") + ".err"
			if *update {
				os.WriteFile(golden, []byte(err.Error()+"\n"), 0o644)
			}
			want, rerr := os.ReadFile(golden)
			if rerr != nil {
				t.Fatalf("golden: %v (run go test -update)", rerr)
			}
			if got := err.Error() + "\n"; got != string(want) {
				t.Errorf("error =\n%s\nwant\n%s", got, want)
			}
		})
	}
}

func TestParseErrorsInline(t *testing.T) {
	cases := []struct {
		name, src, want string
	}{
		{"no job", ``, "Missing job block"},
		{"two jobs", `job "a" {
  max_runtime = "1s"
}
job "b" {
  max_runtime = "1s"
}`, "x.hcl:4:1: Duplicate job block"},
		{"no group", `job "a" { max_runtime = "1s" }`, "Missing group"},
		{"no program", `job "a" {
  max_runtime = "1s"
  group "g" {}
}`, `x.hcl:3:3: Missing program: group "g" needs a program`},
		{"priority", `job "a" {
  priority = 101
  max_runtime = "1s"
  group "g" {
    program {
      path = "x"
    }
  }
}`, "x.hcl:2:14: Invalid priority"},
		{"negative runtime", `job "a" {
  max_runtime = "-5s"
  group "g" {
    program {
      path = "x"
    }
  }
}`, "x.hcl:2:17: Invalid max_runtime: max_runtime must be greater than zero"},
		{"bad duration", `job "a" {
  max_runtime = "ten minutes"
  group "g" {
    program {
      path = "x"
    }
  }
}`, `x.hcl:2:17: Invalid max_runtime: max_runtime must be a duration such as "90s" or "10m"`},
		{"missing runtime", `job "a" {
  group "g" {
    program {
      path = "x"
    }
  }
}`, `Missing required argument: The argument "max_runtime" is required`},
		{"driver", `job "a" {
  max_runtime = "1s"
  group "g" {
    driver = "docker"
    program {
      path = "x"
    }
  }
}`, "x.hcl:4:14: Unsupported driver"},
		{"device count", `job "a" {
  max_runtime = "1s"
  group "g" {
    resources {
      device "nvidia/gpu" {
        count = 0
      }
    }
    program {
      path = "x"
    }
  }
}`, "x.hcl:6:17: Invalid device count"},
		{"address", `job "a" {
  max_runtime = "1s"
  group "g" {
    address = "not_a_label"
    program {
      path = "x"
    }
  }
}`, "x.hcl:4:15: Invalid address"},
		{"duplicate address", `job "a" {
  max_runtime = "1s"
  group "g" {
    address = "x"
    program {
      path = "x"
    }
  }
  group "h" {
    address = "x"
    program {
      path = "x"
    }
  }
}`, "x.hcl:9:3: Duplicate address"},
		{"env name", `job "a" {
  max_runtime = "1s"
  group "g" {
    program {
      path = "x"
      env = { "1BAD" = "v" }
    }
  }
}`, "x.hcl:6:13: Invalid environment variable name"},
		{"variables", `job "a" {
  max_runtime = var.x
  group "g" {
    program {
      path = "x"
    }
  }
}`, "x.hcl:2:17: Variables not allowed"},
		{"fractional", `job "a" {
  max_runtime = "1s"
  group "g" {
    count = 1.5
    program {
      path = "x"
    }
  }
}`, "x.hcl:4:13: Invalid count: count must be a whole number"},
		{"artifact", `job "a" {
  max_runtime = "1s"
  group "g" {
    program {
      artifact = "not a url"
    }
  }
}`, "x.hcl:5:18: Invalid artifact"},
		{"port", `job "a" {
  max_runtime = "1s"
  group "g" {
    program {
      path = "x"
    }
    port "http" {
      to = 70000
    }
  }
}`, "x.hcl:8:12: Invalid port"},
		{"device constraint operator", `job "a" {
  max_runtime = "1s"
  group "g" {
    program {
      path = "x"
    }
    resources {
      device "nvidia/gpu" {
        constraint {
          attribute = "memory"
          operator  = "set_contains"
          value     = "x"
        }
      }
    }
  }
}`, "x.hcl:11:23: Invalid device constraint"},
		{"device constraint attribute", `job "a" {
  max_runtime = "1s"
  group "g" {
    program {
      path = "x"
    }
    resources {
      device "nvidia/gpu" {
        constraint {
          attribute = "${node.class}"
          value     = "x"
        }
      }
    }
  }
}`, "x.hcl:10:23: Invalid device constraint"},
		{"device constraint value", `job "a" {
  max_runtime = "1s"
  group "g" {
    program {
      path = "x"
    }
    resources {
      device "nvidia/gpu" {
        constraint {
          attribute = "memory"
          operator  = ">="
        }
      }
    }
  }
}`, "x.hcl:9:9: Missing constraint value"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse("x.hcl", []byte(tc.src))
			if err == nil {
				t.Fatalf("parse succeeded, want error containing %q", tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %q\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

// TestParseCollectsAllErrors: one round of fixes, not one per error.
func TestParseCollectsAllErrors(t *testing.T) {
	_, err := Parse("x.hcl", []byte(`job "a" {
  max_runtime = "0s"
  group "g" {
    count = 0
    program {
      path = "x"
    }
  }
}`))
	if err == nil || len(err.(Diagnostics)) != 2 {
		t.Fatalf("want 2 diagnostics, got %v", err)
	}
}

// A device request names a model as NVML does, spaces and all, and
// constrains attributes with units; both reach Nomad's job unchanged.
func TestDeviceConstraintsParsed(t *testing.T) {
	spec, err := Parse("gpu.hcl", []byte(`job "gpu" {
  max_runtime = "1m"
  group "w" {
    count = 2
    program {
      path = "/bin/true"
    }
    resources {
      device "nvidia/gpu/H100 80GB HBM3" {
        count = 1
      }
      device "nvidia/gpu" {
        constraint {
          attribute = "memory"
          operator  = ">="
          value     = "40 GiB"
        }
        constraint {
          attribute = "${device.attr.mig_mode}"
          operator  = "is_not_set"
        }
      }
    }
  }
}`))
	if err != nil {
		t.Fatal(err)
	}
	devs := spec.Groups[0].Resources.Devices
	if len(devs) != 2 || devs[0].Name != "nvidia/gpu/H100 80GB HBM3" {
		t.Fatalf("devices = %+v", devs)
	}
	want := []DeviceConstraint{{"${device.attr.memory}", ">=", "40 GiB"}, {"${device.attr.mig_mode}", "is_not_set", ""}}
	if fmt.Sprint(devs[1].Constraints) != fmt.Sprint(want) {
		t.Errorf("constraints = %+v", devs[1].Constraints)
	}
	job := ToNomad(spec)
	rd := job.TaskGroups[0].Tasks[0].Resources.Devices[1]
	if len(rd.Constraints) != 2 || rd.Constraints[0].LTarget != "${device.attr.memory}" || rd.Constraints[0].Operand != ">=" || rd.Constraints[0].RTarget != "40 GiB" {
		t.Errorf("Nomad device = %+v", rd.Constraints[0])
	}
	if _, _, err := Normalize(job, nil); err != nil {
		t.Errorf("Normalize: %v", err)
	}
	hcl := FormatNomadHCL(job)
	if !strings.Contains(string(hcl), `operator  = ">="`) || !strings.Contains(string(hcl), `value     = "40 GiB"`) {
		t.Errorf("Nomad HCL lacks the constraint:\n%s", hcl)
	}
}
