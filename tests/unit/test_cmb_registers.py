"""The Controller Memory Buffer's registers (NVMe 2.0 3.1.4.12-15): exact values."""

import pytest

from nvmevfio.nvme import cmb


def test_layout_from_cmbloc_and_cmbsz():
    # QEMU's nvme with cmb_size_mb=4: CMBLOC.BIR 2, OFST 0; CMBSZ SZU 2 (1 MiB units), SZ 4,
    # SQS LISTS RDS WDS (0x1d)
    lay = cmb.layout(0x2, (4 << 12) | (2 << 8) | 0x1D)
    assert lay == cmb.CmbLayout(bir=2, offset=0, size=4 << 20, support=0x1D)
    assert lay.sqs and lay.supports == ["SQS", "LISTS", "RDS", "WDS"]
    # 64 KiB units, 3 of them, at 2 units into BAR 4; CQS only
    lay = cmb.layout((2 << 12) | 4, (3 << 12) | (1 << 8) | 0x2)
    assert (lay.bir, lay.offset, lay.size, lay.sqs, lay.supports) == (4, 128 << 10, 192 << 10, False, ["CQS"])
    assert cmb.layout(0, 0) is None  # no CMB, or CMBMSC.CRE not set yet


def test_size_units():
    assert [cmb.size_unit(u << 8) for u in range(7)] == [4096, 64 << 10, 1 << 20, 16 << 20, 256 << 20, 4 << 30,
                                                           64 << 30]
    with pytest.raises(ValueError):
        cmb.size_unit(7 << 8)


def test_cmbmsc_value():
    assert cmb.cmbmsc(0x8000_0000_0000) == 0x8000_0000_0003  # CBA, CMSE, CRE
    with pytest.raises(ValueError):
        cmb.cmbmsc(0x1234)  # CBA is bits 63:12
