package server

// The barrier task's program, served to Nomad clients. Gangs on drivers
// without a start barrier of their own (raw_exec, exec, docker, ...) get a
// prestart task in every group that reports the worker at the barrier and
// exits when the gang is released, so the main tasks of all workers start
// together. Its program, cohort-barrier, is static; Nomad's artifact
// fetcher downloads it from the registering server as a gzipped tar (an
// archive keeps its executable bit, a plain download does not) and checks
// its SHA-256, so nothing needs installing on the Nomad clients.

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"time"
)

// barrierTaskPath is where the archive is served.
const barrierTaskPath = "/v1/barrier-task/cohort-barrier.tar.gz"

// maxBarrierProgram bounds the program read at start-up.
const maxBarrierProgram = 64 << 20

type barrierArchive struct {
	data     []byte
	checksum string // "sha256:<hex>"
}

// loadBarrierArchive packs the program at path. The archive is the same
// bytes on every server given the same program (fixed times and owner),
// so every server's artifact has the same checksum.
func loadBarrierArchive(path string) (*barrierArchive, error) {
	prog, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading the barrier task program: %w", err)
	}
	if len(prog) > maxBarrierProgram || len(prog) < 4 || string(prog[:4]) != "\x7fELF" {
		return nil, fmt.Errorf("barrier task program %s is not an ELF executable under %d MiB", path, maxBarrierProgram>>20)
	}
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	zw.ModTime = time.Unix(0, 0)
	tw := tar.NewWriter(zw)
	hdr := &tar.Header{Name: "cohort-barrier", Mode: 0o755, Size: int64(len(prog)), ModTime: time.Unix(0, 0), Typeflag: tar.TypeReg, Format: tar.FormatUSTAR}
	if err := tw.WriteHeader(hdr); err != nil {
		return nil, err
	}
	if _, err := tw.Write(prog); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	sum := sha256.Sum256(buf.Bytes())
	return &barrierArchive{data: buf.Bytes(), checksum: "sha256:" + hex.EncodeToString(sum[:])}, nil
}

// handleBarrierTask serves the archive. It is public on purpose: the
// program is cohort's own, and the checksum in every job pins it.
func (s *Server) handleBarrierTask(w http.ResponseWriter, r *http.Request) {
	if s.barrierTask == nil {
		writeErr(w, http.StatusNotFound, fmt.Errorf("this server has no barrier task (start it with -barrier-task)"))
		return
	}
	w.Header().Set("Content-Type", "application/gzip")
	w.Header().Set("Content-Length", strconv.Itoa(len(s.barrierTask.data)))
	w.Write(s.barrierTask.data)
}
