#!/usr/bin/env bash
# make demo: a three-host dev cluster, and on it the distributed sort: a
# twelve-worker gang submitted with `nomad job run` through cohort's
# Nomad-compatible endpoint, placed whole across the hosts, its workers
# finding each other by name. It prints how long the gang took to start,
# the sort's own figures and verdict, the Consul names of two workers, the
# teardown and the bill, and stops the cluster again.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cohort=$root/bin/cohort
nomad=${NOMAD_BIN:-$root/.tools/bin/nomad}
export COHORT_ADDR=http://127.0.0.1:4747 NOMAD_ADDR=http://127.0.0.1:4646

data=$(mktemp -d /tmp/cohort-demo-XXXXXX)
log=$data/dev.out
"$cohort" dev -nodes 3 -data-dir "$data/cluster" >"$log" 2>&1 &
dev=$!
cleanup() {
  if kill -TERM "$dev" 2>/dev/null; then wait "$dev" 2>/dev/null || true; fi
  rm -rf "$data"
}
trap cleanup EXIT

ms() { date +%s%3N; }

# cohort dev says it is ready only once a cohort leader takes jobs and
# every node has its worker subnet and its template snapshot.
echo "==> cohort dev -nodes 3 (waits for a cohort leader, each host's worker network and template snapshot)"
t0=$(ms)
for _ in $(seq 1 3300); do
  grep -q 'dev cluster is ready' "$log" && break
  kill -0 "$dev" 2>/dev/null || { cat "$log"; echo "demo: cohort dev exited before it was ready (log above)" >&2; exit 1; }
  sleep 0.1
done
grep -q 'dev cluster is ready' "$log" || { cat "$log"; echo "demo: the dev cluster was not ready in 330 s (log above)" >&2; exit 1; }
sed -n '/dev cluster is ready/,/Press Ctrl-C/p' "$log"
echo "(ready after $(( $(ms) - t0 )) ms)"

spec=$data/sort.hcl
sed "s#@SORT@#$root/bin/guest/demo-sort#" demo/sort.hcl >"$spec"
echo
echo "==> cohort validate sort.hcl && cohort plan sort.hcl > sort.nomad.hcl"
"$cohort" validate "$spec"
"$cohort" plan "$spec" >"$data/sort.nomad.hcl"
echo "==> NOMAD_ADDR=http://127.0.0.1:4749 nomad job run sort.nomad.hcl"
submitted=$(ms)
NOMAD_ADDR=http://127.0.0.1:4749 "$nomad" job run -detach "$data/sort.nomad.hcl"

status() { "$cohort" status -json sort 2>/dev/null | sed -n 's/^  "Status": "\(.*\)",$/\1/p'; }
st=""
for _ in $(seq 1 1800); do
  st=$(status)
  case "$st" in running|finished|failed) break ;; esac
  sleep 0.05
done
running=$(ms)
echo
echo "==> submit -> every worker running: $(( running - submitted )) ms (status: $st)"
echo "==> two workers' names, from Consul's DNS:"
for w in 0 11; do
  printf '  w%s.sort-sort.service.consul -> %s\n' "$w" "$(dig +short +time=1 @127.0.0.1 -p 8600 "w$w.sort-sort.service.consul" | tr '\n' ' ')"
done
for _ in $(seq 1 3000); do
  st=$(status)
  case "$st" in finished|failed) break ;; esac
  sleep 0.1
done
ended=$(ms)
"$cohort" status sort

echo
echo "==> where the workers ran"
"$nomad" job allocs -t '{{range .}}{{.NodeName}} {{end}}' sort | tr ' ' '\n' | sed '/^$/d' | sort | uniq -c
echo
echo "==> what the sort reported"
for id in $("$nomad" job allocs -t '{{range .}}{{.ID}} {{end}}' sort); do
  "$nomad" alloc logs "$id" worker
done | sort -t/ -k1,1 | sed -n '/^sort: /p; /^sort worker /p' | sort -k3 -n | sed 's/^/  /'
verdict=$(for id in $("$nomad" job allocs -t '{{range .}}{{.ID}} {{end}}' sort); do "$nomad" alloc logs "$id" worker; done | grep '^sort: ' || true)

echo
echo "==> teardown"
for _ in $(seq 1 300); do
  states=$("$nomad" job allocs -t '{{range .}}{{.ClientStatus}} {{end}}' sort 2>/dev/null || true)
  case "$states" in *pending*|*running*) sleep 0.05 ;; *) break ;; esac
done
echo "  every worker stopped $(( $(ms) - ended )) ms after the gang ended; nomad job: $("$nomad" job status -short sort | awk '/^Status/ {print $3}')"
echo
echo "==> cohort bill sort"
"$cohort" bill sort | tail -4
echo "  ..."

# explain prints what each worker said on stderr, for a sort that failed:
# a worker that waits for a peer says for whom every 30 s.
explain() {
  echo "==> the workers' stderr (last lines)" >&2
  for id in $("$nomad" job allocs -t '{{range .}}{{.ID}} {{end}}' sort); do
    echo "  -- allocation $id" >&2
    "$nomad" alloc logs -stderr "$id" worker 2>&1 | tail -n 15 | sed 's/^/  /' >&2
  done
}

# A verified sort whose workers did not all exit by themselves (the gang
# ended at max_runtime, say) is a failure too.
reason=$("$cohort" status -json sort 2>/dev/null | sed -n 's/^  "Reason": "\(.*\)",*$/\1/p')
if [ "$reason" != "every worker exited" ]; then
  explain
  echo "demo: the sort's gang ended with \"${reason:-?}\", not with every worker exiting" >&2
  exit 1
fi
case "$verdict" in
  *VERIFIED*) echo; echo "demo: the sort was verified in $(( ended - running )) ms of running" ;;
  *) explain; echo "demo: the sort was not verified: ${verdict:-no report from rank 0}" >&2; exit 1 ;;
esac
