#!/usr/bin/env bash
# Stock Linux's early boot on this VMM and on QEMU/KVM, side by side: the same vmlinux (PVH),
# initramfs, memory, vCPUs and command line. Runs alternate (vmm, qemu, vmm, ...); the script
# prints the median of when each console milestone arrived, in wall-clock seconds since the
# VMM was started.
# On hosts without VMX/SVM both stop at KVM's first emulation failure: "end" is when this VMM
# prints its error, or QEMU its "KVM internal error" (QEMU then pauses the VM; the script stops
# it). Elsewhere "end" is the initramfs's "vmm-init: ready".
#
# Usage: tools/linux-boot/timeline.sh [REPS (3)] [MEMORY (512M)] [VCPUS (1)]
# Needs: ./setup.sh (target/linux-guest), cargo build --release, qemu-system-x86_64.
set -euo pipefail
cd "$(dirname "$0")/../.."
reps="${1:-3}" memory="${2:-512M}" vcpus="${3:-1}"
dir=target/linux-guest
vmm=target/release/vmm
for f in "$dir/vmlinux" "$dir/initramfs.cpio" "$vmm"; do
    [ -e "$f" ] || { echo "timeline: $f is missing: run ./setup.sh and cargo build --release" >&2; exit 1; }
done
cmdline="console=ttyS0 earlyprintk=ttyS0 panic=1"
limit_s=400
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Runs "$@", writing each output line prefixed with the milliseconds since start, until a
# line marks the end or limit_s passes; then stops the process.
stamped() {
    local log="$1"; shift
    local start; start=$(now_ms)
    coproc RUN { exec "$@" 2>&1; }
    local pid=$RUN_PID line
    : > "$log"
    while IFS= read -r -t "$limit_s" line <&"${RUN[0]}"; do
        echo "$(( $(now_ms) - start )) $line" >> "$log"
        [[ "$line" =~ KVM\ could\ not\ emulate|KVM\ internal\ error|vmm-init:\ ready ]] && break
        [ $(( $(now_ms) - start )) -gt $(( limit_s * 1000 )) ] && break
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

for i in $(seq 1 "$reps"); do
    stamped "$out/vmm.$i" "$vmm" run --kernel "$dir/vmlinux" --initrd "$dir/initramfs.cpio" \
        --memory "$memory" --vcpus "$vcpus" --cmdline "$cmdline"
    stamped "$out/qemu.$i" qemu-system-x86_64 -M microvm,acpi=on -accel kvm -cpu host,-arch-capabilities \
        -m "$memory" -smp "$vcpus" -nographic -no-reboot -kernel "$dir/vmlinux" \
        -initrd "$dir/initramfs.cpio" -append "$cmdline"
done

# Median of the numbers on stdin (ms), printed in seconds; "-" when there are none.
median_s() {
    sort -n | awk '{a[NR] = $1} END {
        if (NR == 0) { print "-"; exit }
        m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
        printf "%.1f\n", m / 1000 }'
}
printf '%-34s %8s %8s\n' "milestone (s, median of $reps runs)" vmm qemu
for m in "Linux version" "BIOS-e820" "ACPI: RSDP 0x" "smpboot: Allowing" "Memory:" end; do
    row=()
    for v in vmm qemu; do
        row+=("$(for i in $(seq 1 "$reps"); do
            if [ "$m" = end ]; then tail -1 "$out/$v.$i"; else grep -a -m1 -F "$m" "$out/$v.$i" || true; fi
        done | grep . | cut -d' ' -f1 | median_s)")
    done
    printf '%-34s %8s %8s\n' "$m" "${row[0]}" "${row[1]}"
done
echo "how each first run ended:"
for v in vmm qemu; do echo "  $v: $(tail -1 "$out/$v.1" | cut -d' ' -f2- | cut -c1-150)"; done
