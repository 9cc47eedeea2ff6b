#!/usr/bin/env bash
# Installs what Tsubame needs on a fresh Debian machine: gcc and binutils (to build the built-in
# guest), QEMU (the peer the tests and benchmarks run the same guest on), util-linux tools the
# tests use, iproute2 (`ip`: the multi-host tests' network namespaces) and the DejaVu font the
# benchmark figures are labelled with. Idempotent: does nothing when everything is already
# there. The Rust toolchain is the machine's own (cargo fetches crates itself).
set -euo pipefail

need=()
command -v gcc >/dev/null || need+=(gcc)
command -v ld >/dev/null && command -v objcopy >/dev/null || need+=(binutils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v unshare >/dev/null && command -v setpriv >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2) # network namespaces joined by veth
[ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core) # figure text

if ((${#need[@]})); then
    echo "setup: installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is not on PATH; Tsubame needs a Rust toolchain (rustup) >= 1.85" >&2
    exit 1
fi
