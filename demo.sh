#!/usr/bin/env bash
# The main job: set up, build, boot test guests on 4 vCPUs, and reclaim guest memory through
# the Stage2Gather while the other vCPUs keep writing, printing what happened.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --release --locked -p vmm
vmm=./target/release/vmm

echo "== 1. memtouch: 4 vCPUs write and verify 256 MiB =="
$vmm run --guest memtouch --vcpus 4 --memory 256M --cmdline "rounds=3"

echo
echo "== 2. reclaim: the host takes back 128 MiB of a 512 MiB guest through the gather =="
$vmm run --guest reclaimcheck --vcpus 4 --memory 512M --reclaim-strategy gather \
    --cmdline "bytes=128M pattern=contiguous"

echo
echo "== 3. the same reclaim, one host call per 4 KiB page (what QEMU does) =="
$vmm run --guest reclaimcheck --vcpus 4 --memory 512M --reclaim-strategy per-page \
    --cmdline "bytes=128M pattern=contiguous"
