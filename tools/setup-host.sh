#!/usr/bin/env bash
# Installs what nvmevfio and its test guest need on a Debian 12 host (run as root):
# apt packages, a Python virtual environment with nvmevfio installed in it, and the
# guest kernels: Debian's (downloaded as a .deb and extracted into a cache, never
# installed) and the custom one tools/build-guest-kernel.sh builds.
# Idempotent: each step is skipped when its result is already present.
#   --no-venv   everything but the development virtual environment (tools/test builds the
#               wheel and installs it into a fresh one of its own instead)
set -euo pipefail
dev_venv=1
[ "${1:-}" = "--no-venv" ] && dev_venv=0
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${NVMEVFIO_VENV:-$here/.venv}
stamp_dir=${NVMEVFIO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nvmevfio}
mkdir -p "$stamp_dir"

log() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get, /dev/vfio, sysfs binding)"; exit 1
fi

apt_pkgs=(qemu-system-x86 qemu-utils busybox-static cpio kmod e2fsprogs nvme-cli pciutils udev fio
          nbdkit nbdkit-plugin-python nbd-client
          python3-venv python3-dev gcc libc6-dev liburing-dev liburing2
          linux-source-6.12 make flex bison bc libelf-dev)  # the custom guest kernel (iommufd lane)
missing=()
for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing apt packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The guest kernel: the 6.1 image package that linux-image-amd64 depends on.
if ! compgen -G "$stamp_dir/kernel/boot/vmlinuz-*" >/dev/null; then
    log "fetching the guest kernel package"
    [ -n "$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')" ] || apt-get update -qq
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [ -n "$pkg" ] || { log "cannot resolve linux-image-amd64's kernel package"; exit 1; }
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq "$pkg")
    rm -rf "$stamp_dir/kernel.new"
    dpkg-deb -x "$tmp"/*.deb "$stamp_dir/kernel.new"
    ver=$(basename "$(ls -d "$stamp_dir"/kernel.new/lib/modules/*)")
    depmod -b "$stamp_dir/kernel.new" "$ver"
    rm -rf "$stamp_dir/kernel" "$tmp"
    mv "$stamp_dir/kernel.new" "$stamp_dir/kernel"
    log "guest kernel $ver in $stamp_dir/kernel"
fi

# The custom guest kernel (6.12 with IOMMUFD, VFIO_DEVICE_CDEV, VFIO_NOIOMMU): built once, about
# 10 minutes on two cores, then cached by source version and config hash.
"$here/tools/build-guest-kernel.sh" >/dev/null

# The development environment, with nvmevfio (and its C shim) installed editable.
if [ "$dev_venv" = 0 ]; then
    log "ready: cache $stamp_dir"
    exit 0
fi
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    log "creating virtual environment $venv"
    "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import nvmevfio._ffi' 2>/dev/null \
   || [ -n "$(find "$here/cbits" -newer "$venv/.nvmevfio-installed" -type f 2>/dev/null)" ] \
   || [ "$here/pyproject.toml" -nt "$venv/.nvmevfio-installed" ]; then
    log "installing nvmevfio into $venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    "$venv/bin/pip" install -q -e "$here[test]"
    touch "$venv/.nvmevfio-installed"
fi
log "ready: venv $venv, cache $stamp_dir"
