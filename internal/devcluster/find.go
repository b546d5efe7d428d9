package devcluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// FindBinary locates nomad or consul: $NOMAD_BIN / $CONSUL_BIN first, then
// the .tools/bin that `make tools` fills (searched upwards from the
// executable and from the working directory, so both bin/cohort and go test
// find it), then $PATH.
func FindBinary(name string) (string, error) {
	if p := os.Getenv(strings.ToUpper(name) + "_BIN"); p != "" {
		return p, nil
	}
	if p := FindUp(filepath.Join(".tools", "bin", name)); p != "" {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("%s not found: run `make tools`, or set %s_BIN", name, strings.ToUpper(name))
}

// FindUp looks for rel in the directories above the executable and above
// the working directory, nearest first.
func FindUp(rel string) string {
	var starts []string
	if exe, err := os.Executable(); err == nil {
		starts = append(starts, filepath.Dir(exe))
	}
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	for _, dir := range starts {
		for d := dir; ; d = filepath.Dir(d) {
			p := filepath.Join(d, rel)
			if st, err := os.Stat(p); err == nil && !st.IsDir() {
				return p
			}
			if d == filepath.Dir(d) {
				break
			}
		}
	}
	return ""
}
