//go:build !cgo || !linux

package accel

import "fmt"

func openNVML() (NVML, error) {
	return nil, fmt.Errorf("%w: this plugin was built without cgo", ErrNoNVML)
}
