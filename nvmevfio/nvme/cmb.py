"""The Controller Memory Buffer's registers (NVMe base spec 2.0, 3.1.4.12-3.1.4.15; 8.2 "Controller
Memory Buffer"). Pure: register values in, the layout and the values to write out.

CMBLOC and CMBSZ read 0 until the host sets CMBMSC.CRE (Capabilities Registers Enabled). The CMB
is then ``SZ`` units of ``4 KiB << (4 * SZU)`` at ``OFST`` units into BAR ``BIR``. The controller
recognises it in the commands it reads (a queue base, a PRP) only once CMBMSC.CMSE is set, at the
Controller Base Address (CBA) the host chose: a controller address, never a host one, so the host
picks it where no DMA address of its own can be (CMBSTS.CBAI reports a CBA the controller refuses).
"""

from __future__ import annotations

from dataclasses import dataclass

CMBMSC_CRE = 1 << 0   # Capabilities Registers Enabled
CMBMSC_CMSE = 1 << 1  # Controller Memory Space Enable
CBA_ALIGN = 4096      # CMBMSC.CBA is bits 63:12
CMBSTS_CBAI = 1 << 0  # Controller Base Address Invalid

# CMBSZ support bits (3.1.4.13)
SQS, CQS, LISTS, RDS, WDS = (1 << 0), (1 << 1), (1 << 2), (1 << 3), (1 << 4)
SUPPORT_NAMES = ((SQS, "SQS"), (CQS, "CQS"), (LISTS, "LISTS"), (RDS, "RDS"), (WDS, "WDS"))


@dataclass(frozen=True)
class CmbLayout:
    bir: int     # the BAR holding it (CMBLOC.BIR)
    offset: int  # bytes into that BAR (CMBLOC.OFST in size units)
    size: int    # bytes (CMBSZ.SZ in size units)
    support: int  # CMBSZ bits 4:0: SQS, CQS, LISTS, RDS, WDS

    @property
    def sqs(self) -> bool:
        """Submission queues may be placed in the CMB."""
        return bool(self.support & SQS)

    @property
    def supports(self) -> list[str]:
        return [name for bit, name in SUPPORT_NAMES if self.support & bit]


def size_unit(cmbsz: int) -> int:
    """CMBSZ.SZU (bits 11:8): 0h 4 KiB, 1h 64 KiB, 2h 1 MiB, 3h 16 MiB, 4h 256 MiB, 5h 4 GiB, 6h 64 GiB."""
    szu = cmbsz >> 8 & 0xF
    if szu > 6:
        raise ValueError(f"CMBSZ.SZU {szu:#x} is reserved")
    return 4096 << (4 * szu)


def layout(cmbloc: int, cmbsz: int) -> CmbLayout | None:
    """Where the CMB is and what it may hold; None when CMBSZ is 0 (no CMB, or CRE not set)."""
    if cmbsz == 0:
        return None
    unit = size_unit(cmbsz)
    return CmbLayout(bir=cmbloc & 0x7, offset=(cmbloc >> 12) * unit, size=(cmbsz >> 12) * unit,
                     support=cmbsz & 0x1F)


def cmbmsc(cba: int) -> int:
    """CMBMSC enabling the CMB's controller memory space at ``cba`` (with CRE, which it needs)."""
    if cba % CBA_ALIGN or cba <= 0:
        raise ValueError(f"CMB base address {cba:#x} is not a positive multiple of 4 KiB")
    return cba | CMBMSC_CMSE | CMBMSC_CRE
