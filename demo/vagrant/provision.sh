#!/usr/bin/env bash
# provision.sh — what Vagrant runs on each VM: the install guide's steps,
# with the files stage.sh put in /opt/cohort-stage.
set -euo pipefail
stage=/opt/cohort-stage
: "${NODE_NAME:?}" "${NODE_IP:?}" "${SERVER_IPS:?}"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends qemu-system-x86 nftables iproute2 dnsutils ca-certificates >/dev/null

# 1. Binaries, plugins, guest kernel and systemd units.
BIN_DIR=$stage/bin KERNEL=$stage/vmlinux NOMAD=$stage/nomad CONSUL=$stage/consul \
  bash "$stage/deploy/host/install.sh"

# 2. Certificates: the cluster's CA, this server's, this node's.
install -d -m 0700 /etc/cohort/tls
install -m 0644 "$stage/tls/cohort-agent-ca.pem" /etc/cohort/tls/ca.pem
install -m 0644 "$stage/tls/cohort-server.pem" /etc/cohort/tls/server.pem
install -m 0600 "$stage/tls/cohort-server-key.pem" /etc/cohort/tls/server-key.pem
install -m 0644 "$stage/tls/cohort-node-$NODE_NAME.pem" /etc/cohort/tls/node.pem
install -m 0600 "$stage/tls/cohort-node-$NODE_NAME-key.pem" /etc/cohort/tls/node-key.pem
install -m 0644 "$stage/tls/cohort-cli.pem" /etc/cohort/tls/cli.pem
install -m 0600 "$stage/tls/cohort-cli-key.pem" /etc/cohort/tls/cli-key.pem

# 3. A server: Consul, Nomad and cohort.
COHORT_CA_FILE=/etc/cohort/tls/ca.pem COHORT_CERT_FILE=/etc/cohort/tls/server.pem \
  COHORT_KEY_FILE=/etc/cohort/tls/server-key.pem \
  bash "$stage/deploy/host/server.sh"

# 4. A node: Nomad client with cohort's plugins.
servers="" cohort=""
IFS=, read -r -a ips <<<"$SERVER_IPS"
for ip in "${ips[@]}"; do
  servers+="${servers:+,}$ip:4647"
  cohort+="${cohort:+,}https://$ip:4747"
done
NOMAD_SERVERS=$servers CONSUL_RETRY_JOIN=$SERVER_IPS COHORT_SERVERS=$cohort \
  COHORT_CA_FILE=/etc/cohort/tls/ca.pem COHORT_CERT_FILE=/etc/cohort/tls/node.pem \
  COHORT_KEY_FILE=/etc/cohort/tls/node-key.pem \
  bash "$stage/deploy/host/node.sh"

# 5. The demo's program, where the demo job expects it on every node.
install -D -m 0755 "$stage/demo-sort" /opt/cohort-demo/demo-sort

# 6. Start the agents; restarted, so a provisioning run again applies a
# new build and configuration.
systemctl daemon-reload
systemctl enable consul nomad cohort
systemctl restart consul nomad cohort

# The CLI's defaults on this VM.
cat >/etc/profile.d/cohort.sh <<ENV
export COHORT_ADDR=https://$NODE_IP:4747 COHORT_CACERT=/etc/cohort/tls/ca.pem
export NOMAD_ADDR=http://$NODE_IP:4646
ENV
echo "provision.sh: $NODE_NAME is up: consul, nomad and cohort running"
