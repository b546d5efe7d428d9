#!/usr/bin/env bash
# make demo-vagrant: three Debian 12 VMs (Vagrant, libvirt or VirtualBox),
# each a server and a node, and on them the distributed sort: a
# twelve-worker gang placed whole across the VMs, its workers finding each
# other by name. `vagrant destroy -f` in demo/vagrant removes the VMs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
command -v vagrant >/dev/null || { echo "demo-vagrant: vagrant is missing (Debian: apt-get install vagrant vagrant-libvirt)" >&2; exit 1; }

echo "==> staging binaries, guest kernel and certificates"
bash stage.sh

echo "==> vagrant up (provider: ${VAGRANT_DEFAULT_PROVIDER:-the default})"
vagrant up

# on runs a command as root in a login shell on cohort-1, where the CLI's
# addresses and CA are set.
on() { vagrant ssh cohort-1 -c "sudo bash -lc $(printf '%q' "$*")"; }

echo "==> waiting for the cohort server group and three ready nodes"
for _ in $(seq 1 120); do
  if on 'cohort server members 2>/dev/null | grep -c true' | grep -q '^1'; then
    ready=$(on 'nomad node status 2>/dev/null | grep -c " ready "' || true)
    [ "${ready//[^0-9]/}" = 3 ] && break
  fi
  sleep 5
done
on 'cohort server members'
on 'nomad node status'

echo "==> cohort run sort.hcl"
on 'cohort run -detach /opt/cohort-stage/sort.hcl'
for _ in $(seq 1 360); do
  st=$(on 'cohort status -json sort' | sed -n 's/^  "Status": "\(.*\)",$/\1/p' | tr -d '\r')
  case "$st" in finished|failed) break ;; esac
  sleep 5
done
on 'cohort status sort'
echo "==> where the workers ran"
on 'nomad job allocs -t "{{range .}}{{.NodeName}} {{end}}" sort' | tr ' ' '\n' | sed '/^$/d' | sort | uniq -c
echo "==> what the sort reported"
on 'cohort logs sort' | grep -E 'sort: |sort worker ' || true
on 'cohort bill sort'
[ "$st" = finished ] || { echo "demo-vagrant: the sort ended $st" >&2; exit 1; }
