"""What every part of the broker shares: its limits, the checks of a caller's numbers, the
namespace record, and the queue pair with its PRP-list pages. Imports nothing of the broker."""

from __future__ import annotations

import operator
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import Refused
from nvmevfio.nvme import prp, sgl
from nvmevfio.nvme.pi import Protection
from nvmevfio.nvme.queue import QueuePair
from nvmevfio.nvme.spec import SQE

ADMIN_DEPTH = 32
FORMAT_TIMEOUT_S = 600.0  # Format NVM and Sanitize may take long on real media
DEFAULT_IO_DEPTH = 128
# Per-command transfer cap, also when MDTS=0 ("no limit"). Linux caps at 4 MiB too
# (NVME_MAX_KB_SZ); QEMU's model fails larger transfers whose pages are not
# physically contiguous (its scatter list is bounded by IOV_MAX = 1024 pages).
UNLIMITED_MDTS_CAP = 4 << 20
DEFAULT_STAGING = 8 << 20
COMMAND_TIMEOUT_S = 30.0
MAX_NLB = 1 << 16  # NLB is a 16-bit 0's based field
DSM_MAX_RANGES = 256
ONCS_WRITE_ZEROES = 1 << 3
ONCS_DSM = 1 << 2
OACS_DBBUF = 1 << 8  # Doorbell Buffer Config supported (Identify Controller OACS bit 8)
# Up to this many entries a batch is packed entry by entry (cheaper than numpy's per-call cost).
SCALAR_BATCH = 8
# Recovery (Linux's nvme driver keeps to the same shape: timeout -> abort -> reset -> requeue).
MAX_RETRIES = 5  # requeues of one command across resets, and retries of a transient status
RESET_LIMIT = 3  # controller resets within RESET_WINDOW_S before the controller is declared failed
RESET_WINDOW_S = 60.0
ABORT_TIMEOUT_S = 2.0  # how long an Abort (admin 08h) may take before the broker resets instead
# A command ended by the broker after a reset (no device completion): Command Abort Requested, DNR.
CANCELLED_STATUS = (1 << 14) | 0x07
# Generic statuses worth retrying when DNR=0 (NVMe 2.0 Figure 101): Command Abort Requested,
# Command Interrupted, Transient Transport Error, Namespace Not Ready.
TRANSIENT = {0x07, 0x21, 0x22, 0x82}



def nothing() -> None:
    """A hook not wired yet."""


def int_array(x: Any, what: str) -> np.ndarray:
    """LBAs, counts or offsets as int64; integral floats (np.ones) are fine, fractions are refused."""
    a = np.asarray(x)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False).reshape(-1)
    if a.dtype.kind != "f" or not np.isfinite(a).all() or (a != np.floor(a)).any():
        raise Refused("invalid-argument", f"{what} must be whole numbers, got {a.tolist()!r:.80}", what=what)
    return a.astype(np.int64).reshape(-1)


def whole(x: Any, what: str) -> int:
    """One LBA, count or offset: an int or numpy integer (not a bool, not a float); else refused."""
    if not isinstance(x, (bool, np.bool_)):
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise Refused("invalid-argument", f"{what} must be a whole number, got {x!r:.40}", what=what)


def ints(x: Any, what: str) -> list[int]:
    """The same, as Python ints, without numpy for plain lists of ints."""
    if isinstance(x, (list, tuple)) and all(type(v) is int for v in x):
        return list(x)
    return int_array(x, what).tolist()


def byte_view(x: Any, what: str) -> np.ndarray:
    """A bytes-like object or numpy array as flat uint8 (no copy when it is contiguous); else refused."""
    try:
        return np.frombuffer(memoryview(x).cast("B"), dtype=np.uint8) if not isinstance(x, np.ndarray) \
            else np.ascontiguousarray(x).reshape(-1).view(np.uint8)
    except (TypeError, ValueError) as exc:
        raise Refused("invalid-argument", f"{what} must be a contiguous bytes-like object or a numpy array of "
                      f"plain numbers ({exc})", type=type(x).__name__) from exc


def data_blocks(ledger: Any, iova: int, length: int) -> list[tuple[int, int, int]]:
    """SGL Data Block extents (4.1.2) for ``length`` bytes at ``iova``: one per range the device
    sees as contiguous (``DmaLedger.device_ranges``: one with an IOMMU)."""
    return [(sgl.DescriptorType.DATA_BLOCK, a, n) for a, n in ledger.device_ranges(iova, length)]


class FunctionReset(Protocol):
    """The PCI function's own resets (:class:`nvmevfio.vfio.VfioFunction`): ``flr`` and ``hot``."""

    def reset_unavailable(self, kind: str) -> str | None: ...
    def function_reset(self, kind: str) -> None: ...


class IrqWaiter(Protocol):
    """MSI-X: one eventfd per vector; the C queue pair waits on it with poll(2)."""

    def vectors(self, count: int) -> None: ...
    def fd(self, vector: int) -> int: ...
    def close(self) -> None: ...


@dataclass
class Namespace:
    nsid: int
    size_blocks: int  # NSZE
    capacity_blocks: int  # NCAP
    used_blocks: int  # NUSE
    block_size: int
    metadata_size: int
    lba_format: int
    identify: dict[str, Any] = field(repr=False)
    pif: int = 0  # Protection Information Format of the LBA format in use: 0 16-bit guard, 2 64-bit
    zoned: Zoned | None = None  # a Zoned Namespace (CSI 02h): its zone geometry


    @property
    def size_bytes(self) -> int:
        return self.size_blocks * self.block_size

    @property
    def extended_lba(self) -> bool:
        """FLBAS bit 4: metadata travels at the end of each block's data (no metadata pointer)."""
        return bool(int(self.identify.get("flbas", 0)) & 0x10)

    @property
    def protection(self) -> Protection | None:
        """End-to-end protection (Identify Namespace DPS: type 2:0, the tuple first bit 3; the
        guard's format), None for type 0 or metadata too small for a tuple."""
        dps = int(self.identify.get("dps", 0))
        prot = Protection(dps & 7, self.metadata_size, bool(dps & 8), self.pif)
        return prot if dps & 7 and self.metadata_size >= prot.tuple_bytes else None


@dataclass(frozen=True)
class Zoned:
    """A zoned namespace's geometry (ZNS 1.1 Identify, CNS 05h/06h with CSI 02h), in blocks."""

    zone_size: int  # ZSZE of the LBA format in use
    zones: int  # NSZE / ZSZE
    max_active: int | None  # MAR + 1; None: no limit
    max_open: int | None  # MOR + 1
    append_limit: int  # bytes one Zone Append may carry: ZASL (units of CAP.MPSMIN), MDTS when 0
    extension_bytes: int  # the zone descriptor extension's size (ZDES * 64)
    identify: dict[str, Any] = field(repr=False)  # the ZNS Identify Namespace, parsed

    def zone_start(self, lba: int) -> int:
        return lba - lba % self.zone_size


class BrokerQueue:
    """An I/O (or admin) queue pair: the C rings and command table (``ring``) plus the broker's
    PRP-list pages for it, one set per command id."""

    def __init__(self, qid: int, ring: QueuePair, buffers: list[DmaBuffer], prp_base: int, prp_pages_per_cmd: int,
                 prp_array: np.ndarray | None, page_size: int) -> None:
        self.qid = qid
        self.ring = ring
        self.buffers = buffers
        self.prp_base = prp_base
        self.prp_pages = prp_pages_per_cmd
        self.prp_array = prp_array  # uint64 view of the PRP-list memory
        self.prp_dev: np.ndarray | None = None  # its pages' device addresses, for a service session's C path
        self.page_size = page_size
        self.packed = bytearray(ring.depth * SQE.itemsize)  # small batches are packed here, then posted
        self.cancelled: list[np.ndarray] = []  # records of commands the broker ended (reap returns them first)
        self.lock = threading.RLock()  # one thread at a time per queue pair; others are refused queue-busy
        self.owner: int | None = None  # the thread holding ``lock`` (a controller reset needs to know)
        self.vector: int | None = None
        # the SQ's and CQ's memory and the addresses the controller knows them by (CREATE I/O SQ/CQ
        # PRP1, ASQ/ACQ); the SQ may live in the Controller Memory Buffer (``sq_in_cmb``)
        self.rings: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.uint8), np.empty(0, np.uint8))
        self.sq_address = 0
        self.cq_address = 0
        self.sq_in_cmb = False

    @property
    def in_flight(self) -> int:
        return self.ring.in_flight

    @property
    def capacity(self) -> int:
        return self.ring.capacity

    def prp_list_iovas(self, cid: int) -> list[int]:
        base = self.prp_base + cid * self.prp_pages * self.page_size
        return [base + k * self.page_size for k in range(self.prp_pages)]

    def author_prps(self, cid: int, iova: int, length: int) -> tuple[int, int]:
        """PRP1 and PRP2 for command ``cid``, writing its PRP-list pages (in this queue's list
        area) when the transfer needs them."""
        p = prp.build(iova, length, self.page_size, self.prp_list_iovas(cid))
        self.write_lists(cid, p.lists)
        return p.prp1, p.prp2

    def author_sgl(self, cid: int, extents: list[tuple[int, int, int]], device_address: Any) -> tuple[int, int]:
        """SGL1 (the PRP1 and PRP2 fields) for command ``cid`` whose data is ``extents`` (Data
        Block or Bit Bucket, addresses already the device's), writing its SGL segments into the
        command's pages of this queue's list area when there is more than one descriptor. The
        segment pointers are device addresses (``device_address``: the no-IOMMU lane's translation)."""
        need = sgl.list_pages_for(len(extents), self.page_size)
        if need > self.prp_pages:
            raise Refused("count-out-of-range", f"{len(extents)} SGL descriptors need {need} list pages; this queue "
                          f"has {self.prp_pages} per command", descriptors=len(extents))
        s = sgl.build(extents, self.page_size, [device_address(a) for a in self.prp_list_iovas(cid)[:need]])
        self.write_lists(cid, s.lists, "SGL segment")
        return s.sgl1

    def write_lists(self, cid: int, lists: tuple[np.ndarray, ...], what: str = "PRP-list") -> None:
        """Command ``cid``'s PRP-list pages (or SGL segments) into its part of this queue's list area."""
        if not lists:
            return
        if self.prp_array is None or len(lists) > self.prp_pages:
            raise Refused("count-out-of-range", f"{len(lists)} {what} pages needed; this queue has "
                          f"{self.prp_pages} per command", pages=len(lists))
        per = self.page_size // 8
        base = cid * self.prp_pages * per
        for k, page in enumerate(lists):
            self.prp_array[base + k * per : base + k * per + len(page)] = page


@dataclass(frozen=True, eq=False)
class RegisteredBuffer:
    """A DMA buffer registered with the broker, cut into equal slots whose PRP entries and
    PRP-list pages were authored once (like io_uring's fixed buffers). A command names a slot;
    the C path copies the slot's pre-authored PRPs. Holds no address a caller can use: the PRP
    table (device addresses; physical ones in the no-IOMMU lane) is the broker's, private here."""

    buffer: DmaBuffer
    slot_size: int
    slots: int
    _prps: np.ndarray = field(repr=False)  # PRP_SLOT per slot, read only: for the C path alone
    _lists: DmaBuffer | None = field(repr=False)

    @property
    def array(self) -> np.ndarray:
        return self.buffer.array

    @property
    def size(self) -> int:
        return self.buffer.size

