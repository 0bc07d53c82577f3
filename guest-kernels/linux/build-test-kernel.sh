#!/usr/bin/env bash
# Builds the test kernel: a small Linux 6.1 from Debian's linux-source-6.1 package that boots to a
# busybox userspace on this project's hosts (nested PVM, where guest ring 0 is emulated), and its
# initramfs. Idempotent. Debian's stock kernel (build.sh, target/linux-guest) stays for the
# early-boot tests; this one is for everything after early boot.
#  - kernel: /usr/src/linux-source-6.1.tar.xz, `make tinyconfig`, then test-kernel.config on top
#    (the build fails if any of its lines did not make it into the final .config), then
#    patches/*.patch (each says which host limitation it works around); `nice -n 19 make vmlinux`
#    with a progress line every 20 s. The vmlinux has the PVH note the VMM boots.
#  - initramfs: busybox-static, ./test-init as /init and vmm-guest (vmm-guest.c, gcc -static: the
#    init's work, the memory-pressure tool and power-off): an uncompressed newc cpio (unpacking is
#    emulated ring-0 work here).
# Cached outside the clone in ${VMM_LINUX_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vmm/linux}/test-kernel/
# <source version>-<hash of the fragment, the patches and the build recipe>/ (vmlinux, config,
# System.map, initramfs.cpio), so a machine builds each kernel once; the initramfs is rebuilt
# there whenever test-init, vmm-guest.c, busybox or this script change. target/linux-test-kernel in
# the workspace links to it.
# Boot it (the CPU features this host cannot emulate are off in the kernel itself, patch 0005, so
# no clearcpuid= is needed; it has no ACPI, so --no-acpi saves writing tables it ignores):
#   vmm run --kernel target/linux-test-kernel/vmlinux --initrd target/linux-test-kernel/initramfs.cpio \
#     --no-acpi --vcpus 2 --memory 512M --cmdline "console=ttyS0 panic=1 vmm.rounds=10"
# Needs (setup.sh installs them): linux-source-6.1, gcc, make, flex, bison, bc, libelf-dev,
# libc6-dev (static libc for vmm-guest), patch, xz-utils, busybox-static.
# Environment: VMM_LINUX_JOBS (make -j, default: the number of CPUs), VMM_LINUX_KEEP_BUILD=1
# (keep the build tree next to the result, for kernel work).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
cache="${VMM_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm/linux}/test-kernel"
link="$workspace/target/linux-test-kernel"
tarball=/usr/src/linux-source-6.1.tar.xz
# Bump when the way the kernel is built changes (not for fragment or patch changes: those are
# hashed).
recipe=1

say() { echo "linux test kernel: $*"; }
fail() { echo "linux test kernel: $*" >&2; exit 1; }

[ -f "$tarball" ] || fail "$tarball is missing: install linux-source-6.1 (./setup.sh does)"
for tool in gcc make flex bison bc patch xz perl readelf; do
    command -v "$tool" >/dev/null || fail "$tool is missing (./setup.sh installs the kernel build packages)"
done
[ -f /usr/include/gelf.h ] || fail "libelf headers are missing: install libelf-dev (./setup.sh does)"
command -v busybox >/dev/null || fail "busybox is missing: install busybox-static (./setup.sh does)"
ldd "$(command -v busybox)" >/dev/null 2>&1 && fail "$(command -v busybox) is dynamically linked: install busybox-static (it replaces busybox)"

version="$(dpkg-query -W -f '${Version}' linux-source-6.1 2>/dev/null || true)"
[ -n "$version" ] || version="$(stat -c %Y "$tarball")"
patches=("$here"/patches/*.patch)
[ -f "${patches[0]}" ] || fail "no patches in $here/patches"
hash="$( { echo "recipe $recipe"; cat "$here/test-kernel.config" "${patches[@]}"; } | sha256sum | cut -c1-12)"
dir="$cache/$version-$hash"
# The initramfs is rebuilt whenever its parts change.
istamp="$(cat "$here/build-test-kernel.sh" "$here/test-init" "$here/vmm-guest.c" "$(command -v busybox)" | sha256sum | cut -c1-16)"

mkdir -p "$cache"
# One build at a time per cache (two test runs may set up at once).
exec 9>"$cache/.lock"
flock 9

work=""
trap '[ -n "$work" ] && rm -rf "$work"' EXIT

build_kernel() {
    say "building linux-source-6.1 $version (config and patches $hash) in $dir; about 5 minutes on 2 cores"
    work="$(mktemp -d "$cache/.build.XXXXXX")"
    chmod 755 "$work" # mktemp makes it private; the cache is readable like any other
    local start=$SECONDS
    tar -xf "$tarball" -C "$work"
    local src
    src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)"
    [ -f "$src/Makefile" ] || fail "$tarball has no kernel tree"
    for p in "${patches[@]}"; do
        patch -s -p1 -d "$src" < "$p" || fail "patch $(basename "$p") does not apply to linux-source-6.1 $version"
    done
    # Kconfig's "override: ... changes choice state" warnings are expected (the fragment does
    # override tinyconfig's choices); its log is kept for failures.
    local mk=(make -C "$src" ARCH=x86_64 -s)
    { "${mk[@]}" tinyconfig &&
        "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/test-kernel.config" &&
        "${mk[@]}" olddefconfig; } > "$work/config.log" 2>&1 \
        || { tail -20 "$work/config.log" >&2; fail "configuring the kernel failed"; }
    # Every line of the fragment must be in the result: Kconfig drops what it cannot satisfy.
    local missing=""
    while read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$src/.config" || missing="$missing $line" ;;
            "# CONFIG_"*" is not set")
                opt="${line#\# }"; opt="${opt%% *}"
                grep -q "^$opt=" "$src/.config" && missing="$missing $opt=n" ;;
        esac
    done < "$here/test-kernel.config"
    [ -z "$missing" ] || fail "test-kernel.config lines Kconfig did not take:$missing"

    local jobs="${VMM_LINUX_JOBS:-$(nproc)}"
    say "compiling vmlinux (nice -n 19 make -j$jobs vmlinux; log in $work/build.log)"
    nice -n 19 make -C "$src" ARCH=x86_64 -j"$jobs" vmlinux > "$work/build.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null && sleep 1; done
        kill -0 "$pid" 2>/dev/null || break
        say "$((SECONDS - start)) s: $(grep -c '^  CC ' "$work/build.log") files compiled; $(tail -1 "$work/build.log" | sed 's/^ *//')"
    done
    if ! wait "$pid"; then
        tail -30 "$work/build.log" >&2
        fail "make vmlinux failed (the lines above are the end of its log)"
    fi
    # The VMM boots the ELF through its PVH note (XEN_ELFNOTE_PHYS32_ENTRY, type 18).
    readelf -n "$src/vmlinux" | grep -A1 '^  Xen' | grep -qiE '0x00000012|PHYS32_ENTRY' \
        || fail "the vmlinux has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY)"
    local out="$work/out"
    mkdir "$out"
    cp "$src/vmlinux" "$src/System.map" "$out/"
    cp "$src/.config" "$out/config"
    echo "$version" > "$out/version"
    echo "$hash" > "$out/hash"
    echo "$((SECONDS - start))" > "$out/build-seconds"
    if [ "${VMM_LINUX_KEEP_BUILD:-0}" = 1 ]; then
        mv "$src" "$out/src"
        mv "$work/build.log" "$out/"
    fi
    rm -rf "$dir.old"
    [ -e "$dir" ] && mv "$dir" "$dir.old"
    mv "$out" "$dir"
    rm -rf "$dir.old" "$work"
    work=""
    say "vmlinux built in $((SECONDS - start)) s"
}

build_initramfs() {
    say "building the initramfs in $dir"
    work="$(mktemp -d "$cache/.initramfs.XXXXXX")"
    local root="$work/root"
    mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/tmp"
    cp "$(command -v busybox)" "$root/bin/busybox"
    gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/vmm-guest" "$here/vmm-guest.c" \
        || fail "vmm-guest.c does not build statically (is libc6-dev installed?)"
    install -m 755 "$here/test-init" "$root/init"
    (cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) > "$work/initramfs.cpio"
    mv "$work/initramfs.cpio" "$dir/initramfs.cpio"
    echo "$istamp" > "$dir/initramfs.stamp"
    rm -rf "$work"
    work=""
}

[ -f "$dir/vmlinux" ] || build_kernel
if [ ! -f "$dir/initramfs.cpio" ] || [ "$(cat "$dir/initramfs.stamp" 2>/dev/null)" != "$istamp" ]; then
    build_initramfs
fi
mkdir -p "$workspace/target"
ln -sfn "$dir" "$link"
say "linux-source-6.1 $version in $link (vmlinux, initramfs.cpio)"
