"""SGL descriptors (NVMe base 2.0, 4.1.2): exact values."""

import numpy as np
import pytest

from nvmevfio.nvme import sgl
from nvmevfio.nvme.sgl import DescriptorType as T


def test_descriptor_words():
    # Data Block: identifier 00h, so the second quadword is the length alone
    assert sgl.data_block(0x1234_5000, 8192) == (0x1234_5000, 8192)
    # Bit Bucket: identifier 10h in byte 15, the address ignored (0)
    assert sgl.bit_bucket(512) == (0, 0x1000_0000_0000_0200)
    assert sgl.descriptor(T.LAST_SEGMENT, 0x9000, 48) == (0x9000, 0x3000_0000_0000_0030)
    assert sgl.descriptor(T.SEGMENT, 0x9000, 4096) == (0x9000, 0x2000_0000_0000_1000)
    with pytest.raises(ValueError):
        sgl.descriptor(T.DATA_BLOCK, 0, 1 << 32)


def test_sgls_decoding():
    assert sgl.supported(0x10001) and sgl.bit_bucket_supported(0x10001) and not sgl.dword_aligned(0x10001)
    assert sgl.supported(0x2) and sgl.dword_aligned(0x2) and not sgl.bit_bucket_supported(0x2)
    assert not sgl.supported(0) and not sgl.supported(0x3) and not sgl.bit_bucket_supported(0x10000)


def test_one_extent_is_sgl1_itself():
    s = sgl.build([(T.DATA_BLOCK, 0x20000, 131072)], 4096)
    assert s.sgl1 == (0x20000, 131072) and s.lists == ()


def test_a_few_extents_are_one_last_segment():
    s = sgl.build([(T.DATA_BLOCK, 0x20000, 1024), (T.BIT_BUCKET, 0xdead, 2048), (T.DATA_BLOCK, 0x80000, 512)],
                  4096, [0x7000, 0x8000])
    assert s.sgl1 == (0x7000, 0x3000_0000_0000_0030)  # Last Segment, 3 descriptors * 16 bytes
    assert len(s.lists) == 1
    assert s.lists[0].tolist() == [0x20000, 1024, 0, 0x1000_0000_0000_0800, 0x80000, 512]


def test_long_lists_chain_segments():
    # 256 descriptors a 4 KiB page: 600 descriptors are 255 + a Segment pointer, 255 + a Last
    # Segment pointer, and 90
    ext = [(T.DATA_BLOCK, 0x100000 + 0x1000 * k, 4096) for k in range(600)]
    s = sgl.build(ext, 4096, [0xA000, 0xB000, 0xC000])
    assert sgl.list_pages_for(600, 4096) == 3
    assert s.sgl1 == (0xA000, 0x2000_0000_0000_0000 | 256 * 16)  # Segment: the whole first page
    p0, p1, p2 = (x.reshape(-1, 2) for x in s.lists)
    assert len(p0) == 256 and p0[0].tolist() == [0x100000, 4096] and p0[254].tolist() == [0x100000 + 0xFE000, 4096]
    assert p0[255].tolist() == [0xB000, 0x2000_0000_0000_0000 | 256 * 16]  # next page: full, a Segment
    assert len(p1) == 256 and p1[0].tolist() == [0x100000 + 0xFF000, 4096]
    assert p1[255].tolist() == [0xC000, 0x3000_0000_0000_0000 | 90 * 16]  # the last page: Last Segment
    assert len(p2) == 90 and p2[-1].tolist() == [0x100000 + 0x1000 * 599, 4096]
    # every data descriptor once, in order
    data = np.concatenate([p0[:255], p1[:255], p2])
    assert data[:, 0].tolist() == [0x100000 + 0x1000 * k for k in range(600)]


def test_exactly_one_page_of_descriptors_needs_no_chain():
    ext = [(T.DATA_BLOCK, 0x1000 * k, 512) for k in range(256)]
    s = sgl.build(ext, 4096, [0xA000])
    assert sgl.list_pages_for(256, 4096) == 1 and s.sgl1 == (0xA000, 0x3000_0000_0000_1000)
    assert sgl.list_pages_for(257, 4096) == 2


def test_refusals():
    with pytest.raises(ValueError):
        sgl.build([], 4096)
    with pytest.raises(ValueError):
        sgl.build([(T.DATA_BLOCK, 0, 512), (T.DATA_BLOCK, 0x1000, 512)], 4096, [])  # no list page
    with pytest.raises(ValueError):
        sgl.build([(T.SEGMENT, 0, 512)], 4096)
    with pytest.raises(ValueError):
        sgl.build([(T.DATA_BLOCK, 0, 0)], 4096)


def test_vectorized_data_blocks():
    p1, p2 = sgl.data_block_words(np.array([0x1000, 0x2200]), np.array([4096, 512]))
    assert p1.tolist() == [0x1000, 0x2200] and p2.tolist() == [4096, 512] and p2.dtype == np.uint64
