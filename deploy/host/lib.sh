# lib.sh — what server.sh and node.sh share; sourced, not run.
# shellcheck shell=bash

# die stops the script with a reason; need stops it when a variable the
# script requires is empty.
die() { echo "$(basename "$0"): $*" >&2; exit 1; }
need() { [ -n "${!1:-}" ] || die "$1 is required (see the top of this script)"; }

# isip accepts a dotted IPv4 address, each part 0-255.
isip() {
  local IFS=. p
  [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || return 1
  for p in $1; do [ "$p" -le 255 ] || return 1; done
}

# check_node stops the script unless NODE_NAME and NODE_IP name this host
# as Nomad and Consul need: a DNS label, an IPv4 address.
check_node() {
  need NODE_NAME
  need NODE_IP
  [[ $NODE_NAME =~ ^[A-Za-z0-9][A-Za-z0-9-]{0,62}$ ]] || die "NODE_NAME $NODE_NAME: letters, digits and dashes, at most 63"
  isip "$NODE_IP" || die "NODE_IP $NODE_IP is not an IPv4 address"
}

isport() { [[ $1 =~ ^[0-9]{1,5}$ ]] && [ "$1" -ge 1 ] && [ "$1" -le 65535 ]; }

# plain refuses, for each variable named, a value that would need escaping
# in HCL, JSON or a systemd environment file.
plain() {
  local name v
  for name in "$@"; do
    v=${!name:-}
    case $v in *[\"\\\'\ $'\n\t']*) die "$name must not hold quotes, backslashes or whitespace: $v" ;; esac
  done
}

# split "a,b" into the array named by $2, without globbing.
split() {
  local -n split_into=$2
  # shellcheck disable=SC2034 # split_into names the caller's array
  IFS=, read -r -a split_into <<<"$1"
}

# quoted "a,b" -> "a", "b"
quoted() {
  local items=() x res=""
  split "$1" items
  for x in "${items[@]}"; do
    [ -n "$x" ] && res+="${res:+, }\"$x\""
  done
  printf '%s' "$res"
}

# nomad_tls_check stops the script when Nomad's TLS is asked for but not
# complete; nomad_tls prints the tls and acl blocks then: a secured
# cluster runs mTLS and ACLs on every agent, servers and clients alike.
nomad_tls_check() {
  [ -n "${NOMAD_CERT_FILE:-}" ] || return 0
  need NOMAD_CA_FILE
  need NOMAD_KEY_FILE
}
nomad_tls() {
  [ -n "${NOMAD_CERT_FILE:-}" ] || return 0
  cat <<HCL

tls {
  http                   = true
  rpc                    = true
  ca_file                = "$NOMAD_CA_FILE"
  cert_file              = "$NOMAD_CERT_FILE"
  key_file               = "$NOMAD_KEY_FILE"
  verify_server_hostname = true
  verify_https_client    = false
}

acl {
  enabled = true
}
HCL
}

# foreign_config stops the script when a configuration directory holds
# files cohort did not write: the agents read every file there, and a
# packaged default (Nomad's nomad.hcl runs a one-server cluster of its
# own) would override cohort's. FOREIGN_CONFIG=keep lets them be.
foreign_config() {
  local dir f
  [ "${FOREIGN_CONFIG:-}" = keep ] && return 0
  for dir in "$@"; do
    for f in "$dir"/*.hcl "$dir"/*.json; do
      [ -e "$f" ] || continue
      case $(basename "$f") in cohort-*) continue ;; esac
      die "$f is not cohort's: the agent would merge it with cohort's configuration (a packaged default overrides it); move it away, or set FOREIGN_CONFIG=keep"
    done
  done
}

# stage collects the files a script writes, and commit moves them into
# place only once everything was checked and written: a script that
# stops halfway leaves the host's configuration as it was.
staged=()
stage() {
  local dst=$1 mode=${2:-0644} tmp
  tmp=$(mktemp "$dst.XXXXXX")
  chmod "$mode" "$tmp"
  staged+=("$tmp" "$dst")
  cat >"$tmp"
}
commit() {
  local i
  for ((i = 0; i < ${#staged[@]}; i += 2)); do
    mv -f "${staged[i]}" "${staged[i + 1]}"
  done
  staged=()
}
discard() {
  local i
  for ((i = 0; i < ${#staged[@]}; i += 2)); do rm -f "${staged[i]}"; done
}
trap discard EXIT
