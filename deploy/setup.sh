#!/usr/bin/env bash
# Installs what liftwire's local backbone and test suite need, and only what is missing.
#
#   nats-server       (Debian package, JetStream + MQTT)
#   PostgreSQL 15     (Debian packages; initdb/pg_ctl/postgres are used as private clusters)
#   mosquitto-clients (mosquitto_pub / mosquitto_sub for manual and integration tests)
#   s3s-fs 0.14.1     (S3-compatible server that verifies SigV4, via cargo install)
#
# With --bench, also what the MQTT benchmark compares against (nothing else needs it):
#
#   mosquitto         (Debian package; the pure-MQTT-broker baseline; its system service is not
#                      used, the benchmark starts its own instance)
#
# Idempotent: every step first checks whether the tool is already there and says what it does.
# Needs root (or sudo) only when a Debian package is missing.
set -euo pipefail

say() { printf '[setup] %s\n' "$*"; }

bench=0
for arg in "$@"; do
  case $arg in
    --bench) bench=1 ;;
    *) say "unknown argument $arg (usage: deploy/setup.sh [--bench])"; exit 2 ;;
  esac
done

S3S_FS_VERSION=0.14.1

pg_bin_dir() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [[ -x $d/initdb && -x $d/pg_ctl && -x $d/postgres ]] && { echo "$d"; return 0; }
  done
  return 1
}

missing_pkgs=()
command -v nats-server >/dev/null 2>&1 || missing_pkgs+=(nats-server)
pg_bin_dir >/dev/null || missing_pkgs+=(postgresql)
command -v psql >/dev/null 2>&1 || missing_pkgs+=(postgresql-client)
command -v mosquitto_pub >/dev/null 2>&1 || missing_pkgs+=(mosquitto-clients)
if ((bench)); then
  command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || missing_pkgs+=(mosquitto)
fi

if ((${#missing_pkgs[@]})); then
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { say "need root to install: ${missing_pkgs[*]}"; exit 1; }
    sudo=(sudo)
  fi
  say "installing Debian packages: ${missing_pkgs[*]}"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
  if [[ " ${missing_pkgs[*]} " == *" postgresql "* ]]; then
    # The Debian package creates and starts a system cluster on port 5432; liftwire runs its own
    # private clusters, so leave the system one alone but do not let it squat the default port.
    if command -v pg_lsclusters >/dev/null 2>&1 && pg_lsclusters -h 2>/dev/null | grep -q online; then
      say "note: Debian started its own PostgreSQL cluster; liftwire does not use it"
    fi
  fi
else
  say "Debian packages already present: nats-server, PostgreSQL, psql, mosquitto-clients"
fi

if command -v s3s-fs >/dev/null 2>&1 || [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs ]]; then
  say "s3s-fs already present"
else
  say "installing s3s-fs ${S3S_FS_VERSION} with cargo (about 3 minutes, once)"
  cargo install --locked --quiet "s3s-fs@${S3S_FS_VERSION}" --features binary
fi

say "ready: nats-server $(nats-server --version 2>/dev/null | awk '{print $2}'), PostgreSQL in $(pg_bin_dir), s3s-fs in $(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")"
