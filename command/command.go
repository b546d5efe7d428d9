// Package command implements the cohort CLI's subcommands.
//
// Exit codes follow one rule across commands: 0 success, 1 the operation
// failed or its input was invalid (a bad spec, an unreachable server), 2 the
// command line itself was wrong (unknown flag, missing argument).
package command

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	"github.com/mitchellh/cli"
)

// Exit codes.
const (
	ExitOK    = 0
	ExitError = 1
	ExitUsage = 2
)

// Commands returns the CLI's command table.
func Commands(ui cli.Ui) map[string]cli.CommandFactory {
	return map[string]cli.CommandFactory{
		"validate": func() (cli.Command, error) { return &ValidateCommand{UI: ui}, nil },
		"plan":     func() (cli.Command, error) { return &PlanCommand{UI: ui}, nil },
		"dev":      func() (cli.Command, error) { return &DevCommand{UI: ui}, nil },
		"server":   func() (cli.Command, error) { return &ServerCommand{UI: ui}, nil },
		"run":      func() (cli.Command, error) { return &RunCommand{Meta{UI: ui}}, nil },
		"status":   func() (cli.Command, error) { return &StatusCommand{Meta{UI: ui}}, nil },
		"bill":     func() (cli.Command, error) { return &BillCommand{Meta{UI: ui}}, nil },
		"stop":     func() (cli.Command, error) { return &StopCommand{Meta{UI: ui}}, nil },
		"queue":    func() (cli.Command, error) { return &QueueCommand{Meta{UI: ui}}, nil },
		"logs":     func() (cli.Command, error) { return &LogsCommand{Meta{UI: ui}}, nil },
		"tls":      func() (cli.Command, error) { return &TLSCommand{UI: ui}, nil },
		"operator": func() (cli.Command, error) { return &OperatorCommand{Meta{UI: ui}}, nil },
	}
}

// flagSet returns a quiet FlagSet: parse reports its errors, with the
// command's help, exactly once.
func flagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {} // parse prints the help itself
	return fs
}

// parse parses args and reports whether the command should go on; when it
// should not, code is the exit code.
func parse(ui cli.Ui, fs *flag.FlagSet, args []string, nargs int, help string) (ok bool, code int) {
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			ui.Output(strings.TrimSpace(help))
			return false, ExitOK
		}
		ui.Error(fmt.Sprintf("Error: %v\n\n%s", err, strings.TrimSpace(help)))
		return false, ExitUsage
	}
	if fs.NArg() != nargs {
		ui.Error(fmt.Sprintf("Error: this command takes %d argument(s), got %d\n\n%s", nargs, fs.NArg(), strings.TrimSpace(help)))
		return false, ExitUsage
	}
	return true, ExitOK
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func printJSON(ui cli.Ui, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		ui.Error(fmt.Sprintf("Error encoding JSON: %v", err))
		return
	}
	ui.Output(string(b))
}

// BasicUI is the terminal UI the cohort binary uses.
func BasicUI() cli.Ui {
	return &cli.BasicUi{Reader: os.Stdin, Writer: os.Stdout, ErrorWriter: os.Stderr}
}
