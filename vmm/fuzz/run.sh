#!/usr/bin/env bash
# Runs every fuzz target for SECONDS seconds each (default 60) from the seed corpus.
# Needs the nightly toolchain and cargo-fuzz (installed here if missing).
# Long runs: ./vmm/fuzz/run.sh 600
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "SKIPPED: fuzzing needs the nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    if ! cargo install cargo-fuzz --locked >/dev/null 2>&1; then
        echo "SKIPPED: cannot install cargo-fuzz"
        exit 0
    fi
fi
# The fuzz targets need no test guests; nightly has no x86_64-unknown-none target anyway.
export VMM_SKIP_GUEST_BUILD=1
cargo +nightly fuzz build
for target in $(cargo +nightly fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    # A private copy of the seed corpus, so that runs do not grow the committed one.
    work="target/corpus-run/$target"
    rm -rf "$work" && mkdir -p "$work" && cp corpus/"$target"/* "$work"/ 2>/dev/null || true
    cargo +nightly fuzz run "$target" "$work" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
        | grep -E "^(Done|stat::number_of_executed_units|==|SUMMARY|thread .* panicked)|Running:|crash-" || true
    if ls artifacts/"$target"/crash-* >/dev/null 2>&1; then
        echo "fuzz: $target FOUND A CRASH (artifacts/$target)"
        exit 1
    fi
done
echo "fuzz: no crashes"
