#!/usr/bin/env bash
# The full benchmark behind bench/README.md (about 25 minutes on a 2-core machine): the demand
# path, Tsubame and QEMU migrating a 1 GiB guest with 700 MiB written (3 repetitions, plain
# loopback and a 16 ms one-way link), and total time against guest size. Results and figures
# go to bench/results/ (per-run JSON) and bench/ (summaries and figures).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
t=target/release/tsubame
out=bench/results
mkdir -p "$out"
"$t" bench fault --json "$out/fault.json"
"$t" bench migrate --mem 1G --ws 700M --reps 3 --delays 0,16 --out "$out/main"
"$t" bench migrate --sizes 256M,1G,2G,4G,8G --configs postcopy-hot,hybrid-2,qemu-postcopy \
    --out "$out/sizes"
for f in "$out"/main/*.png "$out"/main/*.svg "$out"/sizes/total-vs-size.*; do
    cp "$f" bench/
done
cp "$out/main/summary.json" bench/summary-main.json
cp "$out/sizes/summary.json" bench/summary-sizes.json
cp "$out/fault.json" bench/fault.json
echo "bench: figures and summaries copied to bench/; update bench/README.md's tables from them"
