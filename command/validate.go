package command

import (
	"errors"
	"fmt"

	"github.com/cohort-dev/cohort/jobspec"
	"github.com/mitchellh/cli"
)

// ValidateCommand checks a cluster-job file.
type ValidateCommand struct{ UI cli.Ui }

const validateHelp = `
Usage: cohort validate [options] <file.hcl>

  Checks a cluster-job file and reports every problem with file:line:col.
  Exits 0 when the file is valid, 1 when it is not.

Options:

  -json   Print the result as JSON.
`

func (c *ValidateCommand) Help() string     { return validateHelp }
func (c *ValidateCommand) Synopsis() string { return "Check a cluster-job file" }

// Problem is one error in a job file, as printed by -json.
type Problem struct {
	File    string `json:"file,omitempty"`
	Line    int    `json:"line,omitempty"`
	Column  int    `json:"column,omitempty"`
	Summary string `json:"summary"`
	Detail  string `json:"detail,omitempty"`
}

func (c *ValidateCommand) Run(args []string) int {
	fs := flagSet("validate")
	asJSON := fs.Bool("json", false, "")
	if ok, code := parse(c.UI, fs, args, 1, validateHelp); !ok {
		return code
	}
	job, err := jobspec.ParseFile(fs.Arg(0))
	if err != nil {
		if *asJSON {
			printJSON(c.UI, map[string]any{"valid": false, "errors": problems(err)})
		} else {
			c.UI.Error(err.Error())
		}
		return ExitError
	}
	workers := 0
	for _, g := range job.Groups {
		workers += g.Count
	}
	if *asJSON {
		printJSON(c.UI, map[string]any{"valid": true, "job": job.Name, "groups": len(job.Groups), "workers": workers})
		return ExitOK
	}
	c.UI.Output(fmt.Sprintf("Job %q is valid: %d group(s), %d worker(s), max runtime %s.", job.Name, len(job.Groups), workers, job.MaxRuntime))
	return ExitOK
}

func problems(err error) []Problem {
	var diags jobspec.Diagnostics
	if !errors.As(err, &diags) {
		return []Problem{{Summary: err.Error()}}
	}
	out := make([]Problem, 0, len(diags))
	for _, d := range diags {
		p := Problem{Summary: d.Summary, Detail: d.Detail}
		if d.Subject != nil {
			p.File, p.Line, p.Column = d.Subject.Filename, d.Subject.Start.Line, d.Subject.Start.Column
		}
		out = append(out, p)
	}
	return out
}
