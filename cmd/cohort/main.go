// Command cohort is the cohort CLI and server.
package main

import (
	"fmt"
	"os"

	"github.com/cohort-dev/cohort/command"
	"github.com/cohort-dev/cohort/version"
	"github.com/mitchellh/cli"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	ui := command.BasicUI()
	c := cli.NewCLI("cohort", version.Version)
	c.Args = args
	c.Commands = command.Commands(ui)
	code, err := c.Run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "Error: %v\n", err)
		return command.ExitError
	}
	// mitchellh/cli answers an unknown command or bare "cohort" with its
	// help and 127; for cohort that is a usage error.
	if code == 127 {
		return command.ExitUsage
	}
	return code
}
