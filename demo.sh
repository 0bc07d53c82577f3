#!/usr/bin/env bash
# The main job: set up, build, and boot the memtouch test guest on 4 vCPUs.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
cargo build --release --locked -p vmm
exec ./target/release/vmm run --guest memtouch --vcpus 4 --memory 256M --cmdline "rounds=3"
