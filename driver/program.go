package driver

import (
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

// programDirName is where a host program is placed inside the task's
// local/ directory, which the VM mounts at /local.
const programDirName = ".cohort"

// stageProgram makes the task's program available inside the VM and
// returns its path there. A host path (absolute) is copied into
// local/; a relative path names a file already in the task directory, such
// as a downloaded artifact. Either way it must be a static ELF executable:
// the VM has no shared libraries and no shell.
func stageProgram(program, taskDir, localDir string) (string, error) {
	if program == "" {
		return "", errors.New("program is empty")
	}
	var src, guest string
	if filepath.IsAbs(program) {
		src = program
	} else {
		clean := filepath.Clean(program)
		if strings.HasPrefix(clean, "..") {
			return "", fmt.Errorf("program %q points outside the task directory", program)
		}
		src = filepath.Join(taskDir, clean)
		guest = "/" + filepath.ToSlash(clean)
	}
	if err := checkStatic(src, program); err != nil {
		return "", err
	}
	if guest != "" {
		return guest, nil
	}
	dir := filepath.Join(localDir, programDirName)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("staging program: %w", err)
	}
	// A copy, never a hard link: the VM can write to local/, and must not
	// be able to change the host's binary through it.
	dst := filepath.Join(dir, filepath.Base(src))
	if err := copyFile(src, dst); err != nil {
		return "", fmt.Errorf("staging program %s: %w", program, err)
	}
	return "/local/" + programDirName + "/" + filepath.Base(src), nil
}

// checkStatic says, in words a user can act on, why path cannot run in a
// worker VM.
func checkStatic(path, name string) error {
	st, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("program %s does not exist on this node", name)
		}
		return fmt.Errorf("program %s: %w", name, err)
	}
	if st.IsDir() {
		return fmt.Errorf("program %s is a directory", name)
	}
	if st.Mode()&0o111 == 0 {
		return fmt.Errorf("program %s is not executable (mode %v)", name, st.Mode().Perm())
	}
	f, err := elf.Open(path)
	if err != nil {
		if errors.Is(err, os.ErrPermission) {
			return fmt.Errorf("program %s is not readable: %w", name, err)
		}
		return fmt.Errorf("program %s is not an ELF executable; a worker VM has no shell or interpreter, so scripts cannot run: %v", name, err)
	}
	defer f.Close()
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("program %s is built for %v/%v, the worker VM is x86-64", name, f.Class, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			interp, _ := io.ReadAll(p.Open())
			return fmt.Errorf("program %s is dynamically linked (it needs %s); a worker VM has no shared libraries: build it static (for Go, CGO_ENABLED=0)",
				name, strings.TrimRight(string(interp), "\x00"))
		}
	}
	return nil
}

func copyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
