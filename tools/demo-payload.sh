#!/bin/sh
# What the README's first command runs inside the test guest: the product, through
# real VFIO and the emulated IOMMU, against QEMU's NVMe controller.
set -eu
step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }
ADDR=$(nvmevfio list -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["Functions"][0]["address"])')
step nvmevfio list
step nvmevfio show-regs "$ADDR"
step nvmevfio id-ctrl "$ADDR"
step nvmevfio id-ns "$ADDR" -n 1
head -c 1048576 /dev/urandom > /tmp/demo-data.bin
step nvmevfio write "$ADDR" -n 1 --start-block 2048 -d /tmp/demo-data.bin
step nvmevfio read "$ADDR" -n 1 --start-block 2048 --block-count 2047 -d /tmp/demo-back.bin
step cmp /tmp/demo-data.bin /tmp/demo-back.bin
echo "read back 1 MiB: identical"
step nvmevfio read "$ADDR" -n 1 --start-block 2048 --block-count 0 --hexdump
step nvmevfio smart-log "$ADDR"
step nvmevfio perf "$ADDR" -w randread -q 16 -s 4096 -t 3
