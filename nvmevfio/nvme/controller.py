"""Controller initialization and shutdown (NVMe base spec 2.0, 3.5.1 and 3.6).

An explicit state machine: each transition does one register action and, where
the spec asks for it, one wait bounded by CAP.TO (or by RTD3E for shutdown).
64-bit registers are written as two 32-bit halves, high then low, so that a
controller that latches on the low write sees a complete value.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from nvmevfio.errors import ControllerFatal, ControllerTimeout, Refused
from nvmevfio.mmio import Mmio
from nvmevfio.nvme import regs
from nvmevfio.nvme.regs import CAP_, CC_, CSTS_

DEFAULT_SHUTDOWN_S = 5.0
MAX_SHUTDOWN_S = 60.0


class State(enum.Enum):
    UNBOUND = "unbound"
    BOUND = "bound"              # registers read, nothing written
    DISABLED = "disabled"        # CC.EN=0 and CSTS.RDY=0
    ADMIN_ARMED = "admin-armed"  # AQA/ASQ/ACQ programmed
    READY = "ready"              # CC.EN=1 and CSTS.RDY=1
    SHUTDOWN = "shutdown"        # CSTS.SHST complete
    FATAL = "fatal"              # CSTS.CFS seen


@dataclass(frozen=True)
class Registers:
    """A snapshot of the controller's registers. ``asq`` and ``acq`` are the admin queues' device
    addresses: IOVAs with an IOMMU; ``None`` when withheld (:meth:`withheld`: the broker's rule in
    the no-IOMMU lane, where they are physical addresses and never leave the broker)."""

    cap: int
    vs: int
    cc: int
    csts: int
    aqa: int = 0
    asq: int | None = 0
    acq: int | None = 0
    others: dict[str, int | None] = field(default_factory=dict)
    """The other registers nvme-cli's show-regs reads (``regs.SHOWN``: INTMS ... PMRMSCU) by
    lower-case name, when asked for (``registers(every=True)``); one beyond BAR0 is left out."""

    def withheld(self) -> Registers:
        """This snapshot without the admin queue bases (``asq``/``acq`` None) and BPMBL (a host
        memory address: ``others['bpmbl']`` None)."""
        others = {k: None if k == "bpmbl" else v for k, v in self.others.items()}
        return replace(self, asq=None, acq=None, others=others)

    def decoded(self) -> dict[str, dict[str, int]]:
        return {"cap": regs.decode_cap(self.cap), "vs": regs.decode_vs(self.vs),
                "cc": regs.decode_cc(self.cc), "csts": regs.decode_csts(self.csts)}


class Controller:
    def __init__(self, mmio: Mmio, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.mmio = mmio
        self.clock = clock
        self.sleep = sleep
        self.state = State.UNBOUND
        self.cap = 0
        self.vs = 0

    # -- reads -----------------------------------------------------------------------
    def read64(self, offset: int) -> int:
        """A 64-bit register as two 32-bit reads (low, then high)."""
        lo = self.mmio.read32(offset)
        hi = self.mmio.read32(offset + 4)
        return (hi << 32) | lo

    def write64(self, offset: int, value: int) -> None:
        """A 64-bit register as two 32-bit writes, high then low."""
        self.mmio.write32(offset + 4, value >> 32)
        self.mmio.write32(offset, value & 0xFFFFFFFF)

    def registers(self, every: bool = False) -> Registers:
        """CAP, VS, CC, CSTS, AQA, ASQ, ACQ; with ``every`` also the others nvme-cli's show-regs reads."""
        others: dict[str, int | None] = {}
        for name, offset, width in regs.SHOWN if every else ():
            try:
                others[name] = self.read64(offset) if width == 8 else self.mmio.read32(offset)
            except ValueError:  # beyond BAR0 (the PMR registers at E00h of a small BAR)
                continue
        return Registers(self.read64(regs.CAP), self.mmio.read32(regs.VS), self.mmio.read32(regs.CC),
                         self.mmio.read32(regs.CSTS), self.mmio.read32(regs.AQA), self.read64(regs.ASQ),
                         self.read64(regs.ACQ), others)

    def csts(self) -> int:
        return self.mmio.read32(regs.CSTS)

    @property
    def dstrd(self) -> int:
        return regs.get(self.cap, CAP_.DSTRD)

    @property
    def mqes(self) -> int:
        """Maximum queue entries (CAP.MQES is 0's based)."""
        return regs.get(self.cap, CAP_.MQES) + 1

    @property
    def timeout_s(self) -> float:
        return regs.timeout_ms(self.cap) / 1000.0

    def doorbell(self, qid: int, is_cq: bool) -> int:
        return regs.doorbell_offset(qid, is_cq, self.dstrd)

    # -- transitions -------------------------------------------------------------------
    def bind(self) -> Registers:
        """Read CAP and VS; nothing is written."""
        snap = self.registers()
        self.cap, self.vs = snap.cap, snap.vs
        if self.cap == 0xFFFFFFFFFFFFFFFF:
            raise ControllerFatal("CAP reads all ones: the device is gone or BAR0 is not mapped",
                                  cap=self.cap)
        self.state = State.BOUND
        return snap

    def _require(self, *states: State, reason: str, doing: str) -> None:
        if self.state not in states:
            raise Refused(reason, f"cannot {doing}: controller is {self.state.value}, needs "
                          f"{' or '.join(s.value for s in states)}", state=self.state.value)

    def check_fatal(self, csts: int | None = None) -> None:
        csts = self.csts() if csts is None else csts
        if regs.get(csts, CSTS_.CFS):
            self.state = State.FATAL
            raise ControllerFatal(
                f"controller fatal status (CSTS.CFS=1): CSTS={csts:#010x} CC={self.mmio.read32(regs.CC):#010x}",
                csts=csts, cc=self.mmio.read32(regs.CC), cap=self.cap)

    def _wait_csts(self, field: regs.Field, want: int, limit_s: float, what: str) -> int:
        deadline = self.clock() + limit_s
        delay = 1e-5
        while True:
            csts = self.csts()
            if csts == 0xFFFFFFFF:
                raise ControllerFatal(f"CSTS reads all ones while waiting for {what}: device gone", csts=csts)
            if regs.get(csts, field) == want:
                return csts
            if field is not CSTS_.SHST:
                self.check_fatal(csts)
            if self.clock() > deadline:
                raise ControllerTimeout(
                    f"timed out after {limit_s:.1f} s waiting for {what} "
                    f"(CSTS={csts:#010x}, CC={self.mmio.read32(regs.CC):#010x}, CAP.TO={regs.get(self.cap, CAP_.TO)})",
                    csts=csts, cap=self.cap)
            self.sleep(delay)
            delay = min(delay * 2, 0.01)

    def disable(self) -> None:
        """CC.EN=0, then wait CSTS.RDY=0 within CAP.TO (3.5.1 step 1-2)."""
        self._require(State.BOUND, State.DISABLED, State.ADMIN_ARMED, State.READY, State.SHUTDOWN,
                      State.FATAL, reason="controller-not-bound", doing="disable")
        cc = self.mmio.read32(regs.CC)
        if regs.get(cc, CC_.EN):
            self.mmio.write32(regs.CC, regs.put(cc, CC_.EN, 0))
        self._wait_csts(CSTS_.RDY, 0, self.timeout_s, "CSTS.RDY=0 after CC.EN=0")
        self.state = State.DISABLED

    def arm_admin_queues(self, asq: int, acq: int, sq_entries: int, cq_entries: int) -> None:
        """AQA, ASQ, ACQ (3.5.1 step 4)."""
        self._require(State.DISABLED, State.ADMIN_ARMED, reason="controller-not-disabled",
                      doing="program the admin queues")
        aqa = regs.pack({regs.AQA_.ASQS: sq_entries - 1, regs.AQA_.ACQS: cq_entries - 1})
        self.mmio.write32(regs.AQA, aqa)
        self.write64(regs.ASQ, asq)
        self.write64(regs.ACQ, acq)
        self.state = State.ADMIN_ARMED

    def choose_cc(self, host_page_size: int) -> int:
        """CC with EN=1, the command set, MPS within MPSMIN..MPSMAX, round robin, IOSQES=6, IOCQES=4."""
        css_cap = regs.get(self.cap, CAP_.CSS)
        css = regs.CSS_ALL_IO if css_cap & (1 << 6) else regs.CSS_NVM
        return regs.pack({CC_.EN: 1, CC_.CSS: css, CC_.MPS: regs.choose_mps(self.cap, host_page_size),
                          CC_.AMS: 0, CC_.SHN: 0, CC_.IOSQES: 6, CC_.IOCQES: 4})

    def enable(self, cc: int) -> None:
        """Write CC (EN=1), wait CSTS.RDY=1 within CAP.TO; CSTS.CFS raises ControllerFatal (3.5.1 step 6-7)."""
        self._require(State.ADMIN_ARMED, reason="admin-queues-not-armed", doing="enable")
        self.mmio.write32(regs.CC, cc)
        try:
            self._wait_csts(CSTS_.RDY, 1, self.timeout_s, "CSTS.RDY=1 after CC.EN=1")
        except ControllerFatal:
            self.state = State.FATAL
            raise
        self.state = State.READY

    def shutdown(self, rtd3e_us: int = 0) -> None:
        """Normal shutdown: CC.SHN=01b, wait CSTS.SHST=10b, bounded by RTD3E (3.6.1)."""
        self._require(State.READY, reason="controller-not-enabled", doing="shut down")
        limit = min(max(rtd3e_us / 1e6, DEFAULT_SHUTDOWN_S), MAX_SHUTDOWN_S)
        cc = self.mmio.read32(regs.CC)
        self.mmio.write32(regs.CC, regs.put(cc, CC_.SHN, regs.SHN_NORMAL))
        self._wait_csts(CSTS_.SHST, regs.SHST_COMPLETE, limit, "CSTS.SHST=10b (shutdown complete)")
        self.state = State.SHUTDOWN
