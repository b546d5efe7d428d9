// Command nomad-driver-microvm is the microvm task driver plugin; the Nomad
// agent starts it from its plugin_dir.
package main

import (
	"github.com/cohort-dev/cohort/driver"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/nomad/plugins"
)

func main() {
	plugins.Serve(func(log hclog.Logger) interface{} { return driver.New(log) })
}
