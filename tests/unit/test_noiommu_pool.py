"""The no-IOMMU lane's pure pieces: pagemap entries to frame numbers, runs of physically
contiguous huge pages, and the allocator ranges built from them (exact values)."""

import numpy as np
import pytest

from nvmevfio.dma import (
    HUGE_PAGE,
    PhysicalPool,
    _longest_run,
    _physical_chunks,
    choose_pages,
    contiguous_runs,
    frames_from_pagemap,
    pool_ranges,
)
from nvmevfio.errors import VfioError

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


def test_pool_ranges_keep_a_guard_page_between_physically_adjacent_runs():
    runs = contiguous_runs([A, A + M2, X, A + 2 * M2], M2)
    # run 1 ends where run 3 starts: it gives up its last page, so freed space never coalesces across
    assert pool_ranges(runs, 4096) == [(A, A + 2 * M2 - 4096 - 1), (X, X + M2 - 1), (A + 2 * M2, A + 3 * M2 - 1)]
    assert pool_ranges(contiguous_runs([A, X], M2), 4096) == [(A, A + M2 - 1), (X, X + M2 - 1)]


def test_pool_view_is_the_memory_of_its_run():
    array = np.arange(3 * M2, dtype=np.uint64).view(np.uint8)[: 3 * M2]
    pool = PhysicalPool(array, [X, A, A + M2])
    assert pool.runs == [(X, 0, M2), (A, M2, 2 * M2)]
    v = pool.view(A + M2 - 8, 16)  # spans the two chunks of run 2: one piece of memory
    assert v.ctypes.data == array.ctypes.data + 2 * M2 - 8 and v.size == 16
    with pytest.raises(ValueError):
        pool.view(X + M2 - 8, 16)  # past the end of run 1


def test_choose_pages_keeps_the_longest_runs_in_physical_order():
    # indices 0..5 at scattered addresses: runs {A..A+2} (idx 3,0,5), {X, X+1} (idx 1,4), {A+9} (idx 2)
    physical = [A + M2, X, A + 9 * M2, A, X + M2, A + 2 * M2]
    assert choose_pages(physical, 3) == [3, 0, 5]
    assert choose_pages(physical, 4) == [3, 0, 5, 1]  # then the next longest run, cut to fit
    assert choose_pages(physical, 6) == [3, 0, 5, 2, 1, 4]
    assert _longest_run(physical) == 3 and _longest_run([A, A + 2 * M2]) == 1 and _longest_run([]) == 0


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
