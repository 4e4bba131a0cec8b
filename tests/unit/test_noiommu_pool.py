"""The no-IOMMU lane's pure pieces: pagemap entries to frame numbers, runs of physically
contiguous huge pages, and pool addresses translated to physical ones (exact values)."""

import numpy as np
import pytest

from nvmevfio.dma import HUGE_PAGE
from nvmevfio.errors import VfioError
from nvmevfio.noiommu_pool import (
    POOL_BASE,
    PhysicalPool,
    _physical_chunks,
    contiguous_runs,
    frames_from_pagemap,
)

M2 = HUGE_PAGE
A = 0x1_0000_0000
X = 0x3_0000_0000


def test_frames_from_pagemap():
    present = 1 << 63
    entries = np.array([present | 0x1234, 0x1234, present, present | (1 << 55) | 5], dtype=np.uint64)
    # not present -> 0; present with the frame hidden (not root) -> 0; bit 55 (soft-dirty) is not the frame's
    assert frames_from_pagemap(entries).tolist() == [0x1234, 0, 0, 5]


def test_contiguous_runs_need_virtual_and_physical_adjacency():
    assert contiguous_runs([A, A + M2, X, A + 2 * M2], M2) == [(A, 0, 2 * M2), (X, 2 * M2, M2),
                                                                (A + 2 * M2, 3 * M2, M2)]
    assert contiguous_runs([A + M2, A], M2) == [(A + M2, 0, M2), (A, M2, M2)]  # reversed: two runs
    assert contiguous_runs([], M2) == []


def test_pool_addresses_translate_page_by_page():
    array = np.zeros(3 * M2, dtype=np.uint8)
    pool = PhysicalPool(array, [X, A, A + M2])
    assert pool.runs == [(X, 0, M2), (A, M2, 2 * M2)]
    assert pool.ranges(4096) == [(POOL_BASE, POOL_BASE + 3 * M2 - 1)]
    values = np.array([0, POOL_BASE, POOL_BASE + M2 - 4096, POOL_BASE + M2 + 5, POOL_BASE + 3 * M2 - 8, X + 4,
                       POOL_BASE + 3 * M2], dtype=np.uint64)
    pool.translate(values)
    # 0, below the pool and past its end stay; an address already physical stays (translating twice is harmless)
    assert values.tolist() == [0, X, X + M2 - 4096, A + 5, A + 2 * M2 - 8, X + 4, POOL_BASE + 3 * M2]
    assert pool.translate_one(POOL_BASE + M2 + 5) == A + 5 and pool.translate_one(A + 5) == A + 5
    assert pool.translate_one(0) == 0


def test_pool_contiguity_and_views():
    array = np.arange(3 * M2, dtype=np.uint64).view(np.uint8)[: 3 * M2]
    pool = PhysicalPool(array, [X, A, A + M2])
    assert not pool.contiguous(POOL_BASE + M2 - 4096, 8192)  # X's last page, then A: not adjacent
    assert pool.contiguous(POOL_BASE + M2, 2 * M2)  # A, A + M2
    assert pool.contiguous(POOL_BASE + 4096, 8192)  # inside one huge page
    v = pool.view(POOL_BASE + M2 - 8, 16)  # virtually one piece of memory, whatever the device sees
    assert v.ctypes.data == array.ctypes.data + M2 - 8 and v.size == 16
    with pytest.raises(ValueError):
        pool.view(POOL_BASE + 3 * M2 - 8, 16)  # past the end
    with pytest.raises(ValueError):
        pool.view(A, 16)  # a physical address is not a pool address


def _free_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("HugePages_Free:")), 0)


def test_missing_huge_pages_are_refused_by_name():
    want = (_free_huge_pages() + 1) * M2  # one more than the machine has free
    with pytest.raises(VfioError) as ei:
        PhysicalPool.pinned(want)
    assert ei.value.reason == "noiommu-no-hugepages" and "nr_hugepages" in str(ei.value)


def test_hidden_frame_numbers_are_refused_by_name(tmp_path):
    """What an unprivileged reader of /proc/self/pagemap gets: present pages, frame numbers 0."""
    fake = tmp_path / "pagemap"
    fake.write_bytes((1 << 63).to_bytes(8, "little") * 4)
    with pytest.raises(VfioError) as ei:
        _physical_chunks(0, 2 * M2, str(fake))
    assert ei.value.reason == "noiommu-no-pagemap" and "root" in str(ei.value)
    with pytest.raises(VfioError) as ei:
        _physical_chunks(0, M2, str(tmp_path / "missing"))
    assert ei.value.reason == "noiommu-no-pagemap"


def test_the_leak_scan_finds_a_physical_address_wherever_it_hides():
    """tests/leakscan.py's walk: a pool page's address (page-aligned, a power of two, or inside a
    page) is found in a dataclass field, a property, a dict value, a structured array, a text,
    bytes and an exception; callables and private fields are not data; a value one byte past
    the pool is not a hit."""
    from dataclasses import dataclass, field

    from leakscan import LeakScan, pool_frames

    from nvmevfio.errors import Refused
    from nvmevfio.nvme.controller import Registers

    pool = PhysicalPool(np.zeros(2 * M2, dtype=np.uint8), [X, A])  # A is a power of two
    frames = pool_frames(pool)
    assert len(frames) == 1024 and frames[0] == A >> 12 and frames[-1] == (X + M2) // 4096 - 1

    @dataclass
    class Holder:
        plain: int
        _private: int
        nested: dict = field(default_factory=dict)

        @property
        def shown(self) -> int:
            return X + 0x1234

    entries = np.zeros(2, dtype=[("prp1", "<u8"), ("cid", "<u2")])
    entries["prp1"] = [5, A + M2 - 8]
    scan = LeakScan(frames)
    for name, value in {"registers": Registers(1, 2, 3, 4, 5, A, X + M2), "withheld": Registers(0, 0, 0, 0).withheld(),
                        "holder": Holder(7, A, {"k": [(1, entries)]}), "text": f"at {X + 4096:#x} and {A}",
                        "bytes": (A + 8).to_bytes(8, "little"), "error": Refused("r", "no", where=X),
                        "method": Holder(0, 0).__eq__, "past": X + M2}.items():
        scan.scan(value, name)
    assert sorted(h.split(" = ")[0] for h in scan.hits) == sorted([
        "registers.asq", "holder.shown", "holder.nested['k'][0][1]['prp1'][1]", "text ('0x300001000' in text)",
        "text ('4294967296' in text)", "bytes as 8-byte words[0]", "error.__dict__['context']['where']"]), scan.hits
    assert scan.objects >= 8 and scan.fields > 20


def test_a_known_size_inside_the_pool_is_a_coincidence_and_nothing_else_is_excused():
    from leakscan import LeakScan

    frames = np.arange(0x4000, 0x4010, dtype=np.uint64)  # a pool at physical 64 MiB
    scan = LeakScan(frames, frozenset({64 << 20}))
    scan.scan({"capacity_bytes": 64 << 20, "prp": (64 << 20) + 0x1000, "words": np.array([64 << 20, 7])}, "r")
    assert scan.hits == ["r.prp = 0x4001000"] or scan.hits == ["r['prp'] = 0x4001000"], scan.hits
    assert len(scan.coincidences) == 2 and all("0x4000000" in c for c in scan.coincidences), scan.coincidences
    assert "2 equal to a known size" in scan.report("t")
