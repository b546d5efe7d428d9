package command

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"

	"github.com/cohort-dev/cohort/scheduler/snapshot"
)

// OperatorCommand saves and restores the server group's state and removes
// servers from it.
type OperatorCommand struct{ Meta }

const operatorHelp = `
Usage: cohort operator snapshot save [options] <file>
       cohort operator snapshot restore [options] <file>
       cohort operator snapshot inspect <file>
       cohort operator raft remove-peer [options] <server-id>

  snapshot save     Writes the server group's state (every job run, its
                    reservation, bill and deadline, the nodes' worker
                    subnets, the barrier key) to <file>, as the leader has
                    applied it. The file holds the group's barrier key:
                    keep it as you keep the servers' data directories.
  snapshot restore  Replaces the group's state with the one <file> holds,
                    on every server. The leader then reconciles it with
                    Nomad, which stays the truth of what runs: a gang
                    Nomad runs that the snapshot does not know is adopted,
                    a gang the snapshot holds as running that Nomad no
                    longer has ends; queued gangs queue again.
  snapshot inspect  Prints what <file> holds, checking its checksum,
                    without a server.
  raft remove-peer  Takes a server that is gone for good out of the Raft
                    group, so that it no longer counts toward the quorum.
                    A server that is only down needs nothing: it rejoins.

  Each needs a management token when Nomad's ACLs are on.

Options:
` + metaHelp + jsonHelp + `
`

func (c *OperatorCommand) Help() string { return operatorHelp }
func (c *OperatorCommand) Synopsis() string {
	return "Back up and restore the servers' state; remove a server"
}

func (c *OperatorCommand) Run(args []string) int {
	if len(args) < 2 {
		c.UI.Error("Error: expected \"snapshot save|restore|inspect\" or \"raft remove-peer\"\n\n" + strings.TrimSpace(operatorHelp))
		return ExitUsage
	}
	fs := c.FlagSet("operator", true)
	if ok, code := parse(c.UI, fs, args[2:], 1, operatorHelp); !ok {
		return code
	}
	arg := fs.Arg(0)
	switch args[0] + " " + args[1] {
	case "snapshot save":
		return c.save(arg)
	case "snapshot restore":
		return c.restore(arg)
	case "snapshot inspect":
		return c.inspect(arg)
	case "raft remove-peer":
		if err := c.Client().RemoveMember(arg); err != nil {
			c.UI.Error(fmt.Sprintf("Error removing %s: %v", arg, err))
			return ExitError
		}
		c.UI.Output(fmt.Sprintf("Removed server %s from the group", arg))
		return ExitOK
	}
	c.UI.Error(fmt.Sprintf("Error: unknown operator command %q\n\n%s", args[0]+" "+args[1], strings.TrimSpace(operatorHelp)))
	return ExitUsage
}

func interruptible() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt)
}

// save writes to a temporary file beside path and renames it once the
// whole snapshot has arrived and checks out, so a failed save never leaves
// a half file where a good one was.
func (c *OperatorCommand) save(path string) int {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".cohort-snapshot-*")
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error saving the snapshot: %v", err))
		return ExitError
	}
	defer os.Remove(tmp.Name())
	ctx, cancel := interruptible()
	defer cancel()
	err = c.Client().SnapshotSave(ctx, tmp)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	var h snapshot.Header
	if err == nil {
		h, err = readSnapshot(tmp.Name())
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		// The rename itself outlives a crash only once the directory is
		// synced.
		if d, derr := os.Open(filepath.Dir(path)); derr == nil {
			d.Sync()
			d.Close()
		}
	}
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error saving the snapshot: %v", err))
		return ExitError
	}
	if c.json {
		printJSON(c.UI, h)
		return ExitOK
	}
	c.UI.Output(fmt.Sprintf("Saved %s: index %d, %d job runs, %d bytes of state, from %s", path, h.Index, h.Jobs, h.Size, h.Server))
	return ExitOK
}

func readSnapshot(path string) (snapshot.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return snapshot.Header{}, err
	}
	defer f.Close()
	h, _, err := snapshot.Read(bufio.NewReader(f))
	return h, err
}

func (c *OperatorCommand) restore(path string) int {
	// Read once and checked here first, so a damaged file is refused
	// without a call; the same bytes are sent.
	b, err := os.ReadFile(path)
	if err == nil {
		_, _, err = snapshot.Read(bytes.NewReader(b))
	}
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error reading %s: %v", path, err))
		return ExitError
	}
	ctx, cancel := interruptible()
	defer cancel()
	h, err := c.Client().SnapshotRestore(ctx, bytes.NewReader(b))
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error restoring %s: %v", path, err))
		return ExitError
	}
	if c.json {
		printJSON(c.UI, h)
		return ExitOK
	}
	c.UI.Output(fmt.Sprintf("Restored %s: index %d, %d job runs, saved by %s at %s", path, h.Index, h.Jobs, h.Server, h.SavedAt.Format("2006-01-02T15:04:05Z07:00")))
	return ExitOK
}

func (c *OperatorCommand) inspect(path string) int {
	h, err := readSnapshot(path)
	if err != nil {
		c.UI.Error(fmt.Sprintf("Error reading %s: %v", path, err))
		return ExitError
	}
	if c.json {
		printJSON(c.UI, h)
		return ExitOK
	}
	c.UI.Output(fmt.Sprintf("Index    %d\nJobs     %d\nSize     %d\nSHA256   %s\nServer   %s\nSaved at %s", h.Index, h.Jobs, h.Size, h.SHA256, h.Server, h.SavedAt.Format("2006-01-02T15:04:05Z07:00")))
	return ExitOK
}
