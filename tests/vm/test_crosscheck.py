"""nvmevfio and the kernel nvme driver agree on the same controller, both ways."""

import subprocess

import numpy as np
from conftest import kernel_blockdev, kernel_write

import nvmevfio
from nvmevfio import pci


def test_kernel_reads_nvmevfio_writes_and_back(small_ctrl, io_dir):
    addr = small_ctrl["address"]
    ours = np.random.default_rng(21).integers(0, 256, 1 << 20, dtype=np.uint8)
    with nvmevfio.open(addr, 1) as dev:
        dev.write_blocks(4096, ours)
        dev.flush()
    bdev = kernel_blockdev(addr)
    try:
        got = subprocess.run(["dd", f"if={bdev}", "bs=512", "skip=4096", "count=2048", "iflag=direct",
                              "status=none"], check=True, capture_output=True).stdout
        assert got == ours.tobytes()
        theirs = np.random.default_rng(22).integers(0, 256, 256 << 10, dtype=np.uint8).tobytes()
        kernel_write(bdev, theirs, 9000, io_dir / "kernel-write.bin")
    finally:
        pci.bind(addr, force=True)
    with nvmevfio.open(addr, 1) as dev:
        assert dev.read_blocks(9000, len(theirs) // 512).tobytes() == theirs
