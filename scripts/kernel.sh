#!/usr/bin/env bash
# Builds the guest kernel (an uncompressed vmlinux with a PVH entry) from
# Debian's linux-source-6.1 plus driver/guest/kernel/cohort.config. The
# result is cached under .tools/kernel by the hash of the fragment and the
# source tarball, so it is built once per machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${COHORT_TOOLS_DIR:-$root/.tools}/kernel
frag=$root/driver/guest/kernel/cohort.config
tarballs=(/usr/src/linux-source-6.1.tar.*)
tarball=${tarballs[0]}
[ -f "$tarball" ] || { echo "kernel: linux-source-6.1 is not installed (run make tools)" >&2; exit 1; }

hash=$( (cat "$frag"; stat -c '%s %Y' "$tarball") | sha256sum | cut -c1-16)
want=$out/vmlinux-$hash
if [ -f "$want" ]; then
  ln -sfn "vmlinux-$hash" "$out/vmlinux"
  exit 0
fi

echo "==> building the guest kernel ($hash), about 4 minutes on 2 cores" >&2
build=$out/build-$hash
rm -rf "$build"; mkdir -p "$build"
tar -xf "$tarball" -C "$build" --strip-components=1
cd "$build"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$frag" >/dev/null
make -s olddefconfig >/dev/null
# Every option of the fragment must have survived olddefconfig: a silently
# dropped dependency would give a kernel that cannot boot the init.
missing=0
while IFS= read -r line; do
  case "$line" in CONFIG_*=y) grep -qx "$line" .config || { echo "kernel: $line did not stick" >&2; missing=1; } ;; esac
done <"$frag"
[ $missing = 0 ] || exit 1
make -s -j"$(nproc)" vmlinux >/dev/null
cp vmlinux "$want.tmp"
mv "$want.tmp" "$want"
cd "$out"; rm -rf "$build"
ln -sfn "vmlinux-$hash" "$out/vmlinux"
echo "==> guest kernel: $out/vmlinux ($(du -h "$want" | cut -f1))" >&2
