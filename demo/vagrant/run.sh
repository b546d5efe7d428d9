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

echo "==> vagrant up --provision (provider: ${VAGRANT_DEFAULT_PROVIDER:-the default})"
# --provision also brings running VMs up to date with a new build.
vagrant up --provision

# on runs a command as root in a login shell on cohort-1, where the CLI's
# addresses and CA are set; no terminal, so no carriage returns.
on() { vagrant ssh cohort-1 --no-tty -c "sudo bash -lc $(printf '%q' "$*")"; }
count() { grep -o "$1" | wc -l; }

echo "==> waiting for the cohort server group and three ready nodes"
ready=""
for _ in $(seq 1 120); do
  leaders=$(on 'cohort server members -json' 2>/dev/null | count '"Leader": true' || true)
  nodes=$(on 'nomad node status -json' 2>/dev/null | count '"Status": "ready"' || true)
  if [ "$leaders" = 1 ] && [ "$nodes" = 3 ]; then ready=1; break; fi
  sleep 5
done
[ -n "$ready" ] || { on 'cohort server members; nomad node status' || true; echo "demo-vagrant: no cohort leader and three ready nodes after 10 minutes" >&2; exit 1; }
on 'cohort server members'
on 'nomad node status'

echo "==> cohort run sort.hcl"
on 'cohort run -detach /opt/cohort-stage/sort.hcl'
st=""
for _ in $(seq 1 360); do
  st=$(on 'cohort status -json sort' 2>/dev/null | sed -n 's/^  "Status": "\(.*\)",$/\1/p' || true)
  case "$st" in finished|failed) break ;; esac
  sleep 5
done
on 'cohort status sort'
echo "==> where the workers ran"
on 'nomad job allocs -t "{{range .}}{{.NodeName}} {{end}}" sort' | tr ' ' '\n' | sed '/^$/d' | sort | uniq -c
echo "==> what the sort reported"
on 'cohort logs sort' | grep -E 'sort: |sort worker ' || true
on 'cohort bill sort'
[ "$st" = finished ] || { echo "demo-vagrant: the sort ended ${st:-nowhere within 30 minutes}" >&2; exit 1; }
