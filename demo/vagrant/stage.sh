#!/usr/bin/env bash
# stage.sh — put together what the Vagrant VMs install, in ./stage (synced
# to /opt/cohort-stage on each): cohort's binaries and plugins, the guest
# kernel, Nomad and Consul, the host scripts, the demo's sort program, and
# certificates for the servers, each node and the CLI. The CA itself stays
# in ./pki, which is not synced: no VM holds its key. Certificates are
# made once and kept, so VMs provisioned again still trust each other;
# delete pki and stage/tls to start over.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
stage=$here/stage
nodes=(cohort-1 cohort-2 cohort-3)
ips=(192.168.56.11 192.168.56.12 192.168.56.13)

for f in bin/cohort bin/cohort-barrier bin/plugins/nomad-driver-microvm bin/plugins/nomad-device-accel \
  bin/guest/cohort-init bin/guest/demo-sort .tools/kernel/vmlinux .tools/bin/nomad .tools/bin/consul; do
  [ -e "$repo/$f" ] || { echo "stage.sh: $f is missing: run make tools kernel build first" >&2; exit 1; }
done

mkdir -p "$stage/bin/plugins" "$stage/bin/guest" "$stage/deploy" "$stage/tls"
cp "$repo/bin/cohort" "$repo/bin/cohort-barrier" "$stage/bin/"
cp "$repo/bin/plugins/nomad-driver-microvm" "$repo/bin/plugins/nomad-device-accel" "$stage/bin/plugins/"
cp "$repo/bin/guest/cohort-init" "$stage/bin/guest/"
cp "$repo/bin/guest/demo-sort" "$stage/demo-sort"
cp "$repo/.tools/kernel/vmlinux" "$stage/vmlinux"
cp "$repo/.tools/bin/nomad" "$repo/.tools/bin/consul" "$stage/"
rm -rf "$stage/deploy"
cp -r "$repo/deploy" "$stage/deploy"
sed 's#@SORT@#/opt/cohort-demo/demo-sort#' "$repo/demo/sort.hcl" >"$stage/sort.hcl"

cohort=$repo/bin/cohort
mkdir -p "$here/pki"
chmod 0700 "$here/pki"
cd "$here/pki"
if [ ! -e cohort-agent-ca.pem ]; then
  "$cohort" tls ca create -dir .
fi
if [ ! -e cohort-server.pem ]; then
  extra=()
  for ip in "${ips[@]}"; do extra+=("-additional-ipaddress=$ip"); done
  "$cohort" tls cert create -server -dir . "${extra[@]}"
fi
for n in "${nodes[@]}"; do
  [ -e "cohort-node-$n.pem" ] || "$cohort" tls cert create -node="$n" -dir .
done
[ -e cohort-cli.pem ] || "$cohort" tls cert create -cli -dir .
for f in *.pem; do
  case $f in cohort-agent-ca-key.pem) continue ;; esac
  cp "$f" "$stage/tls/"
done
echo "stage.sh: staged in $stage (the CA's key stays in $here/pki)"
