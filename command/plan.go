package command

import (
	"strings"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/mitchellh/cli"
)

// PlanCommand prints the Nomad job a cluster-job file becomes.
type PlanCommand struct{ UI cli.Ui }

const planHelp = `
Usage: cohort plan [options] <file.hcl>

  Prints the Nomad job that runs a cluster-job file. The default output is
  a Nomad jobspec that "nomad job run" accepts as it is; -json prints the
  job in Nomad's API JSON form ({"Job": ...}), which "nomad job run -json"
  and the /v1/jobs endpoint accept.

Options:

  -json   Print the job as JSON.
`

func (c *PlanCommand) Help() string     { return planHelp }
func (c *PlanCommand) Synopsis() string { return "Show the Nomad job for a cluster-job file" }

func (c *PlanCommand) Run(args []string) int {
	fs := flagSet("plan")
	asJSON := fs.Bool("json", false, "")
	if ok, code := parse(c.UI, fs, args, 1, planHelp); !ok {
		return code
	}
	job, err := jobspec.ParseFile(fs.Arg(0))
	if err != nil {
		c.UI.Error(err.Error())
		return ExitError
	}
	nj := jobspec.ToNomad(job)
	if *asJSON {
		printJSON(c.UI, map[string]any{"Job": nj})
		return ExitOK
	}
	c.UI.Output(strings.TrimRight(string(jobspec.FormatNomadHCL(nj)), "\n"))
	return ExitOK
}
