#!/usr/bin/env bash
# server.sh — make this host one of the cluster's servers: a Consul
# server, a Nomad server and a cohort server (gang scheduler).
#
# It creates their directories and writes their configuration:
#   $CONSUL_CONFIG_DIR/cohort-server.json  (default /etc/consul.d)
#   $NOMAD_CONFIG_DIR/cohort-server.hcl    (default /etc/nomad.d)
#   $COHORT_CONFIG_DIR/server.env          (default /etc/cohort): the
#       flags cohort.service passes to `cohort server`
# It starts nothing. A host may be a server and a node at once: node.sh
# writes its own files beside these, and the agents merge them. It checks
# everything before it writes anything: a refusal leaves the host as it
# was.
#
# Required:
#   NODE_NAME          this server's name (Consul, Nomad and cohort)
#   NODE_IP            its address on the cluster's network
#   SERVER_IPS         every server's address, comma separated (this one too)
# Optional (default):
#   DATACENTER         (dc1)
#   NOMAD_DATA_DIR     (/var/lib/nomad)   CONSUL_DATA_DIR (/var/lib/consul)
#   COHORT_DATA_DIR    cohort's Raft log and snapshots (/var/lib/cohort/server)
#   COHORT_CA_FILE, COHORT_CERT_FILE, COHORT_KEY_FILE
#                      cohort's CA and this server's certificate
#                      (`cohort tls cert create -server`); required with
#                      more than one server: a group talks over mTLS
#   NOMAD_CA_FILE, NOMAD_CERT_FILE, NOMAD_KEY_FILE
#                      Nomad's server certificate: turns on Nomad's mTLS
#                      and ACLs (then give cohort NOMAD_TOKEN, below)
#   NOMAD_TLS_SERVER_NAME  the name cohort checks on Nomad's certificate
#                      (server.global.nomad: every Nomad server's names it)
#   NOMAD_TOKEN_FILE   file holding the Nomad token cohort's server uses:
#                      a client token of deploy/nomad/cohort-server.policy.hcl
#                      (reads nodes; submits and reads jobs in every namespace)
#   NOMAD_HTTP_PORT (4646) NOMAD_RPC_PORT (4647) NOMAD_SERF_PORT (4648)
#   CONSUL_SERF_LAN_PORT (8301)
#   COHORT_HTTP_PORT (4747) COHORT_RAFT_PORT (4748)
#   COHORT_NOMAD_PORT  cohort's Nomad-compatible endpoint, for `nomad job
#                      run` through cohort (4749; "none" for none)
#   LOG_LEVEL          (INFO)
#   FOREIGN_CONFIG     "keep" to allow configuration files cohort did not
#                      write in the agents' directories (refused otherwise)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

# --- check everything first ---------------------------------------------------
check_node
need SERVER_IPS

: "${DATACENTER:=dc1}" "${LOG_LEVEL:=INFO}"
: "${NOMAD_CONFIG_DIR:=/etc/nomad.d}" "${CONSUL_CONFIG_DIR:=/etc/consul.d}" "${COHORT_CONFIG_DIR:=/etc/cohort}"
: "${NOMAD_DATA_DIR:=/var/lib/nomad}" "${CONSUL_DATA_DIR:=/var/lib/consul}" "${COHORT_DATA_DIR:=/var/lib/cohort/server}"
: "${NOMAD_HTTP_PORT:=4646}" "${NOMAD_RPC_PORT:=4647}" "${NOMAD_SERF_PORT:=4648}"
: "${CONSUL_SERF_LAN_PORT:=8301}" "${COHORT_HTTP_PORT:=4747}" "${COHORT_RAFT_PORT:=4748}" "${COHORT_NOMAD_PORT:=4749}"
: "${NOMAD_TLS_SERVER_NAME:=server.global.nomad}"
plain NODE_NAME DATACENTER LOG_LEVEL NOMAD_CONFIG_DIR CONSUL_CONFIG_DIR COHORT_CONFIG_DIR \
  NOMAD_DATA_DIR CONSUL_DATA_DIR COHORT_DATA_DIR COHORT_CA_FILE COHORT_CERT_FILE COHORT_KEY_FILE \
  NOMAD_CA_FILE NOMAD_CERT_FILE NOMAD_KEY_FILE NOMAD_TOKEN_FILE NOMAD_TLS_SERVER_NAME SERVER_IPS
for v in NOMAD_HTTP_PORT NOMAD_RPC_PORT NOMAD_SERF_PORT CONSUL_SERF_LAN_PORT COHORT_HTTP_PORT COHORT_RAFT_PORT; do
  isport "${!v}" || die "$v must be a port number: ${!v}"
done
[ "$COHORT_NOMAD_PORT" = none ] || isport "$COHORT_NOMAD_PORT" || die "COHORT_NOMAD_PORT must be a port number or none: $COHORT_NOMAD_PORT"

servers=()
split "$SERVER_IPS" servers
declare -A seen=()
for ip in "${servers[@]}"; do
  isip "$ip" || die "SERVER_IPS: $ip is not an IPv4 address"
  [ -z "${seen[$ip]:-}" ] || die "SERVER_IPS names $ip twice"
  seen[$ip]=1
done
expect=${#servers[@]}
[ -n "${seen[$NODE_IP]:-}" ] || die "SERVER_IPS must include this server's NODE_IP $NODE_IP"
if [ "$expect" -gt 1 ] && [ -z "${COHORT_CERT_FILE:-}" ]; then
  die "$expect servers need COHORT_CA_FILE, COHORT_CERT_FILE and COHORT_KEY_FILE: cohort's servers replicate over mTLS only"
fi
if [ -n "${COHORT_CERT_FILE:-}" ]; then
  need COHORT_CA_FILE
  need COHORT_KEY_FILE
fi
nomad_tls_check
token=""
if [ -n "${NOMAD_TOKEN_FILE:-}" ]; then
  [ -r "$NOMAD_TOKEN_FILE" ] || die "NOMAD_TOKEN_FILE $NOMAD_TOKEN_FILE does not read"
  token=$(tr -d '[:space:]' <"$NOMAD_TOKEN_FILE")
  [[ $token =~ ^[A-Za-z0-9-]+$ ]] || die "NOMAD_TOKEN_FILE $NOMAD_TOKEN_FILE does not hold a Nomad token (a Secret ID)"
fi
foreign_config "$NOMAD_CONFIG_DIR" "$CONSUL_CONFIG_DIR"

# --- then write ----------------------------------------------------------------
mkdir -p "$NOMAD_CONFIG_DIR" "$CONSUL_CONFIG_DIR" "$COHORT_CONFIG_DIR" "$NOMAD_DATA_DIR" "$CONSUL_DATA_DIR" "$COHORT_DATA_DIR"
chmod 0700 "$NOMAD_DATA_DIR" "$CONSUL_DATA_DIR" "$COHORT_DATA_DIR" "$COHORT_CONFIG_DIR"

join=""
for ip in "${servers[@]}"; do join+="${join:+, }\"$ip:$CONSUL_SERF_LAN_PORT\""; done
stage "$CONSUL_CONFIG_DIR/cohort-server.json" <<JSON
{
  "datacenter": "$DATACENTER",
  "node_name": "$NODE_NAME",
  "data_dir": "$CONSUL_DATA_DIR",
  "server": true,
  "bootstrap_expect": $expect,
  "bind_addr": "$NODE_IP",
  "advertise_addr": "$NODE_IP",
  "client_addr": "127.0.0.1",
  "retry_join": [$join],
  "ports": {"serf_lan": $CONSUL_SERF_LAN_PORT, "grpc": 8502, "grpc_tls": -1},
  "ui_config": {"enabled": true},
  "log_level": "$LOG_LEVEL",
  "disable_update_check": true
}
JSON

nomadjoin=""
for ip in "${servers[@]}"; do nomadjoin+="${nomadjoin:+, }\"$ip:$NOMAD_SERF_PORT\""; done
stage "$NOMAD_CONFIG_DIR/cohort-server.hcl" <<HCL
# Written by cohort's server.sh; run it again rather than editing this file.
name       = "$NODE_NAME"
datacenter = "$DATACENTER"
data_dir   = "$NOMAD_DATA_DIR"
bind_addr  = "0.0.0.0"
log_level  = "$LOG_LEVEL"
disable_update_check = true

ports {
  http = $NOMAD_HTTP_PORT
  rpc  = $NOMAD_RPC_PORT
  serf = $NOMAD_SERF_PORT
}

advertise {
  http = "$NODE_IP"
  rpc  = "$NODE_IP"
  serf = "$NODE_IP"
}

server {
  enabled          = true
  bootstrap_expect = $expect
  server_join {
    retry_join = [$nomadjoin]
  }
}
$(nomad_tls)
HCL

# cohort.service runs `cohort server $COHORT_SERVER_FLAGS`.
cscheme=http
flags="-node-id=$NODE_NAME -data-dir=$COHORT_DATA_DIR -http-addr=$NODE_IP:$COHORT_HTTP_PORT"
flags+=" -raft-addr=$NODE_IP:$COHORT_RAFT_PORT -bootstrap-expect=$expect"
if [ -n "${COHORT_CERT_FILE:-}" ]; then
  cscheme=https
  flags+=" -ca-file=$COHORT_CA_FILE -cert-file=$COHORT_CERT_FILE -key-file=$COHORT_KEY_FILE"
fi
nscheme=http
if [ -n "${NOMAD_CERT_FILE:-}" ]; then
  nscheme=https
  flags+=" -nomad-ca-cert=$NOMAD_CA_FILE -nomad-tls-server-name=$NOMAD_TLS_SERVER_NAME"
fi
flags+=" -advertise=$cscheme://$NODE_IP:$COHORT_HTTP_PORT -nomad-addr=$nscheme://$NODE_IP:$NOMAD_HTTP_PORT"
[ "$COHORT_NOMAD_PORT" = none ] || flags+=" -nomad-listen=$NODE_IP:$COHORT_NOMAD_PORT"
for ip in "${servers[@]}"; do
  [ "$ip" = "$NODE_IP" ] || flags+=" -join=$cscheme://$ip:$COHORT_HTTP_PORT"
done
stage "$COHORT_CONFIG_DIR/server.env" 0600 < <(
  echo "# Written by cohort's server.sh; run it again rather than editing this file."
  echo "COHORT_SERVER_FLAGS=\"$flags\""
  [ -z "$token" ] || echo "NOMAD_TOKEN=$token"
)
commit
echo "server.sh: $NODE_NAME configured as one of $expect servers: $CONSUL_CONFIG_DIR/cohort-server.json, $NOMAD_CONFIG_DIR/cohort-server.hcl, $COHORT_CONFIG_DIR/server.env"
