"""PRP construction with exact values at every boundary (NVMe 2.0, 4.1.1)."""

import numpy as np
import pytest

from nvmevfio.nvme import prp

PS = 4096
BASE = 0x10_0000  # a page-aligned data IOVA
L0, L1, L2 = 0x20_0000, 0x20_1000, 0x20_2000  # list pages


def test_one_page_aligned():
    p = prp.build(BASE, 4096, PS)
    assert (p.prp1, p.prp2, p.lists) == (BASE, 0, ())


def test_one_page_partial_with_offset():
    p = prp.build(BASE + 0x200, 0xE00, PS)  # ends exactly at the page end
    assert (p.prp1, p.prp2, p.lists) == (BASE + 0x200, 0, ())


def test_offset_spills_into_second_page():
    p = prp.build(BASE + 0x200, 0xE04, PS)
    assert (p.prp1, p.prp2) == (BASE + 0x200, BASE + 0x1000)
    assert p.lists == ()


def test_two_pages_aligned():
    p = prp.build(BASE, 8192, PS)
    assert (p.prp1, p.prp2, p.lists) == (BASE, BASE + 0x1000, ())


def test_three_pages_uses_a_list():
    p = prp.build(BASE, 3 * 4096, PS, [L0])
    assert (p.prp1, p.prp2) == (BASE, L0)
    assert len(p.lists) == 1
    assert p.lists[0].tolist() == [BASE + 0x1000, BASE + 0x2000]


def test_three_pages_with_offset_touch_four_pages():
    p = prp.build(BASE + 0x800, 3 * 4096, PS, [L0])
    assert p.prp1 == BASE + 0x800 and p.prp2 == L0
    assert p.lists[0].tolist() == [BASE + 0x1000, BASE + 0x2000, BASE + 0x3000]


def test_exactly_one_full_list_page():
    # PRP1 + 512 list entries = 513 pages: the list page is full, no chain.
    n = 1 + 512
    assert prp.list_pages_needed(BASE, n * PS, PS) == 1
    p = prp.build(BASE, n * PS, PS, [L0])
    assert len(p.lists) == 1 and len(p.lists[0]) == 512
    assert int(p.lists[0][0]) == BASE + 0x1000
    assert int(p.lists[0][-1]) == BASE + 512 * 0x1000


def test_one_past_a_full_list_page_chains():
    n = 1 + 513
    assert prp.list_pages_needed(BASE, n * PS, PS) == 2
    p = prp.build(BASE, n * PS, PS, [L0, L1])
    first, second = p.lists
    assert len(first) == 512
    assert first[:511].tolist() == [BASE + (k + 1) * 0x1000 for k in range(511)]
    assert int(first[511]) == L1  # chain pointer in the last slot
    assert second.tolist() == [BASE + 512 * 0x1000, BASE + 513 * 0x1000]


def test_three_list_pages():
    n = 1 + 511 + 511 + 5
    assert prp.list_pages_needed(BASE, n * PS, PS) == 3
    p = prp.build(BASE, n * PS, PS, [L0, L1, L2])
    assert [len(x) for x in p.lists] == [512, 512, 5]
    assert int(p.lists[0][511]) == L1 and int(p.lists[1][511]) == L2
    flat = np.concatenate([p.lists[0][:511], p.lists[1][:511], p.lists[2]])
    assert flat.tolist() == [BASE + (k + 1) * 0x1000 for k in range(n - 1)]


@pytest.mark.parametrize(("length", "pages"), [(1, 1), (4096, 1), (4097, 2), (8192, 2), (8193, 3)])
def test_data_pages(length, pages):
    assert prp.data_pages(BASE, length, PS) == pages


def test_list_pages_needed_small():
    assert prp.list_pages_needed(BASE, 4096, PS) == 0
    assert prp.list_pages_needed(BASE, 8192, PS) == 0
    assert prp.list_pages_needed(BASE, 8193, PS) == 1


def test_too_few_list_pages_is_an_error():
    with pytest.raises(ValueError, match="2 PRP list pages needed, 1 given"):
        prp.build(BASE, 600 * PS, PS, [L0])


def test_unaligned_prp1_rejected():
    with pytest.raises(ValueError, match="dword"):
        prp.build(BASE + 2, 512, PS)


def test_unaligned_chain_page_rejected():
    with pytest.raises(ValueError, match="page aligned"):
        prp.build(BASE, 600 * PS, PS, [L0, L1 + 8])
