#!/usr/bin/env bash
# install.sh — install cohort's binaries, its Nomad plugins, the guest
# kernel and init, Nomad and Consul, and systemd units for the three
# agents. Run it on every server and every node, then server.sh and/or
# node.sh, then start the units. It enables and starts nothing.
#
#   BIN_DIR        a `make build` output: cohort, cohort-barrier,
#                  plugins/, guest/ (default: bin/ of this repository)
#   KERNEL         the guest kernel (default: .tools/kernel/vmlinux)
#   NOMAD, CONSUL  the agents' binaries (default: .tools/bin/ of this
#                  repository; "skip" where they are installed already)
#   PREFIX         where binaries go (/usr/local): $PREFIX/bin
#   ETC            where configuration goes (/etc): units read
#                  $ETC/nomad.d, $ETC/consul.d and $ETC/cohort/server.env
#   PLUGIN_DIR     Nomad's plugin directory (/opt/cohort/plugins)
#   GUEST_DIR      guest kernel and init (/var/lib/cohort)
#   UNIT_DIR       systemd units (/etc/systemd/system; "skip" for none)
#   DESTDIR        a staging root every path above is put under ("")
set -euo pipefail

die() { echo "install.sh: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

: "${BIN_DIR:=$repo/bin}" "${KERNEL:=$repo/.tools/kernel/vmlinux}"
: "${NOMAD:=$repo/.tools/bin/nomad}" "${CONSUL:=$repo/.tools/bin/consul}"
: "${PREFIX:=/usr/local}" "${ETC:=/etc}" "${PLUGIN_DIR:=/opt/cohort/plugins}"
: "${GUEST_DIR:=/var/lib/cohort}" "${UNIT_DIR:=/etc/systemd/system}" "${DESTDIR:=}"
for v in PREFIX ETC PLUGIN_DIR GUEST_DIR; do
  case ${!v} in /*) ;; *) die "$v must be an absolute path: ${!v}" ;; esac
  case ${!v} in *[\ @\"\\]*) die "$v must not hold spaces, @, quotes or backslashes: ${!v}" ;; esac
done

for f in "$BIN_DIR/cohort" "$BIN_DIR/cohort-barrier" "$BIN_DIR/plugins/nomad-driver-microvm" \
  "$BIN_DIR/plugins/nomad-device-accel" "$BIN_DIR/guest/cohort-init" "$KERNEL"; do
  [ -r "$f" ] || die "$f is missing: run make build kernel first, or set BIN_DIR and KERNEL"
done

bindir=$DESTDIR$PREFIX/bin
install -d -m 0755 "$bindir" "$DESTDIR$PLUGIN_DIR" "$DESTDIR$GUEST_DIR" "$DESTDIR$ETC/nomad.d" "$DESTDIR$ETC/consul.d"
install -d -m 0700 "$DESTDIR$ETC/cohort"
install -m 0755 "$BIN_DIR/cohort" "$BIN_DIR/cohort-barrier" "$bindir/"
install -m 0755 "$BIN_DIR/plugins/nomad-driver-microvm" "$BIN_DIR/plugins/nomad-device-accel" "$DESTDIR$PLUGIN_DIR/"
install -m 0644 "$KERNEL" "$DESTDIR$GUEST_DIR/vmlinux"
install -m 0755 "$BIN_DIR/guest/cohort-init" "$DESTDIR$GUEST_DIR/cohort-init"
# Where each agent's binary is: installed here, or already on the PATH.
declare -A agent=([nomad]=$PREFIX/bin/nomad [consul]=$PREFIX/bin/consul)
for b in NOMAD CONSUL; do
  src=${!b} name=${b,,}
  if [ "$src" = skip ]; then
    agent[$name]=$(command -v "$name") || die "$b=skip, but no $name on the PATH"
    continue
  fi
  [ -x "$src" ] || die "$b: $src is missing: run make tools, or set $b=skip where it is installed"
  install -m 0755 "$src" "$bindir/"
done

if [ "$UNIT_DIR" != skip ]; then
  install -d -m 0755 "$DESTDIR$UNIT_DIR"
  for u in consul nomad cohort; do
    sed -e "s#@BINDIR@/nomad#${agent[nomad]}#g" -e "s#@BINDIR@/consul#${agent[consul]}#g" \
      -e "s#@BINDIR@#$PREFIX/bin#g" -e "s#@ETC@#$ETC#g" "$here/../systemd/$u.service" >"$DESTDIR$UNIT_DIR/$u.service"
    chmod 0644 "$DESTDIR$UNIT_DIR/$u.service"
  done
fi
units=", units in $UNIT_DIR"
[ "$UNIT_DIR" != skip ] || units=""
echo "install.sh: installed into ${DESTDIR:-/}: $PREFIX/bin/{cohort,cohort-barrier}, nomad at ${agent[nomad]}, consul at ${agent[consul]}, $PLUGIN_DIR, $GUEST_DIR$units"
