#!/usr/bin/env bash
# Runs every check liftwire's CI runs: formatting, clippy (warnings are errors), and the whole
# test suite against real nats-server, PostgreSQL and S3 servers (installed by setup.sh if missing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

deploy/setup.sh
echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] cargo test"
cargo test --workspace --locked
