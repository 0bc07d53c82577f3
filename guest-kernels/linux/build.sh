#!/usr/bin/env bash
# Fetches Debian's current stock kernel and builds the test initramfs for it. Idempotent.
#  - kernel: `apt-get download` of the package linux-image-amd64 points to (no other network);
#    keeps vmlinuz (bzImage), vmlinux (the ELF inside it, which has a PVH note) and its config
#  - initramfs: busybox-static, the four virtio modules (virtio_ring, virtio, virtio_mmio,
#    virtio_balloon) from the same package, and ./init; an uncompressed newc cpio, because
#    unpacking is guest ring-0 work and that is emulated (slow) on nested PVM hosts
# Cached outside the clone in ${VMM_LINUX_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vmm/linux}/<release>/,
# so a machine downloads a kernel once; target/linux-guest in the workspace links to it, and is
# where the tests and the README's examples look.
# Needs: apt-get, dpkg-deb, xz, busybox (setup.sh installs busybox-static).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
workspace="$(cd "$here/../.." && pwd)"
cache="${VMM_LINUX_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmm/linux}"
link="$workspace/target/linux-guest"

fail() { echo "linux guest: $*" >&2; exit 1; }
command -v busybox >/dev/null || fail "busybox is missing: install busybox-static (./setup.sh does)"
# The initramfs has no libc: Debian's plain busybox package is dynamically linked.
ldd "$(command -v busybox)" >/dev/null 2>&1 && fail "$(command -v busybox) is dynamically linked: install busybox-static (it replaces busybox)"
command -v xz >/dev/null || fail "xz is missing: install xz-utils (./setup.sh does)"

pkg_of() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg="$(pkg_of || true)"
if [ -z "$pkg" ]; then
    apt-get update -qq || fail "apt-get update failed; the kernel comes from the Debian archive"
    pkg="$(pkg_of || true)"
fi
[ -n "$pkg" ] || fail "apt-cache does not know linux-image-amd64, so there is no Debian kernel to fetch"
release="${pkg#linux-image-}"
dir="$cache/$release"
# The initramfs is rebuilt whenever this script or the init changes.
stamp="$(cat "$here/build.sh" "$here/init" "$(command -v busybox)" | sha256sum | cut -c1-16)"

mkdir -p "$cache"
# One build at a time per cache (two test runs may set up at once).
exec 9>"$cache/.lock"
flock 9
if [ ! -f "$dir/vmlinux" ] || [ "$(cat "$dir/stamp" 2>/dev/null)" != "$stamp" ]; then
    echo "linux guest: building $release in $dir"
    work="$(mktemp -d "$cache/.build.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work" # mktemp makes it private; the cache is readable like any other
    if [ -f "$dir/vmlinuz" ]; then
        cp "$dir/vmlinuz" "$dir/config" "$work/"
        cp -r "$dir/modules" "$work/"
    else
        # As root, apt cannot drop to its _apt user for a directory it does not own and says
        # so in a warning; the download itself works.
        (cd "$work" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
        deb="$(ls "$work"/*.deb 2>/dev/null | head -1)"
        [ -n "$deb" ] || fail "apt-get download $pkg fetched nothing"
        mkdir "$work/x" "$work/modules"
        # Newer Debian kernels ship modules compressed (.ko.xz); busybox insmod wants them plain.
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$work/x" --wildcards './boot/*' \
            '*/drivers/virtio/*.ko*'
        cp "$work/x/boot/vmlinuz-$release" "$work/vmlinuz"
        cp "$work/x/boot/config-$release" "$work/config"
        for m in virtio_ring virtio virtio_mmio virtio_balloon; do
            f="$(find "$work/x" -name "$m.ko" -o -name "$m.ko.xz" | head -1)"
            case "$f" in
                *.ko) cp "$f" "$work/modules/$m.ko" ;;
                *.ko.xz) xz -dc "$f" > "$work/modules/$m.ko" ;;
            esac
        done
        rm -rf "$work/x" "$deb"
    fi
    for m in virtio_ring virtio virtio_mmio virtio_balloon; do
        [ -f "$work/modules/$m.ko" ] || fail "$pkg has no $m.ko (is virtio built into this kernel?)"
    done
    # vmlinuz is a bzImage whose payload is XZ-compressed (CONFIG_KERNEL_XZ): the ELF vmlinux
    # starts at the first XZ magic.
    grep -q '^CONFIG_KERNEL_XZ=y' "$work/config" || fail "$release is not XZ-compressed; cannot extract vmlinux"
    offset="$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$work/vmlinuz" | head -1 | cut -d: -f1)"
    [ -n "$offset" ] || fail "no XZ stream in vmlinuz-$release"
    # xz stops reading after the stream, so tail may die of SIGPIPE: only xz's status counts.
    { tail -c +$((offset + 1)) "$work/vmlinuz" || true; } | xz -dc --single-stream > "$work/vmlinux" \
        || fail "the XZ stream in vmlinuz-$release does not decompress"
    [ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" = 7f454c46 ] || fail "the XZ stream in vmlinuz-$release is not an ELF"

    root="$work/root"
    mkdir -p "$root/bin" "$root/lib/modules" "$root/dev" "$root/proc" "$root/sys" "$root/tmp"
    cp "$(command -v busybox)" "$root/bin/busybox"
    cp "$work/modules/"*.ko "$root/lib/modules/"
    install -m 755 "$here/init" "$root/init"
    (cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) > "$work/initramfs.cpio"
    rm -rf "$root"
    echo "$release" > "$work/release"
    echo "$stamp" > "$work/stamp"
    rm -rf "$dir.old"
    [ -e "$dir" ] && mv "$dir" "$dir.old"
    mv "$work" "$dir"
    rm -rf "$dir.old"
    trap - EXIT
fi
mkdir -p "$workspace/target"
ln -sfn "$dir" "$link"
echo "linux guest: $release in $link (vmlinux, vmlinuz, initramfs.cpio)"
