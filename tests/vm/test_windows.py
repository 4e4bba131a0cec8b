"""Random windows over the whole 512-byte namespace, then the host checks the backing
image. This module runs after every other test that writes to that namespace
(pytest orders modules by name), so its final shadow is the image's content."""

import hashlib

import numpy as np
from conftest import record


def test_random_windows(dev, io_dir):
    """>= 200 random windows over the namespace, incl. first/last LBA and page / PRP-list boundaries."""
    last = dev.info.completion_mode == "irq" and not dev.info.shadow_doorbells  # the conftest's last mode
    rng = np.random.default_rng(2026 + 2 * (dev.info.completion_mode == "irq") + dev.info.shadow_doorbells)
    n = dev.block_count
    windows = [(0, 1), (n - 1, 1), (0, 8), (7, 2), (8, 8), (15, 17), (n - 8, 8), (1000, 4096), (5000, 4104)]
    while len(windows) < 200:
        count = int(rng.choice([1, 7, 8, 9, 16, 64, 255, 256, 257, 1023, 2048]))
        windows.append((int(rng.integers(0, n - count + 1)), count))
    shadow = dev.read_blocks(0, n)
    for slba, count in windows:
        data = rng.integers(0, 256, count * 512, dtype=np.uint8)
        dev.write_blocks(slba, data)
        shadow[slba * 512 : (slba + count) * 512] = data
        got = dev.read_blocks(slba, count)
        assert np.array_equal(got, data), (slba, count)
    dev.flush()
    assert np.array_equal(dev.read_blocks(0, n), shadow)
    if last:
        record(io_dir, "images", {"address": dev.info.address, "nsid": 1, "offset": 0, "length": len(shadow),
                                  "sha256": hashlib.sha256(shadow.tobytes()).hexdigest()})
