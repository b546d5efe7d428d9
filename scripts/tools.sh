#!/usr/bin/env bash
# Installs what cohort needs to build, test and demo on a Debian 12 machine:
# Debian packages, Nomad v1.6.3 (with the web UI) and Consul v1.16.2 built
# from the Go module proxy. Idempotent: with everything in place it only
# checks and exits in a few seconds.
#
# NOMAD_BIN / CONSUL_BIN point at binaries the user already has; then no
# build happens for that tool.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools=${COHORT_TOOLS_DIR:-$root/.tools}
bin=$tools/bin
mkdir -p "$bin"

NOMAD_VERSION=v1.6.3
# nomad/api at the commit of the v1.6.3 tag; the module's replace directive
# points at ./api, which a module-proxy copy cannot use.
NOMAD_API_VERSION=v0.0.0-20231030125810-e0497bff1437
CONSUL_VERSION=v1.16.2

log() { printf '==> %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------
packages=(qemu-system-x86 linux-source-6.1 bc bison flex libelf-dev libssl-dev
  iproute2 nftables dnsutils xz-utils make gcc curl ca-certificates pci.ids chromium
  shellcheck vagrant vagrant-libvirt)
missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${missing[*]} (run as root or install them)"; exit 1
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Nomad and Consul from the module proxy ----------------------------------
# build NAME MODULE VERSION OUT [fixup...]: copies the module out of the module
# cache (go install refuses modules with replace directives) and builds it.
build_from_proxy() {
  local name=$1 module=$2 version=$3 out=$4; shift 4
  local stamp="$tools/$name.stamp" want="$module@$version $*"
  if [ -x "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  log "building $name $version (a few minutes on 2 cores)"
  local dir
  dir=$(go mod download -json "$module@$version" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [ -n "$dir" ] || { log "could not download $module@$version"; exit 1; }
  local src="$tools/src/$name"
  rm -rf "$src"; mkdir -p "$tools/src"
  cp -r "$dir" "$src"; chmod -R u+w "$src"
  (
    cd "$src"
    "$@"
    # BUILD_FLAGS is a list of flags: split on purpose.
    # shellcheck disable=SC2086
    go build -trimpath -o "$out.tmp" $BUILD_FLAGS .
  )
  mv "$out.tmp" "$out"
  rm -rf "$src"
  echo "$want" >"$stamp"
}

nomad_fixup() {
  go mod edit -dropreplace=github.com/hashicorp/nomad/api
  go mod edit -require=github.com/hashicorp/nomad/api@$NOMAD_API_VERSION
  go mod download github.com/hashicorp/nomad/api
}
consul_fixup() {
  # Consul's go.mod points its api/sdk/proto-public submodules at ./api etc.;
  # those directories are part of the module zip, so the replaces still work.
  :
}

if [ -n "${NOMAD_BIN:-}" ]; then
  [ "$NOMAD_BIN" -ef "$bin/nomad" ] || ln -sf "$NOMAD_BIN" "$bin/nomad"
else
  BUILD_FLAGS="-tags ui" build_from_proxy nomad github.com/hashicorp/nomad $NOMAD_VERSION "$bin/nomad" nomad_fixup
fi
if [ -n "${CONSUL_BIN:-}" ]; then
  [ "$CONSUL_BIN" -ef "$bin/consul" ] || ln -sf "$CONSUL_BIN" "$bin/consul"
else
  BUILD_FLAGS="" build_from_proxy consul github.com/hashicorp/consul $CONSUL_VERSION "$bin/consul" consul_fixup
fi

# sed reads all of its input: head would exit early and, under pipefail,
# turn the tool's SIGPIPE into a failure of this script.
"$bin/nomad" version | sed -n 1p >&2
"$bin/consul" version | sed -n 1p >&2
