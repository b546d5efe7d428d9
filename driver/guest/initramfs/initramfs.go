// Package initramfs packs the guest init into a gzip-compressed cpio
// (newc) archive, the only root file system a worker VM has.
package initramfs

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"strings"

	"github.com/cohort-dev/cohort/driver/guest/proto"
)

// Dirs created in the guest's root; /alloc, /local and /secrets are where
// the task's directories are mounted.
var Dirs = []string{"dev", "proc", "sys", "tmp", "run", "etc", "alloc", "local", "secrets"}

// Module is a kernel module to pack: its file name in proto.ModulesDir (which
// sets the load order) and its contents.
type Module struct {
	Name string
	Data []byte
}

// Build returns the archive: the init as /init, the directories above,
// /dev/console, which the kernel opens for the init's stdio before any
// devtmpfs is mounted, and the modules, if any.
func Build(init []byte, modules ...Module) ([]byte, error) {
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return nil, err
	}
	w := &writer{w: zw, ino: 1}
	for _, d := range Dirs {
		w.entry(d, 0o040755, 0, 0, nil)
	}
	w.entry("dev/console", 0o020600, 5, 1, nil)
	w.entry("init", 0o100755, 0, 0, init)
	if len(modules) > 0 {
		w.entry(proto.ModulesDir, 0o040755, 0, 0, nil)
		for _, m := range modules {
			if m.Name == "" || strings.ContainsAny(m.Name, "/\x00") {
				return nil, fmt.Errorf("module name %q is not a file name", m.Name)
			}
			w.entry(proto.ModulesDir+"/"+m.Name, 0o100644, 0, 0, m.Data)
		}
	}
	w.entry("TRAILER!!!", 0, 0, 0, nil)
	if w.err != nil {
		return nil, fmt.Errorf("writing initramfs: %w", w.err)
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

type writer struct {
	w   io.Writer
	n   int64
	ino int
	err error
}

func (w *writer) write(b []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(b)
	w.n += int64(n)
	w.err = err
}

func (w *writer) pad() {
	if r := w.n % 4; r != 0 {
		w.write(make([]byte, 4-r))
	}
}

// entry writes one newc header, name and body, each padded to 4 bytes.
func (w *writer) entry(name string, mode uint32, rmajor, rminor int, data []byte) {
	nlink := 1
	if mode&0o170000 == 0o040000 {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		w.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmajor, rminor, len(name)+1, 0)
	w.ino++
	w.write([]byte(hdr))
	w.write(append([]byte(name), 0))
	w.pad()
	w.write(data)
	w.pad()
}
