#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine with rustup. Idempotent.
#  - rustup target x86_64-unknown-none (the test guests are built for it)
#  - Debian packages: qemu-system-x86 (the peer VMM the tests and benchmarks compare against),
#    curl (the tests drive the control API with it, as users do), busybox-static (the Linux
#    test initramfs), acpica-tools (iasl checks the ACPI tables)
#  - Debian's stock kernel and the test initramfs for it (guest-kernels/linux/build.sh; cached
#    under ~/.cache/vmm/linux, linked from target/linux-guest)
#  - the test kernel: Linux 6.1 from Debian's linux-source-6.1 with our config fragment and
#    patches, and its initramfs (guest-kernels/linux/build-test-kernel.sh; the Debian packages
#    linux-source-6.1, gcc, make, flex, bison, bc, libelf-dev, libc6-dev, patch; built once per
#    machine, niced, about 5 minutes on 2 cores; cached under ~/.cache/vmm/linux/test-kernel,
#    linked from target/linux-test-kernel). VMM_SKIP_TEST_KERNEL=1 skips it.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

packages=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || packages+=(qemu-system-x86)
command -v curl >/dev/null 2>&1 || packages+=(curl)
# Static: the Linux test initramfs has no libc (the plain busybox package is dynamic).
dpkg-query -W -f '${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || packages+=(busybox-static)
command -v iasl >/dev/null 2>&1 || packages+=(acpica-tools)
command -v xz >/dev/null 2>&1 || packages+=(xz-utils)
# The test kernel's source and build tools.
if [ "${VMM_SKIP_TEST_KERNEL:-0}" != 1 ]; then
    for p in linux-source-6.1 gcc make flex bison bc libelf-dev libc6-dev patch; do
        dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || packages+=("$p")
    done
fi
if [ ${#packages[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${packages[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx x86_64-unknown-none; then
    echo "setup: adding rustup target x86_64-unknown-none"
    rustup target add x86_64-unknown-none
fi

if [ ! -e /dev/kvm ]; then
    echo "setup: WARNING: /dev/kvm is missing; the VMM cannot run guests here and KVM tests will be SKIPPED"
fi

guest-kernels/linux/build.sh
if [ "${VMM_SKIP_TEST_KERNEL:-0}" != 1 ]; then
    guest-kernels/linux/build-test-kernel.sh
fi
