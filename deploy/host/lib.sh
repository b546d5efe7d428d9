# lib.sh — what server.sh and node.sh share; sourced, not run.
# shellcheck shell=bash

# die stops the script with a reason; need stops it when a variable the
# script requires is empty.
die() { echo "$(basename "$0"): $*" >&2; exit 1; }
need() { [ -n "${!1:-}" ] || die "$1 is required (see the top of this script)"; }
isip() { [[ $1 =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]]; }

# nomad_tls prints the tls and acl blocks of a Nomad agent when
# NOMAD_CERT_FILE is set: a secured cluster runs mTLS and ACLs on every
# agent, servers and clients alike.
nomad_tls() {
  [ -n "${NOMAD_CERT_FILE:-}" ] || return 0
  need NOMAD_CA_FILE
  need NOMAD_KEY_FILE
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
