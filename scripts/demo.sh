#!/usr/bin/env bash
# The main job: build Tsubame, then migrate a running 1 GiB, 2-vCPU VM postcopy from one tsubame
# process to another on this machine, print what happened (downtime, pages on demand and
# pushed, fault latency), and check the memory digest against a run that never migrated.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p tsubame-tools
exec target/release/tsubame demo "$@"
