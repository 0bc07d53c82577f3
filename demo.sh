#!/usr/bin/env bash
# The main job: set up, build, boot the balloon test guest on 4 vCPUs with 1 GiB, inflate
# the balloon by 768 MiB (reclaimed through the Stage2Gather while 3 vCPUs keep verifying
# their memory), deflate it back to 0, and print what happened. Then the same inflate with
# one host call per 4 KiB page, as QEMU does, for comparison. Then a fragmented guest (every
# other frame of its free memory in use), whose inflate gets scattered frames: through zap
# spans (one invalidation per batch), and with one zap per range for comparison.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --release --locked -p vmm
vmm=./target/release/vmm

# One run of the balloon guest on 4 vCPUs with 1 GiB: $1 the heading, $2 the balloon steps,
# $3 the guest command line; the rest are further `vmm run` options.
demo_run() {
    local heading=$1 steps=$2 cmdline=$3
    shift 3
    echo "== $heading =="
    $vmm run --guest balloon --vcpus 4 --memory 1G --balloon-steps "$steps" \
        --cmdline "$cmdline" "$@"
}

demo_run "1. balloon: 4 vCPUs, 1 GiB; inflate 768 MiB through the gather, then deflate" \
    768M,0 "changes=2 touch=32M" --reclaim-strategy gather

echo
demo_run "2. a 256 MiB inflate with one host call per 4 KiB page (what QEMU does), for comparison" \
    256M,0 "changes=2 touch=32M" --reclaim-strategy per-page

echo
demo_run "3. a fragmented guest: 384 MiB of scattered frames through zap spans (one invalidation per batch)" \
    384M,0 "changes=2 touch=32M fragment=1" --reclaim-strategy gather

echo
demo_run "4. the same with one zap per range (--zap-span-gap 0), for comparison" \
    384M,0 "changes=2 touch=32M fragment=1" --reclaim-strategy gather --zap-span-gap 0
