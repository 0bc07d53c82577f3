#!/usr/bin/env bash
# Runs the whole test suite: unit tests, property tests, and integration tests that boot
# real guests on /dev/kvm (and on QEMU, when installed). Ends with how many KVM tests ran.
# FUZZ_SECONDS=N adds a fuzz run of N seconds per target (CI sets 60; see docs/FUZZING.md).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
markers=target/tmp/kvm-tests
rm -rf "$markers"
status=0
cargo test --workspace --locked --no-fail-fast "$@" || status=$?
count() { { find "$markers/$1" -type f 2>/dev/null || true; } | wc -l; }
ran=$(count ran)
skipped=$(count skipped)
# Skips by reason: each marker holds the reason its test gave.
reasons=""
if [ "$skipped" -gt 0 ]; then
    reasons=" ($(for f in "$markers"/skipped/*; do cat "$f"; echo; done | sort | uniq -c \
        | sed 's/^ *\([0-9]*\) \(.*\)/\1: \2/' | paste -sd ';' - | sed 's/;/; /g'))"
fi
echo "KVM tests: $ran ran, $skipped skipped$reasons"
if [ "$skipped" -gt 0 ]; then
    echo "WARNING: $skipped KVM test(s) did not run on this host$reasons"
fi
if [ "${FUZZ_SECONDS:-0}" -gt 0 ]; then
    ./vmm/fuzz/run.sh "$FUZZ_SECONDS" || status=$?
fi
exit $status
