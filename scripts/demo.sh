#!/usr/bin/env bash
# The main job: build Tsubame and run a 1 GiB, 2-vCPU VM whose guest runs a hot/cold workload at
# CPL3, with live progress, then print the memory digest (the determinism oracle).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q -p tsubame-tools
exec target/release/tsubame run --mem 1G --vcpus 2 \
    --workload hotcold:ws=512M,write=0.3,seed=7 --steps 10000000 --report-every 2500000 "$@"
