#!/usr/bin/env bash
# node.sh — make this host a cohort node: a Nomad client with cohort's
# microvm task driver and accelerator device plugin, beside a Consul agent.
#
# It checks what the driver needs of the host (QEMU, the tun device,
# nftables; KVM is used when it opens, QEMU's TCG otherwise), creates the
# agents' directories and writes their configuration:
#   $NOMAD_CONFIG_DIR/cohort-client.hcl    (default /etc/nomad.d)
#   $CONSUL_CONFIG_DIR/cohort-client.json  (default /etc/consul.d)
# It starts nothing: the agents run as systemd units (see install.sh), or
# as `cohort dev` runs them. Running it again rewrites the same files. It
# checks everything before it writes anything: a refusal leaves the host
# as it was.
#
# Required:
#   NODE_NAME          the node's name in Nomad and Consul
#   NODE_IP            its address on the cluster's network
#   NOMAD_SERVERS      Nomad servers' RPC addresses, comma separated
#   CONSUL_RETRY_JOIN  Consul servers' LAN serf addresses, comma separated
#   COHORT_SERVERS     cohort servers' API URLs, comma separated (with MICROVM=1)
# Optional (default):
#   NODE_INTERFACE     interface Nomad fingerprints (the one holding NODE_IP)
#   DATACENTER         (dc1)
#   NOMAD_DATA_DIR     (/var/lib/nomad)     CONSUL_DATA_DIR (/var/lib/consul)
#   PLUGIN_DIR         Nomad's plugin directory (/opt/cohort/plugins)
#   MICROVM            1 to configure the microvm driver (1)
#   COHORT_KERNEL      guest kernel (/var/lib/cohort/vmlinux)
#   COHORT_INIT        guest init (/var/lib/cohort/cohort-init)
#   COHORT_STATE_DIR   the driver's state: VMs, sockets, snapshots (/run/cohort)
#   WORKER_BRIDGE      the workers' bridge, or "none" for no network (cohort0)
#   WORKER_EGRESS      true to let workers reach outside the cluster (true)
#   WORKER_POOL        warm VMs the microvm driver keeps per shape (0: none)
#   WORKER_POOL_MEMORY_MB  their guest memory in all (1024); reserved from
#                      what the client offers Nomad when the pool is on
#   COHORT_CA_FILE, COHORT_CERT_FILE, COHORT_KEY_FILE
#                      the node's certificate for cohort's servers
#                      (`cohort tls cert create -node=$NODE_NAME`)
#   NOMAD_CA_FILE, NOMAD_CERT_FILE, NOMAD_KEY_FILE
#                      Nomad's client certificate: turns on Nomad's mTLS
#                      and ACLs, as every node of a secured cluster needs
#   ACCEL_SYSFS_ROOT   sysfs tree the device plugin reads (/sys)
#   ACCEL_FINGERPRINT_PERIOD (1m)
#   RAW_EXEC           1 to enable Nomad's raw_exec driver (0)
#   NOMAD_GC_MAX_ALLOCS (50)
#   CONSUL_HTTP_ADDR   the local Consul agent Nomad talks to (127.0.0.1:8500)
#   LOG_LEVEL          (INFO)
#   SKIP_HOST_CHECKS   1 to only write configuration (0)
#   FOREIGN_CONFIG     "keep" to allow configuration files cohort did not
#                      write in the agents' directories (refused otherwise)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

# --- check everything first ---------------------------------------------------
check_node
need NOMAD_SERVERS
need CONSUL_RETRY_JOIN
: "${MICROVM:=1}" "${RAW_EXEC:=0}" "${SKIP_HOST_CHECKS:=0}"
for v in MICROVM RAW_EXEC SKIP_HOST_CHECKS; do
  case ${!v} in 0|1) ;; *) die "$v must be 0 or 1: ${!v}" ;; esac
done
[ "$MICROVM" = 0 ] || need COHORT_SERVERS

: "${DATACENTER:=dc1}"
: "${NOMAD_CONFIG_DIR:=/etc/nomad.d}" "${CONSUL_CONFIG_DIR:=/etc/consul.d}"
: "${NOMAD_DATA_DIR:=/var/lib/nomad}" "${CONSUL_DATA_DIR:=/var/lib/consul}"
: "${PLUGIN_DIR:=/opt/cohort/plugins}"
: "${COHORT_KERNEL:=/var/lib/cohort/vmlinux}" "${COHORT_INIT:=/var/lib/cohort/cohort-init}"
: "${COHORT_STATE_DIR:=/run/cohort}"
: "${WORKER_BRIDGE:=cohort0}" "${WORKER_EGRESS:=true}"
: "${WORKER_POOL:=0}" "${WORKER_POOL_MEMORY_MB:=1024}"
: "${ACCEL_SYSFS_ROOT:=/sys}" "${ACCEL_FINGERPRINT_PERIOD:=1m}"
: "${NOMAD_GC_MAX_ALLOCS:=50}" "${CONSUL_HTTP_ADDR:=127.0.0.1:8500}" "${LOG_LEVEL:=INFO}"
plain NODE_NAME DATACENTER NOMAD_CONFIG_DIR CONSUL_CONFIG_DIR NOMAD_DATA_DIR CONSUL_DATA_DIR \
  PLUGIN_DIR COHORT_KERNEL COHORT_INIT COHORT_STATE_DIR WORKER_BRIDGE ACCEL_SYSFS_ROOT \
  ACCEL_FINGERPRINT_PERIOD CONSUL_HTTP_ADDR LOG_LEVEL NOMAD_SERVERS CONSUL_RETRY_JOIN \
  COHORT_SERVERS COHORT_CA_FILE COHORT_CERT_FILE COHORT_KEY_FILE \
  NOMAD_CA_FILE NOMAD_CERT_FILE NOMAD_KEY_FILE NODE_INTERFACE
case $WORKER_EGRESS in true|false) ;; *) die "WORKER_EGRESS must be true or false" ;; esac
[[ $NOMAD_GC_MAX_ALLOCS =~ ^[0-9]+$ ]] || die "NOMAD_GC_MAX_ALLOCS must be a number"
if ! [[ $WORKER_POOL =~ ^(0|[1-9][0-9]?)$ ]] || [ "$WORKER_POOL" -gt 64 ]; then
  die "WORKER_POOL must be a number from 0 to 64"
fi
if ! [[ $WORKER_POOL_MEMORY_MB =~ ^[1-9][0-9]*$ ]] || [ "$WORKER_POOL_MEMORY_MB" -lt 64 ]; then
  die "WORKER_POOL_MEMORY_MB must be a number of MiB, at least 64"
fi
if [ -n "${COHORT_CERT_FILE:-}" ]; then
  need COHORT_CA_FILE
  need COHORT_KEY_FILE
fi
nomad_tls_check
foreign_config "$NOMAD_CONFIG_DIR" "$CONSUL_CONFIG_DIR"

if [ -z "${NODE_INTERFACE:-}" ]; then
  # All of ip's output is read: an early exit would kill it with SIGPIPE.
  NODE_INTERFACE=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '{split($4, a, "/")} a[1] == ip && !found {print $2; found = 1}')
  [ -n "$NODE_INTERFACE" ] || die "no interface holds $NODE_IP; set NODE_IP to one of this host's addresses or give NODE_INTERFACE"
fi

if [ "$SKIP_HOST_CHECKS" != 1 ] && [ "$MICROVM" = 1 ]; then
  [ "$(id -u)" = 0 ] || die "run as root: the driver needs taps, bridges and nftables"
  command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 is missing (Debian: apt-get install qemu-system-x86)"
  command -v nft >/dev/null || die "nft is missing (Debian: apt-get install nftables)"
  [ -e /dev/net/tun ] || modprobe tun 2>/dev/null || true
  [ -e /dev/net/tun ] || die "/dev/net/tun is missing and the tun module does not load"
  modprobe vhost_net 2>/dev/null || true
  for f in "$COHORT_KERNEL" "$COHORT_INIT"; do
    [ -r "$f" ] || die "$f is missing: install cohort's guest kernel and init (install.sh)"
  done
  if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    echo "node.sh: /dev/kvm opens: workers run under KVM"
  else
    echo "node.sh: no usable /dev/kvm: workers run under QEMU's TCG (slower; nested virtualization or bare metal gives KVM)"
  fi
fi

# --- then write ----------------------------------------------------------------
mkdir -p "$NOMAD_CONFIG_DIR" "$CONSUL_CONFIG_DIR" "$NOMAD_DATA_DIR" "$CONSUL_DATA_DIR" "$PLUGIN_DIR"
chmod 0700 "$NOMAD_DATA_DIR" "$CONSUL_DATA_DIR"

stage "$CONSUL_CONFIG_DIR/cohort-client.json" <<JSON
{
  "datacenter": "$DATACENTER",
  "node_name": "$NODE_NAME",
  "data_dir": "$CONSUL_DATA_DIR",
  "bind_addr": "$NODE_IP",
  "advertise_addr": "$NODE_IP",
  "client_addr": "127.0.0.1",
  "retry_join": [$(quoted "$CONSUL_RETRY_JOIN")],
  "log_level": "$LOG_LEVEL",
  "disable_update_check": true,
  "ports": {"grpc": 8502, "grpc_tls": -1}
}
JSON

microvm=""
if [ "$MICROVM" = 1 ]; then
  network=""
  if [ "$WORKER_BRIDGE" != none ]; then
    network="
    network {
      bridge = \"$WORKER_BRIDGE\"
      egress = $WORKER_EGRESS
    }"
  fi
  tls=""
  if [ -n "${COHORT_CERT_FILE:-}" ]; then
    tls="
    tls {
      ca_file   = \"$COHORT_CA_FILE\"
      cert_file = \"$COHORT_CERT_FILE\"
      key_file  = \"$COHORT_KEY_FILE\"
    }"
  fi
  pool=""
  if [ "$WORKER_POOL" != 0 ]; then
    pool="
    pool {
      size      = $WORKER_POOL
      memory_mb = $WORKER_POOL_MEMORY_MB
    }"
  fi
  microvm="
plugin \"nomad-driver-microvm\" {
  config {
    kernel         = \"$COHORT_KERNEL\"
    init           = \"$COHORT_INIT\"
    state_dir      = \"$COHORT_STATE_DIR\"
    cohort_servers = [$(quoted "$COHORT_SERVERS")]$network$tls$pool
  }
}"
fi
# Waiting VMs hold memory Nomad cannot see: the client offers that much less.
reserved=""
if [ "$MICROVM" = 1 ] && [ "$WORKER_POOL" != 0 ]; then
  reserved="
  reserved {
    memory = $WORKER_POOL_MEMORY_MB
  }"
fi

rawexec=""
if [ "$RAW_EXEC" = 1 ]; then
  rawexec='
plugin "raw_exec" {
  config {
    enabled = true
  }
}'
fi

stage "$NOMAD_CONFIG_DIR/cohort-client.hcl" <<HCL
# Written by cohort's node.sh; run it again rather than editing this file.
name       = "$NODE_NAME"
datacenter = "$DATACENTER"
data_dir   = "$NOMAD_DATA_DIR"
plugin_dir = "$PLUGIN_DIR"
bind_addr  = "$NODE_IP"
log_level  = "$LOG_LEVEL"
disable_update_check = true

client {
  enabled           = true
  servers           = [$(quoted "$NOMAD_SERVERS")]
  network_interface = "$NODE_INTERFACE"
  gc_max_allocs     = $NOMAD_GC_MAX_ALLOCS$reserved
}

consul {
  address = "$CONSUL_HTTP_ADDR"
}
$rawexec$microvm

plugin "nomad-device-accel" {
  config {
    sysfs_root         = "$ACCEL_SYSFS_ROOT"
    fingerprint_period = "$ACCEL_FINGERPRINT_PERIOD"
  }
}
$(nomad_tls)
HCL
commit
echo "node.sh: $NODE_NAME configured: $NOMAD_CONFIG_DIR/cohort-client.hcl, $CONSUL_CONFIG_DIR/cohort-client.json"
