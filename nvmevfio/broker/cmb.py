"""The Controller Memory Buffer (NVMe 2.0 8.2, registers 3.1.4.12-15): found, mapped and enabled
at a controller address the broker chooses, and I/O submission queues placed in it.

The controller address (CMBMSC.CBA) must be one no DMA address of the broker's can ever be, or
the controller would read a caller's buffer from its own memory: with an IOMMU the broker
reserves that much IOVA space in its ledger (never mapped, never handed out); without one the
device sees physical addresses, and the BAR's own bus address is the one no RAM can have (Linux
does the same, nvme_map_cmb)."""

from __future__ import annotations

import numpy as np

from nvmevfio.broker.core import Core
from nvmevfio.errors import Refused
from nvmevfio.nvme import cmb, regs
from nvmevfio.nvme.cmb import CmbLayout
from nvmevfio.nvme.spec import SQE

CMBMSC, CMBSTS = regs.CMBMSC, regs.CMBSTS


class ControllerMemory:
    def __init__(self, core: Core) -> None:
        self.core = core
        self.layout: CmbLayout | None = None
        self.memory: np.ndarray | None = None  # the CMB's bytes, in its BAR's mapping
        self.cba = 0

    def discover(self) -> CmbLayout | None:
        """CAP.CMBS set: CMBMSC.CRE, then CMBLOC and CMBSZ read (0 before CRE). None: no CMB."""
        core = self.core
        if not regs.get(core.ctrl.cap, regs.CAP_.CMBS):
            return None
        core.mmio.write32(CMBMSC, cmb.CMBMSC_CRE)
        return cmb.layout(core.mmio.read32(regs.CMBLOC), core.mmio.read32(regs.CMBSZ))

    def place_sqs(self, count: int, depth: int) -> list[tuple[np.ndarray, int]]:
        """Room for ``count`` submission queues of ``depth`` entries in the CMB, each page aligned:
        (its memory, its controller address). Enables the CMB the first time. Refused, before any
        queue exists, where the controller has no CMB, it may not hold SQs (CMBSZ.SQS), the broker
        cannot reach its BAR, or the queues do not fit (all ``cmb-unavailable``)."""
        self.enable()
        assert self.memory is not None
        per = -(-depth * SQE.itemsize // self.core.page_size) * self.core.page_size
        if count * per > len(self.memory):
            raise Refused("cmb-unavailable", f"{count} submission queues of {depth} entries need {count * per} bytes; "
                          f"the Controller Memory Buffer has {len(self.memory)}", size=len(self.memory))
        return [(self.memory[i * per : (i + 1) * per], self.cba + i * per) for i in range(count)]

    def enable(self) -> None:
        if self.memory is not None:
            self.program()
            return
        core = self.core
        lay = self.discover()
        if lay is None:
            raise Refused("cmb-unavailable", f"the controller has no Controller Memory Buffer (CAP.CMBS "
                          f"{regs.get(core.ctrl.cap, regs.CAP_.CMBS)}, or CMBSZ 0)")
        if not lay.sqs:
            raise Refused("cmb-unavailable", f"the Controller Memory Buffer may not hold submission queues "
                          f"(CMBSZ.SQS 0; it supports {', '.join(lay.supports) or 'nothing'})",
                          supports=lay.supports)
        if core.bar_map is None:
            raise Refused("cmb-unavailable", f"BAR{lay.bir}, which holds the Controller Memory Buffer, is out of "
                          "the broker's reach here")
        bar, bus_address = core.bar_map(lay.bir)
        if lay.offset + lay.size > len(bar):
            raise Refused("cmb-unavailable", f"CMBLOC/CMBSZ place the CMB at {lay.offset:#x}+{lay.size:#x}, past "
                          f"BAR{lay.bir}'s {len(bar):#x} bytes", bar=lay.bir)
        ledger = core.ledger
        self.cba = bus_address + lay.offset if ledger.pool is not None else \
            ledger.reserve_device_range(lay.size, cmb.CBA_ALIGN)
        self.layout, self.memory = lay, bar[lay.offset : lay.offset + lay.size]
        self.program()

    def program(self) -> None:
        """CMBMSC: CBA with CMSE and CRE, the high dword first (the low one enables it); CMBSTS.CBAI
        says whether the controller took the address. Again after a controller reset."""
        core = self.core
        value = cmb.cmbmsc(self.cba)
        core.mmio.write32(CMBMSC + 4, value >> 32)
        core.mmio.write32(CMBMSC, value & 0xFFFFFFFF)
        if core.mmio.read32(CMBSTS) & cmb.CMBSTS_CBAI:
            raise Refused("cmb-unavailable", "the controller refused the CMB's base address the broker chose "
                          "(CMBSTS.CBAI)")
