#!/usr/bin/env bash
# Builds the test guest's own kernel (`tools/guest.py run --kernel custom`) from Debian's
# linux-source-6.12 package with tools/guest-kernel.config: allnoconfig plus what the
# guest uses, so that it enables what Debian's kernels lack (VFIO_NOIOMMU, IOMMUFD,
# VFIO_DEVICE_CDEV) and builds in minutes on two cores.
#
# The result is cached under $NVMEVFIO_CACHE/kernel-custom/<source version>-<config hash>/
# (boot/vmlinuz-<release>, lib/modules/<release>/) and never rebuilt for the same
# source version and config. Prints that folder on stdout. Needs the packages
# tools/setup-host.sh installs (linux-source-6.12 flex bison bc libelf-dev).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${NVMEVFIO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nvmevfio}
config=$here/tools/guest-kernel.config
src_pkg=linux-source-6.12
log() { printf 'build-guest-kernel: %s\n' "$*" >&2; }

tarball=/usr/src/$src_pkg.tar.xz
[ -f "$tarball" ] || { log "$tarball is missing: apt-get install $src_pkg (tools/setup-host.sh)"; exit 1; }
src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
recipe=1  # bump when a change to this script changes what it builds
cfg_hash=$( (cat "$config"; echo "recipe $recipe") | sha256sum | cut -c1-12)
dest=$cache/kernel-custom/$src_ver-$cfg_hash
if compgen -G "$dest/boot/vmlinuz-*" >/dev/null; then
    echo "$dest"; exit 0
fi

src=$cache/kernel-src/$src_ver
if [ ! -f "$src/Makefile" ]; then
    log "extracting $tarball"
    rm -rf "$src.new" && mkdir -p "$src.new"
    tar -xf "$tarball" -C "$src.new" --strip-components=1
    rm -rf "$src" && mv "$src.new" "$src"
fi
build=$cache/kernel-build/$src_ver-$cfg_hash
mkdir -p "$build"
start=$(date +%s)
log "configuring in $build (allnoconfig + $(basename "$config"))"
make -s -C "$src" O="$build" KCONFIG_ALLCONFIG="$config" allnoconfig >/dev/null
# Every symbol the fragment asks for must have survived (a dependency left out
# silently drops it); "=n" lines and comments are not checked.
missing=()
while IFS= read -r line; do
    case "$line" in CONFIG_*=n|\#*|"") continue;; esac
    grep -qxF "$line" "$build/.config" || missing+=("$line")
done < "$config"
if [ ${#missing[@]} -gt 0 ]; then
    log "the configuration dropped: ${missing[*]}"; exit 1
fi
jobs=$(( $(nproc) + 1 ))
log "building bzImage and modules with -j$jobs"
make -s -C "$src" O="$build" -j"$jobs" bzImage modules >/dev/null
release=$(make -s -C "$src" O="$build" kernelrelease)
rm -rf "$dest.new" && mkdir -p "$dest.new/boot"
cp "$build/arch/x86/boot/bzImage" "$dest.new/boot/vmlinuz-$release"
make -s -C "$src" O="$build" INSTALL_MOD_PATH="$dest.new" modules_install >/dev/null
cp "$build/.config" "$dest.new/boot/config-$release"
rm -rf "$dest" && mv "$dest.new" "$dest"
rm -rf "$build" "$src"  # 2 GB of sources and objects; a rebuild extracts again (seconds)
log "kernel $release built in $(( $(date +%s) - start )) s: $dest"
echo "$dest"
