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
# writes its own files beside these, and the agents merge them.
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
#   NOMAD_TOKEN_FILE   file holding the Nomad token cohort's server uses
#                      (a management token, or one that may read nodes and
#                      submit jobs in the namespaces cohort serves)
#   NOMAD_HTTP_PORT (4646) NOMAD_RPC_PORT (4647) NOMAD_SERF_PORT (4648)
#   CONSUL_SERF_LAN_PORT (8301)
#   COHORT_HTTP_PORT (4747) COHORT_RAFT_PORT (4748)
#   COHORT_NOMAD_PORT  cohort's Nomad-compatible endpoint, for `nomad job
#                      run` through cohort (4749; "none" for none)
#   LOG_LEVEL          (INFO)
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
plain() {
  local name=$1 v=${!1:-}
  case $v in *[\"\\$'\n'\'\ ]*) die "$name must not hold quotes, backslashes, spaces or newlines: $v" ;; esac
}

need NODE_NAME
need NODE_IP
need SERVER_IPS
[[ $NODE_NAME =~ ^[A-Za-z0-9][A-Za-z0-9-]{0,62}$ ]] || die "NODE_NAME $NODE_NAME: letters, digits and dashes, at most 63"
isip "$NODE_IP" || die "NODE_IP $NODE_IP is not an IPv4 address"

: "${DATACENTER:=dc1}" "${LOG_LEVEL:=INFO}"
: "${NOMAD_CONFIG_DIR:=/etc/nomad.d}" "${CONSUL_CONFIG_DIR:=/etc/consul.d}" "${COHORT_CONFIG_DIR:=/etc/cohort}"
: "${NOMAD_DATA_DIR:=/var/lib/nomad}" "${CONSUL_DATA_DIR:=/var/lib/consul}" "${COHORT_DATA_DIR:=/var/lib/cohort/server}"
: "${NOMAD_HTTP_PORT:=4646}" "${NOMAD_RPC_PORT:=4647}" "${NOMAD_SERF_PORT:=4648}"
: "${CONSUL_SERF_LAN_PORT:=8301}" "${COHORT_HTTP_PORT:=4747}" "${COHORT_RAFT_PORT:=4748}" "${COHORT_NOMAD_PORT:=4749}"
for v in NODE_NAME DATACENTER LOG_LEVEL NOMAD_CONFIG_DIR CONSUL_CONFIG_DIR COHORT_CONFIG_DIR \
  NOMAD_DATA_DIR CONSUL_DATA_DIR COHORT_DATA_DIR COHORT_CA_FILE COHORT_CERT_FILE COHORT_KEY_FILE \
  NOMAD_CA_FILE NOMAD_CERT_FILE NOMAD_KEY_FILE NOMAD_TOKEN_FILE SERVER_IPS; do
  plain "$v"
done
for v in NOMAD_HTTP_PORT NOMAD_RPC_PORT NOMAD_SERF_PORT CONSUL_SERF_LAN_PORT COHORT_HTTP_PORT COHORT_RAFT_PORT; do
  [[ ${!v} =~ ^[0-9]{1,5}$ ]] || die "$v must be a port number"
done

IFS=, read -r -a servers <<<"${SERVER_IPS// /}"
for ip in "${servers[@]}"; do isip "$ip" || die "SERVER_IPS: $ip is not an IPv4 address"; done
expect=${#servers[@]}
case " ${servers[*]} " in *" $NODE_IP "*) ;; *) die "SERVER_IPS must include this server's NODE_IP $NODE_IP" ;; esac
if [ "$expect" -gt 1 ] && [ -z "${COHORT_CERT_FILE:-}" ]; then
  die "$expect servers need COHORT_CA_FILE, COHORT_CERT_FILE and COHORT_KEY_FILE: cohort's servers replicate over mTLS only"
fi

mkdir -p "$NOMAD_CONFIG_DIR" "$CONSUL_CONFIG_DIR" "$COHORT_CONFIG_DIR" "$NOMAD_DATA_DIR" "$CONSUL_DATA_DIR" "$COHORT_DATA_DIR"
chmod 0700 "$NOMAD_DATA_DIR" "$CONSUL_DATA_DIR" "$COHORT_DATA_DIR"

join=""
for ip in "${servers[@]}"; do join+="${join:+, }\"$ip:$CONSUL_SERF_LAN_PORT\""; done
cat >"$CONSUL_CONFIG_DIR/cohort-server.json" <<JSON
{
  "datacenter": "$DATACENTER",
  "node_name": "$NODE_NAME",
  "data_dir": "$CONSUL_DATA_DIR",
  "server": true,
  "bootstrap_expect": $expect,
  "bind_addr": "$NODE_IP",
  "advertise_addr": "$NODE_IP",
  "client_addr": "127.0.0.1 $NODE_IP",
  "retry_join": [$join],
  "ports": {"serf_lan": $CONSUL_SERF_LAN_PORT, "grpc": 8502, "grpc_tls": -1},
  "ui_config": {"enabled": true},
  "log_level": "$LOG_LEVEL",
  "disable_update_check": true
}
JSON

nomadtls=$(nomad_tls) scheme=http
[ -z "$nomadtls" ] || scheme=https

cat >"$NOMAD_CONFIG_DIR/cohort-server.hcl" <<HCL
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
    retry_join = [$(for ip in "${servers[@]}"; do printf '"%s:%s", ' "$ip" "$NOMAD_SERF_PORT"; done | sed 's/, $//')]
  }
}
$nomadtls
HCL

# cohort.service runs `cohort server $COHORT_SERVER_FLAGS`.
cscheme=http
flags="-node-id=$NODE_NAME -data-dir=$COHORT_DATA_DIR -http-addr=$NODE_IP:$COHORT_HTTP_PORT"
flags+=" -raft-addr=$NODE_IP:$COHORT_RAFT_PORT -bootstrap-expect=$expect"
if [ -n "${COHORT_CERT_FILE:-}" ]; then
  need COHORT_CA_FILE
  need COHORT_KEY_FILE
  cscheme=https
  flags+=" -ca-file=$COHORT_CA_FILE -cert-file=$COHORT_CERT_FILE -key-file=$COHORT_KEY_FILE"
fi
flags+=" -advertise=$cscheme://$NODE_IP:$COHORT_HTTP_PORT -nomad-addr=$scheme://$NODE_IP:$NOMAD_HTTP_PORT"
if [ "$COHORT_NOMAD_PORT" != none ]; then
  flags+=" -nomad-listen=$NODE_IP:$COHORT_NOMAD_PORT"
fi
for ip in "${servers[@]}"; do
  [ "$ip" = "$NODE_IP" ] || flags+=" -join=$cscheme://$ip:$COHORT_HTTP_PORT"
done
[ -n "${NOMAD_CA_FILE:-}" ] && flags+=" -nomad-ca-cert=$NOMAD_CA_FILE"
{
  echo "# Written by cohort's server.sh; run it again rather than editing this file."
  echo "COHORT_SERVER_FLAGS=\"$flags\""
  if [ -n "${NOMAD_TOKEN_FILE:-}" ]; then
    [ -r "$NOMAD_TOKEN_FILE" ] || die "NOMAD_TOKEN_FILE $NOMAD_TOKEN_FILE does not read"
    echo "NOMAD_TOKEN=$(tr -d '[:space:]' <"$NOMAD_TOKEN_FILE")"
  fi
} >"$COHORT_CONFIG_DIR/server.env"
chmod 0600 "$COHORT_CONFIG_DIR/server.env"
echo "server.sh: $NODE_NAME configured as one of $expect servers: $CONSUL_CONFIG_DIR/cohort-server.json, $NOMAD_CONFIG_DIR/cohort-server.hcl, $COHORT_CONFIG_DIR/server.env"
