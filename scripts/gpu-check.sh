#!/usr/bin/env bash
# gpu-check.sh: fingerprint this machine's accelerators once with
# nomad-device-accel and print the result beside nvidia-smi's own view,
# then check that every GPU nvidia-smi lists was found with its UUID.
#
# It runs on a GPU machine with binaries built elsewhere (make build; the
# plugin needs cgo for NVML, which it loads at run time):
#
#   scp bin/plugins/nomad-device-accel scripts/gpu-check.sh gpu-host:
#   ssh gpu-host ./gpu-check.sh ./nomad-device-accel
#
# It takes seconds; every step is bounded so the whole stays under two
# minutes. Exit status: 0 when both views agree, 1 when they do not, 2
# when the plugin binary is missing.
set -euo pipefail

bin=${1:-bin/plugins/nomad-device-accel}
if [ ! -x "$bin" ]; then
  echo "gpu-check: $bin is not an executable; build it with make build and copy it here" >&2
  exit 2
fi

echo "== host"
uname -srm
echo "IOMMU groups: $(find /sys/kernel/iommu_groups -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)"

echo
echo "== nomad-device-accel -fingerprint"
fp=$(timeout 60 "$bin" -fingerprint 2>&1) || { echo "$fp"; echo "gpu-check: the fingerprint failed" >&2; exit 1; }
echo "$fp"

echo
echo "== nvidia-smi --query-gpu"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "nvidia-smi is not installed: nothing to compare with"
  exit 0
fi
q=index,uuid,name,pci.bus_id,memory.total,power.limit,clocks.max.sm,clocks.max.mem,pcie.link.gen.max,pcie.link.width.max,driver_version,mig.mode.current
smi=$(timeout 30 nvidia-smi --query-gpu=$q --format=csv)
echo "$smi"

echo
echo "== cross-check"
status=0
while IFS=, read -r _ uuid name _; do
  uuid=${uuid# }
  name=${name# }
  if grep -q -- "$uuid" <<<"$fp"; then
    echo "ok: $uuid ($name) is fingerprinted"
  else
    echo "MISSING: $uuid ($name) is not in the fingerprint"
    status=1
  fi
done < <(tail -n +2 <<<"$smi")
exit "$status"
