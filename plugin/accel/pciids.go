package accel

import (
	"bufio"
	"fmt"
	"os"
	"strings"
)

// DefaultPCIIDs are where distributions install the PCI ID database
// (Debian's pci.ids package, hwdata elsewhere).
var DefaultPCIIDs = []string{"/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids", "/usr/share/pci.ids"}

// pciNames maps vendor and device IDs to the names in the PCI ID
// database. Only the vendors asked for are kept: the database is over a
// megabyte and a node has a handful of accelerators.
type pciNames struct {
	vendors map[uint16]string
	devices map[uint32]string // vendor<<16 | device
}

// loadPCINames reads the entries of the given vendors from the first
// database found in paths. No database is no error: names fall back to
// hex IDs.
func loadPCINames(paths []string, vendors map[uint16]bool) (*pciNames, string, error) {
	n := &pciNames{vendors: map[uint16]string{}, devices: map[uint32]string{}}
	for _, p := range paths {
		f, err := os.Open(p)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			return n, "", fmt.Errorf("opening the PCI ID database: %w", err)
		}
		defer f.Close()
		err = n.parse(bufio.NewScanner(f), vendors)
		return n, p, err
	}
	return n, "", nil
}

// parse reads the database's format: a vendor line is "vvvv  Name", its
// devices follow indented by one tab ("\tdddd  Name"), subsystems by two;
// lines after "C " start the class list, which is not needed.
func (n *pciNames) parse(sc *bufio.Scanner, vendors map[uint16]bool) error {
	sc.Buffer(make([]byte, 0, 1024), 64*1024)
	var cur uint16
	inVendor := false
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		if strings.HasPrefix(line, "C ") {
			break
		}
		if line[0] != '\t' {
			id, name, ok := idLine(line)
			inVendor = ok && vendors[uint16(id)]
			if inVendor {
				cur = uint16(id)
				n.vendors[cur] = name
			}
			continue
		}
		if !inVendor || strings.HasPrefix(line, "\t\t") {
			continue
		}
		if id, name, ok := idLine(line[1:]); ok {
			n.devices[uint32(cur)<<16|uint32(id)] = name
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading the PCI ID database: %w", err)
	}
	return nil
}

// idLine splits "10de  NVIDIA Corporation".
func idLine(s string) (uint64, string, bool) {
	if len(s) < 6 || s[4] != ' ' {
		return 0, "", false
	}
	var id uint64
	for _, c := range s[:4] {
		var v uint64
		switch {
		case c >= '0' && c <= '9':
			v = uint64(c - '0')
		case c >= 'a' && c <= 'f':
			v = uint64(c-'a') + 10
		case c >= 'A' && c <= 'F':
			v = uint64(c-'A') + 10
		default:
			return 0, "", false
		}
		id = id<<4 | v
	}
	return id, strings.TrimSpace(s[5:]), true
}

func (n *pciNames) vendor(v uint16) string {
	if n != nil {
		if s, ok := n.vendors[v]; ok {
			return s
		}
	}
	return ""
}

func (n *pciNames) device(v, d uint16) string {
	if n != nil {
		if s, ok := n.devices[uint32(v)<<16|uint32(d)]; ok {
			return s
		}
	}
	return ""
}
