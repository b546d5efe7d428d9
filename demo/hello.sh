#!/usr/bin/env bash
# make demo-hello: start a one-host dev cluster, run the hello job through
# Nomad, show what each worker printed, and stop the cluster again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cohort=$root/bin/cohort
nomad=${NOMAD_BIN:-$root/.tools/bin/nomad}

data=$(mktemp -d /tmp/cohort-demo-XXXXXX)
log=$data/dev.out
"$cohort" dev -data-dir "$data/cluster" >"$log" 2>&1 &
dev=$!
cleanup() {
  if kill -TERM "$dev" 2>/dev/null; then wait "$dev" 2>/dev/null || true; fi
  rm -rf "$data"
}
trap cleanup EXIT

# cohort dev says it is ready only once a cohort leader takes jobs and the
# node's template snapshot is built (so workers restore from it): a cold
# first run waits here as long as that takes, up to its -ready-timeout.
echo "==> starting the dev cluster (waits for a cohort leader and the node's template snapshot)"
for _ in $(seq 1 3300); do
  grep -q 'dev cluster is ready' "$log" && break
  kill -0 "$dev" 2>/dev/null || { cat "$log"; echo "demo: cohort dev exited before it was ready (log above)" >&2; exit 1; }
  sleep 0.1
done
grep -q 'dev cluster is ready' "$log" || { cat "$log"; echo "demo: the dev cluster was not ready in 330 s (log above)" >&2; exit 1; }
sed -n '/dev cluster is ready/,/Press Ctrl-C/p' "$log"

export NOMAD_ADDR=http://127.0.0.1:4646

spec=$data/demo.hcl
sed "s#@WORKER@#$root/bin/guest/demo-worker#" demo/hello.hcl >"$spec"
echo
echo "==> cohort validate demo.hcl"
"$cohort" validate "$spec"
echo "==> cohort plan demo.hcl > demo.nomad.hcl"
"$cohort" plan "$spec" >"$data/demo.nomad.hcl"
# nomad job run through cohort's Nomad-compatible endpoint: the gang meta
# sends it through gang admission; cohort registers it with Nomad whole.
echo "==> NOMAD_ADDR=http://127.0.0.1:4749 nomad job run demo.nomad.hcl"
NOMAD_ADDR=http://127.0.0.1:4749 "$nomad" job run "$data/demo.nomad.hcl"
echo
echo "==> waiting for the gang: cohort places it whole; each worker waits at the start barrier until all have booted"

for _ in $(seq 1 300); do
  states=$("$nomad" job allocs -t '{{range .}}{{.ClientStatus}} {{end}}' demo 2>/dev/null || true)
  case "$states" in *pending*|*running*|"") sleep 0.1 ;; *) break ;; esac
done
echo "allocation states: $states"
"$cohort" status demo

echo
echo "==> how each worker VM started"
for id in $("$nomad" job allocs -t '{{range .}}{{.ID}} {{end}}' demo); do
  "$nomad" alloc status "$id" | sed -n 's/.*\(Worker VM .*\|Released by the start barrier.*\)/\1/p' | tac | tr '\n' ' '; echo
done
echo
echo "==> what each worker printed"
for id in $("$nomad" job allocs -t '{{range .}}{{.ID}} {{end}}' demo); do
  "$nomad" alloc logs "$id" worker
done | sort
[ "$states" = "complete complete complete complete " ] || { echo "demo: workers did not all complete: $states" >&2; exit 1; }
