#!/usr/bin/env bash
# Runs the whole liftwire backbone locally: NATS (JetStream), PostgreSQL, an S3 server, and every
# liftwire component that exists, all under one data directory. Ctrl-C stops everything.
#
#   deploy/dev.sh                 data in ./.liftwire (override with LIFTWIRE_DATA=/some/dir)
#
# Infrastructure uses its default port (NATS 4222, PostgreSQL 5432, S3 8014) when free, else the
# next free one. Nothing is left running after Ctrl-C.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=${LIFTWIRE_DATA:-$repo/.liftwire}
mkdir -p "$data"
data=$(cd "$data" && pwd)
logs=$data/logs
mkdir -p "$logs"

say() { printf '[liftwire] %s\n' "$*"; }

"$repo/deploy/setup.sh"

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() {
  local port=$1
  while port_in_use "$port"; do port=$((port + 1)); done
  echo "$port"
}

# Every server runs in a session of its own (setsid; it does not fork here, so $! is the
# server): Ctrl-C then reaches this script alone, which stops the components first, each
# draining into the infrastructure, and the infrastructure last. Were they in the terminal's
# process group, all would get the SIGINT at once, and the stop order would mean nothing.
pids=()
stopped=0
cleanup() {
  ((stopped)) && return
  stopped=1
  say "stopping..."
  # Reverse start order: components drain into the infrastructure before it stops.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  say "stopped; data kept in $data (delete it to start from scratch)"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

wait_port() { # name port pid
  local i
  for ((i = 0; i < 300; i++)); do
    port_in_use "$2" && return 0
    kill -0 "$3" 2>/dev/null || { say "$1 exited; see $logs/$1.log"; tail -n 20 "$logs/$1.log" >&2; exit 1; }
    sleep 0.1
  done
  say "$1 did not open port $2; see $logs/$1.log"
  exit 1
}

# --- NATS with JetStream -------------------------------------------------------------------
nats_port=$(pick_port 4222)
nats_monitor=$(pick_port 8222)
mkdir -p "$data/nats"
cat > "$data/nats/nats.conf" <<CONF
server_name: liftwire_dev
listen: "127.0.0.1:$nats_port"
http: "127.0.0.1:$nats_monitor"
jetstream { store_dir: "$data/nats/jetstream" }
CONF
setsid nats-server --config "$data/nats/nats.conf" >"$logs/nats.log" 2>&1 &
pids+=($!)
wait_port nats "$nats_port" "${pids[-1]}"

# --- PostgreSQL (a private cluster; as the 'postgres' user when run as root) ----------------
pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
pg_port=$(pick_port 5432)
pg_dir=$data/postgres
as_pg=()
if [[ $(id -u) -eq 0 ]]; then
  pg_user=postgres
  id "$pg_user" >/dev/null 2>&1 || pg_user=nobody
  as_pg=(setpriv --reuid="$pg_user" --regid="$(id -g "$pg_user")" --init-groups)
  if ! "${as_pg[@]}" test -x "$data"; then
    # PostgreSQL refuses to run as root and its user cannot enter $data (e.g. under /root).
    pg_dir=/var/tmp/liftwire-dev-postgres-$(printf '%s' "$data" | sha256sum | cut -c1-12)
    say "note: $pg_user cannot enter $data; PostgreSQL data goes to $pg_dir"
  fi
  mkdir -p "$pg_dir"
  chown "$pg_user" "$pg_dir"
fi
mkdir -p "$pg_dir"
if [[ ! -f $pg_dir/data/PG_VERSION ]]; then
  say "creating the PostgreSQL cluster in $pg_dir/data"
  "${as_pg[@]}" "$pg_bin/initdb" --auth=trust --username=liftwire --encoding=UTF8 --locale=C -D "$pg_dir/data" >"$logs/initdb.log" 2>&1
fi
setsid "${as_pg[@]}" "$pg_bin/postgres" -D "$pg_dir/data" -p "$pg_port" -k "$pg_dir" \
  -c listen_addresses=127.0.0.1 >"$logs/postgres.log" 2>&1 &
pids+=($!)
wait_port postgres "$pg_port" "${pids[-1]}"
pg_url_admin="postgres://liftwire@127.0.0.1:$pg_port/postgres"
for ((i = 0; i < 100; i++)); do psql -q "$pg_url_admin" -c 'select 1' >/dev/null 2>&1 && break; sleep 0.1; done
# One database per owner: the gateway's device registry and the telemetry service's data.
for db in liftwire_gateway liftwire_telemetry; do
  psql -q "$pg_url_admin" -tc "select 1 from pg_database where datname = '$db'" | grep -q 1 \
    || psql -q "$pg_url_admin" -c "create database $db" >/dev/null
done
pg_gateway="postgres://liftwire@127.0.0.1:$pg_port/liftwire_gateway"
pg_telemetry="postgres://liftwire@127.0.0.1:$pg_port/liftwire_telemetry"

# --- S3 (s3s-fs) ---------------------------------------------------------------------------
s3_port=$(pick_port 8014)
s3_bin=$(command -v s3s-fs || echo "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs")
mkdir -p "$data/s3/liftwire-uploads"  # s3s-fs: a bucket is a directory
s3_access=liftwire-dev
s3_secret=liftwire-dev-secret
setsid "$s3_bin" --host 127.0.0.1 --port "$s3_port" --access-key "$s3_access" --secret-key "$s3_secret" \
  "$data/s3" >"$logs/s3.log" 2>&1 &
pids+=($!)
wait_port s3 "$s3_port" "${pids[-1]}"

# --- liftwire components -------------------------------------------------------------------
say "building liftwire (cargo build --bins)"
(cd "$repo" && cargo build --quiet --bins)
bin=${CARGO_TARGET_DIR:-$repo/target}/debug

export LIFTWIRE_GATEWAY__NATS__URL="nats://127.0.0.1:$nats_port"
export LIFTWIRE_GATEWAY__DATABASE__URL="$pg_gateway"
export LIFTWIRE_GATEWAY__UPLOADS__ENDPOINT="http://127.0.0.1:$s3_port"
export LIFTWIRE_GATEWAY__UPLOADS__BUCKET=liftwire-uploads
export LIFTWIRE_GATEWAY__UPLOADS__ACCESS_KEY="$s3_access"
export LIFTWIRE_GATEWAY__UPLOADS__SECRET_KEY="$s3_secret"
export LIFTWIRE_TELEMETRY__NATS__URL="nats://127.0.0.1:$nats_port"
export LIFTWIRE_API__NATS__URL="nats://127.0.0.1:$nats_port"
export LIFTWIRE_TELEMETRY__DATABASE__URL="$pg_telemetry"

"$bin/liftwire-gateway" migrate >"$logs/gateway-migrate.log" 2>&1
mqtt_port=$(pick_port 1883)
gateway_admin=$(pick_port 9101)
LIFTWIRE_GATEWAY__RUNTIME__ADMIN_LISTEN="127.0.0.1:$gateway_admin" LIFTWIRE_GATEWAY__MQTT__LISTEN="127.0.0.1:$mqtt_port" \
  setsid "$bin/liftwire-gateway" >"$logs/gateway.log" 2>&1 &
pids+=($!)
wait_port gateway "$mqtt_port" "${pids[-1]}"

"$bin/liftwire-telemetry" migrate >"$logs/telemetry-migrate.log" 2>&1
telemetry_admin=$(pick_port 9102)
LIFTWIRE_TELEMETRY__RUNTIME__ADMIN_LISTEN="127.0.0.1:$telemetry_admin" \
  setsid "$bin/liftwire-telemetry" >"$logs/telemetry.log" 2>&1 &
pids+=($!)
wait_port telemetry "$telemetry_admin" "${pids[-1]}"

api_port=$(pick_port 8080)
api_admin=$(pick_port 9103)
export LIFTWIRE_API__AUTH__HS256_SECRET=${LIFTWIRE_API__AUTH__HS256_SECRET:-liftwire-local-development-secret-0001}
LIFTWIRE_API__HTTP__LISTEN="127.0.0.1:$api_port" LIFTWIRE_API__RUNTIME__ADMIN_LISTEN="127.0.0.1:$api_admin" \
  setsid "$bin/liftwire-api" >"$logs/api.log" 2>&1 &
pids+=($!)
wait_port api "$api_port" "${pids[-1]}"
token=$("$bin/liftwire-api" mint-token --subject dev --role admin --ttl 8h)

# Simulated elevators and their screens (2 buildings x 2 elevators, 10x real time), provisioned in the registry,
# publishing over MQTT like real firmware; outboxes and secrets under $data/firmware-sim.
LIFTWIRE_FIRMWARE_SIM__MQTT__PORT=$mqtt_port LIFTWIRE_FIRMWARE_SIM__RUN__DATA_DIR="$data/firmware-sim" \
LIFTWIRE_FIRMWARE_SIM__RUN__SPEED=10 LIFTWIRE_FIRMWARE_SIM__REGISTRY__DATABASE_URL="$pg_gateway" LIFTWIRE_FIRMWARE_SIM__FLEET__ID_PREFIX=dev \
  setsid "$bin/liftwire-firmware-sim" run >"$logs/firmware-sim.log" 2>&1 &
pids+=($!)

# A demo device, so the commands printed below work as they are.
demo_secret=$("$bin/liftwire-gateway" provision --building demo --device demo-elev-1 2>/dev/null \
  || "$bin/liftwire-gateway" rotate --device demo-elev-1)

cat <<INFO

liftwire backbone is running (data: $data, logs: $logs)

  NATS + JetStream   nats://127.0.0.1:$nats_port      monitor http://127.0.0.1:$nats_monitor
  PostgreSQL         postgres://liftwire@127.0.0.1:$pg_port  (databases liftwire_gateway, liftwire_telemetry)
  S3 (s3s-fs)        http://127.0.0.1:$s3_port        access key $s3_access / secret $s3_secret, bucket liftwire-uploads
  gateway (MQTT)     mqtt://127.0.0.1:$mqtt_port       admin http://127.0.0.1:$gateway_admin/metrics  /healthz  /readyz
  telemetry          admin http://127.0.0.1:$telemetry_admin/metrics  /healthz  /readyz
  dashboard API      http://127.0.0.1:$api_port/api/v1   admin http://127.0.0.1:$api_admin/metrics
  firmware-sim       4 simulated elevators + 4 in-cabin screens (dev-b01, dev-b02), 10x real time; log $logs/firmware-sim.log

  An admin token for the API (8 h; mint others with: $bin/liftwire-api mint-token --help):
    curl -H "Authorization: Bearer $token" http://127.0.0.1:$api_port/api/v1/me
    curl -H "Authorization: Bearer $token" http://127.0.0.1:$api_port/api/v1/buildings/dev-b01/live

  Demo device demo-elev-1 in building demo (secret rotated at every start). Publish as it:
    $bin/liftwire-firmware-sim envelope --device demo-elev-1 --seq 1 > /tmp/liftwire-envelope.bin
    mosquitto_pub -h 127.0.0.1 -p $mqtt_port -i demo-elev-1 -u demo-elev-1 -P $demo_secret -q 1 \\
      -t lw/v1/demo/demo-elev-1/up/event -f /tmp/liftwire-envelope.bin
  and find it stored (use --seq 2, 3, ... for the next ones):
    psql $pg_telemetry -c 'select device_id, seq, kind from device_messages'
  Provision more devices:
    LIFTWIRE_GATEWAY__DATABASE__URL=$pg_gateway $bin/liftwire-gateway provision --building B --device D
  Uplink subjects: lw.v1.up.{building}.{device}.{kind} (stream LW_UPLINK); see ARCHITECTURE.md.
  Press Ctrl-C to stop everything.
INFO

# Block until Ctrl-C, or until a component dies (then stop the rest).
set +e
wait -n "${pids[@]}"
say "a component exited; see $logs"
exit 1
