"""Queue pairs: the rings, command ids and in-flight table live in C (cbits/qpair.c).

Python pays per batch, C per command. One hardware action per method: ``post``
copies finished entries into the SQ, ``ring_sq`` writes the SQ tail doorbell,
``reap`` consumes completions, ``ring_cq`` writes the CQ head doorbell. The broker
authors every address inside the entries (or the PRP table of a registered buffer);
this class only moves them. The simulator drives the very same C code: its doorbells
reach the simulated controller through a callback instead of an MMIO store.
"""

from __future__ import annotations

import errno
import functools
from typing import Any

import numpy as np

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import ControllerFatal, DeviceGone, QueuePaused, Refused, ShimError
from nvmevfio.nvme.spec import CQE, SQE

CID_TAKE = 0xFFFF  # nv_qp_exec: take a command id in C


class StopFlag:
    """A flag every watching queue pair's C wait reads (``nv_qp.stop``), so that one thread can
    take every queue from the threads waiting on them: ``set()`` (the device is taken away) ends
    the waits with -ENODEV for good; ``pause()`` (a controller reset is coming) ends them with
    -EAGAIN until ``resume()``."""

    GONE, PAUSED = 1, 2

    def __init__(self) -> None:
        self.ptr = ffi.new("int32_t *")

    def set(self) -> None:
        self.ptr[0] = self.GONE

    def pause(self) -> None:
        if self.ptr[0] == 0:
            self.ptr[0] = self.PAUSED

    def resume(self) -> None:
        if self.ptr[0] == self.PAUSED:
            self.ptr[0] = 0

    @property
    def paused(self) -> bool:
        return bool(self.ptr[0] == self.PAUSED)

    def __bool__(self) -> bool:
        return bool(self.ptr[0] == self.GONE)


def ring_used(head: int, tail: int, depth: int) -> int:
    return (tail - head) % depth


def ring_free(head: int, tail: int, depth: int) -> int:
    """Free SQ slots: one slot always stays empty so that full and empty differ (3.3.1.5)."""
    return depth - 1 - ring_used(head, tail, depth)


def _struct_dtype(ctype: str, fields: list[tuple[str, str]]) -> np.dtype:
    """A numpy dtype laid out exactly like a C struct of the shim (offsets from cffi)."""
    return np.dtype({"names": [n for n, _ in fields], "formats": [f for _, f in fields],
                     "offsets": [ffi.offsetof(ctype, n) for n, _ in fields], "itemsize": ffi.sizeof(ctype)})


# What reap() returns: one record per completed command (struct nv_completion).
COMPLETION = _struct_dtype("struct nv_completion", [
    ("tag", "<i8"), ("latency_s", "<f8"), ("result", "<u4"), ("cookie", "<u4"), ("cid", "<u2"),
    ("status", "<u2"), ("opcode", "<u1"), ("result_hi", "<u4")])
UNPIN = _struct_dtype("struct nv_unpin", [("slot", "<i8"), ("generation", "<i8"), ("commands", "<i8")])
# A registered-buffer slot's PRPs (struct nv_prp_slot), authored once by the broker.
PRP_SLOT = _struct_dtype("struct nv_prp_slot", [(n, "<u8") for n in ("prp1", "prp2_page", "prp2_list", "sgl")])
if ffi.sizeof("struct nv_sqe") != SQE.itemsize or ffi.sizeof("struct nv_cqe") != CQE.itemsize:
    raise ImportError("the shim's SQE/CQE sizes differ from spec.SQE/CQE")  # pragma: no cover


@ffi.def_extern()  # type: ignore[misc]
def nv_py_doorbell(ctx: Any, offset: int, value: int) -> None:
    """A doorbell write from C, for a queue pair over a simulated controller."""
    hook: DoorbellHook = ffi.from_handle(ctx)
    try:
        hook.mmio.doorbell(int(offset), int(value))
    except BaseException as exc:  # carried back across C, raised when the C call returns
        hook.error = exc


class DoorbellHook:
    def __init__(self, mmio: Any) -> None:
        self.mmio = mmio
        self.error: BaseException | None = None
        self.handle = ffi.new_handle(self)

    def check(self) -> None:
        if self.error is not None:
            exc, self.error = self.error, None
            raise exc


def _ptr(arr: np.ndarray) -> Any:
    return ffi.cast("void *", arr.ctypes.data)


def wait_error(r: int, qid: int) -> None:
    """Raise for a negative result of a C wait: the device gone, CSTS.CFS, or another errno."""
    if r == -errno.ENODEV:
        raise DeviceGone(f"queue {qid}: CSTS reads all ones while waiting for completions: the device is gone",
                         qid=qid)
    if r == -errno.EIO:
        raise ControllerFatal(f"queue {qid}: CSTS.CFS set while waiting for completions", qid=qid, cfs=True)
    if r == -errno.EAGAIN:
        raise QueuePaused(f"queue {qid}: another thread is resetting the controller", qid=qid)
    raise ShimError("nv_qp wait", f"queue {qid}", -r)


# struct nv_qp's doorbell counters: MMIO writes, updates the EventIdx rule let go without MMIO,
# and the MMIO writes' own time (ns)
DOORBELL_COUNTERS = ("sq_mmio", "cq_mmio", "sq_shadow_only", "cq_shadow_only", "sq_mmio_ns", "cq_mmio_ns")


class QueuePair:
    """An SQ/CQ pair over broker-owned ring memory, driven by the C hot path.

    ``mmio`` is the controller's register block: a mapped BAR (``BarMmio``: doorbells are
    MMIO stores in C) or any other ``Mmio`` (the simulator's: doorbells call back into
    Python). The per-command-id table is exposed read-only as numpy views (``busy``,
    ``opcode``, ``submit_ns``, ``buf_slot``, ``buf_gen``)."""

    def __init__(self, qid: int, sq_ring: np.ndarray, cq_ring: np.ndarray, mmio: Any, sq_doorbell: int,
                 cq_doorbell: int, irq_fd: int = -1) -> None:
        if sq_ring.dtype != SQE or cq_ring.dtype != CQE or len(sq_ring) != len(cq_ring):
            raise TypeError("a queue pair is an SQE ring and a CQE ring of the same depth")
        self.qid = qid
        self.depth = len(sq_ring)
        self.sq_ring, self.cq_ring = sq_ring, cq_ring  # kept alive: C points into them
        bar = getattr(mmio, "base", None)
        qp = lib.nv_qp_new(qid, self.depth, _ptr(sq_ring), _ptr(cq_ring), bar if bar is not None else ffi.NULL,
                           sq_doorbell, cq_doorbell)
        if qp == ffi.NULL:
            raise MemoryError(f"queue pair {qid}: no memory for a {self.depth}-entry command table")
        self._qp = ffi.gc(qp, lib.nv_qp_free)
        self._hook: DoorbellHook | None = None
        if bar is None:
            self._hook = DoorbellHook(mmio)
            lib.nv_qp_set_hook(self._qp, lib.nv_py_doorbell, self._hook.handle)
        self._qp.irq_fd = irq_fd
        self.vector: int | None = None
        n = self.depth - 1
        self.ncids = n

        def view(field: str, dtype: str) -> np.ndarray:
            a = np.frombuffer(ffi.buffer(getattr(self._qp, field), n * np.dtype(dtype).itemsize), dtype=dtype)
            a.flags.writeable = False
            return a

        self.busy = view("busy", "u1")
        self.opcode = view("opcode", "u1")
        self.submit_ns = view("submit_ns", "<i8")
        self.buf_slot = view("buf_slot", "<i8")
        self.buf_gen = view("buf_gen", "<i8")
        self._cids = ffi.new("uint16_t[]", n)
        self._done = np.empty(n, dtype=COMPLETION)
        self._unpin = np.empty(n, dtype=UNPIN)
        self._done_p = ffi.cast("struct nv_completion *", self._done.ctypes.data)
        self._unpin_p = ffi.cast("struct nv_unpin *", self._unpin.ctypes.data)
        self._nunpin = ffi.new("uint32_t *")
        self.one = ffi.new("struct nv_completion *")  # the completion the exec calls fill
        # The synchronous API's hot path without a Python frame of its own (Broker.transfer):
        # exec_rw_c(opcode, flags, nsid, slba, nlb, prp1, prp2, buf_slot, buf_gen, timeout_ns, one) is
        # nv_qp_exec_rw on this queue; 0 means the completion is in ``one``. Whatever else it
        # returns, and every call with a doorbell hook (the simulator: its checks run after each
        # call), goes to exec_result().
        self.exec_rw_c = functools.partial(lib.nv_qp_exec_rw, self._qp)
        self.hooked = self._hook is not None
        self._shadow: tuple[np.ndarray, np.ndarray] | None = None
        self.saved = np.frombuffer(ffi.buffer(self._qp.saved, n * SQE.itemsize), dtype=SQE)  # entries in flight
        self.saved.flags.writeable = False
        self._over = ffi.new("uint16_t[]", n)
        self._csts: Any = None
        self._stop: Any = None

    # -- state --------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return int(self._qp.in_flight)

    @property
    def standing(self) -> int:
        """Standing commands (Asynchronous Event Requests) outstanding; not counted in ``in_flight``."""
        return int(self._qp.standing)

    @property
    def nevents(self) -> int:
        """Completions of standing commands kept aside, not yet taken (:meth:`take_events`)."""
        return int(self._qp.nevents)

    @property
    def capacity(self) -> int:
        """Commands that can be posted now (free ids and free SQ slots)."""
        return int(lib.nv_qp_capacity(self._qp))

    def state(self) -> dict[str, int]:
        """Ring indexes and counters, for tests and ``show-regs``."""
        q = self._qp
        return {k: int(getattr(q, k)) for k in (
            "sq_tail", "sq_head", "sq_rung", "cq_head", "cq_phase", "cq_rung", "free_top", "in_flight", "standing",
            "nevents", "next_tag",
            "posted", "completed", *DOORBELL_COUNTERS)}

    def busy_cids(self) -> np.ndarray:
        """Command ids in flight."""
        return np.flatnonzero(self.busy == 2)

    def watch_csts(self, address: int) -> None:
        """Read CSTS at ``address`` (the mapped register) while waiting: all ones or CFS end a wait."""
        self._csts = ffi.cast("const uint32_t *", address)
        self._qp.csts = self._csts

    def watch_stop(self, flag: StopFlag) -> None:
        """Watch ``flag`` while waiting: once set, every wait ends as if the device were gone
        (another thread is giving the device back to the kernel)."""
        self._stop = flag
        self._qp.stop = flag.ptr

    def set_irq(self, fd: int, vector: int | None) -> None:
        self._qp.irq_fd = fd
        self.vector = vector

    def set_shadow(self, shadow: np.ndarray | None, eventidx: np.ndarray | None, sq_index: int,
                   cq_index: int) -> None:
        """Shadow doorbells (Doorbell Buffer Config): ``shadow``/``eventidx`` are the broker's uint32
        pages; this queue's entries sit at the doorbell register indexes (5.8)."""
        if shadow is None or eventidx is None:
            lib.nv_qp_set_shadow(self._qp, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL)
            self._shadow = None
            return
        self._shadow = (shadow, eventidx)
        base_s, base_e = shadow.ctypes.data, eventidx.ctypes.data
        lib.nv_qp_set_shadow(self._qp, ffi.cast("void *", base_s + 4 * sq_index),
                             ffi.cast("void *", base_s + 4 * cq_index), ffi.cast("void *", base_e + 4 * sq_index),
                             ffi.cast("void *", base_e + 4 * cq_index))

    @property
    def shadow_doorbells(self) -> bool:
        return self._shadow is not None

    # -- submission ---------------------------------------------------------------------------
    def take(self, n: int) -> np.ndarray:
        """Reserve ``n`` command ids (uint16); ``queue-full`` when fewer are free."""
        if lib.nv_qp_take(self._qp, n, self._cids) < 0:
            raise Refused("queue-full", f"queue {self.qid} has room for {self.capacity} more commands, {n} asked",
                          qid=self.qid, free=self.capacity, wanted=n)
        return np.frombuffer(ffi.buffer(self._cids, 2 * n), dtype=np.uint16).copy()

    def untake(self, cids: np.ndarray) -> None:
        """Hand back ids that were taken but never posted."""
        c = np.ascontiguousarray(cids, dtype=np.uint16)
        r = lib.nv_qp_untake(self._qp, len(c), ffi.cast("uint16_t *", c.ctypes.data))
        if r < 0:
            raise ShimError("nv_qp_untake", f"queue {self.qid}", -r, "only ids taken and not posted go back")

    def post(self, entries: Any, n: int, buf_slot: int = -1, buf_gen: int = 0) -> int:
        """Copy ``n`` finished SQEs (a numpy SQE array or a bytes-like buffer of them, ids from
        :meth:`take`) into the SQ; no doorbell. Returns the first of their consecutive tags."""
        src = ffi.cast("struct nv_sqe *", entries.ctypes.data) if isinstance(entries, np.ndarray) \
            else ffi.from_buffer("struct nv_sqe[]", entries)
        first = int(lib.nv_qp_post(self._qp, src, n, buf_slot, buf_gen))
        if first < 0:
            raise ShimError("nv_qp_post", f"queue {self.qid}", -first, "entries must carry ids from take()")
        return first

    def post_slots(self, opcode: int, nsid: int, slbas: np.ndarray, nlbs: np.ndarray, slots: np.ndarray,
                   prps: np.ndarray, block_size: int, page_size: int, buf_slot: int, buf_gen: int) -> int:
        """Post READ/WRITE commands into slots of a registered buffer (PRPs from ``prps``, a
        PRP_SLOT array the broker authored); no doorbell. Returns the first tag."""
        first = int(lib.nv_qp_post_slots(
            self._qp, opcode, nsid, len(slbas), ffi.cast("uint64_t *", slbas.ctypes.data),
            ffi.cast("uint32_t *", nlbs.ctypes.data), ffi.cast("uint32_t *", slots.ctypes.data),
            ffi.cast("struct nv_prp_slot *", prps.ctypes.data), block_size, page_size, buf_slot, buf_gen))
        if first < 0:
            raise Refused("queue-full", f"queue {self.qid} has room for {self.capacity} more commands, "
                          f"{len(slbas)} asked", qid=self.qid, free=self.capacity, wanted=len(slbas))
        return first

    def post_standing(self, entry: np.ndarray) -> int:
        """Post one entry (no data pointer) as a standing command: an Asynchronous Event Request,
        outstanding until the controller has an event, never late, not in ``in_flight``. Its
        completion is kept aside for :meth:`take_events`. No doorbell. Returns its command id."""
        cid = self.take(1)
        entry["cid"] = cid[0]
        self.post(entry, 1)
        r = lib.nv_qp_make_standing(self._qp, int(cid[0]))
        if r < 0:  # pragma: no cover - the broker keeps fewer than 16 standing
            raise ShimError("nv_qp_make_standing", f"queue {self.qid}", -r, "at most 16 standing commands")
        return int(cid[0])

    def take_events(self) -> np.ndarray:
        """The COMPLETION records of standing commands that completed, oldest first (and forget them)."""
        out = np.empty(16, dtype=COMPLETION)
        n = int(lib.nv_qp_take_events(self._qp, ffi.cast("struct nv_completion *", out.ctypes.data), 16))
        return out[:n].copy()

    def drop_standing(self) -> int:
        """After CC.EN=0 (the controller forgot them): free the standing commands' ids."""
        return int(lib.nv_qp_drop_standing(self._qp))

    def ring_sq(self) -> bool:
        """Publish posted entries: the SQ tail doorbell (or its shadow). True when MMIO was written."""
        r = bool(lib.nv_qp_ring_sq(self._qp))
        if self._hook is not None:
            self._hook.check()
        return r

    # -- completion ---------------------------------------------------------------------------
    def oldest_age_s(self) -> float:
        """How long the oldest in-flight command has been waiting (0 when none)."""
        busy = self.busy_cids()
        return (int(lib.nv_now_ns()) - int(self.submit_ns[busy].min())) / 1e9 if len(busy) else 0.0

    def wait_s(self, timeout_s: float) -> bool:
        """Wait (spin or eventfd) until a completion is pending; False on timeout."""
        r = int(lib.nv_qp_wait(self._qp, int(timeout_s * 1e9)))
        if r < 0:
            wait_error(r, self.qid)
        return r == 1

    def pending(self) -> bool:
        return bool(lib.nv_qp_pending(self._qp))

    def _completions(self, r: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        if self._hook is not None:
            self._hook.check()
        if r < 0:
            if r == -errno.EPROTO:
                raise ControllerFatal(f"queue {self.qid}: completion for command id {int(self._qp.bad_cid)}, "
                                      "which is not in flight", qid=self.qid, cid=int(self._qp.bad_cid))
            wait_error(r, self.qid)
        done = self._done[:r].copy()
        k = int(self._nunpin[0])
        runs = [(int(s), int(g), int(c)) for s, g, c in self._unpin[:k].tolist()] if k else []
        return done, runs

    def reap(self, limit: int | None = None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Consume every ready completion (up to ``limit``); no doorbell. Returns the COMPLETION
        records and (buffer slot, generation, commands) per buffer they used."""
        self._nunpin[0] = 0
        r = lib.nv_qp_reap(self._qp, self._done_p, min(limit or self.ncids, self.ncids), self._unpin_p,
                           self.ncids, self._nunpin)
        return self._completions(r)

    def ring_cq(self) -> bool:
        """Tell the controller the entries up to the head are consumed: the CQ head doorbell."""
        r = bool(lib.nv_qp_ring_cq(self._qp))
        if self._hook is not None:
            self._hook.check()
        return r

    def reap_wait(self, minimum: int, timeout_s: float) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Reap (one CQ head doorbell per batch) until ``minimum`` completions or the timeout; waits
        in C by spinning or on the MSI-X eventfd. Fewer than ``minimum`` back means it timed out."""
        r = lib.nv_qp_reap_wait(self._qp, self._done_p, self.ncids, minimum, int(timeout_s * 1e9), self._unpin_p,
                                self.ncids, self._nunpin)
        return self._completions(r)

    def exec(self, entry: np.ndarray, timeout_s: float, buf_slot: int = -1,
             buf_gen: int = 0) -> tuple[int, int] | None:
        """One command start to end on an idle queue: post, ring, wait, reap (one C call). The
        entry's cid is one from :meth:`take`, or CID_TAKE. Returns its (status without the phase
        tag, DW1:DW0), or None when it timed out (the command stays in flight)."""
        r = lib.nv_qp_exec(self._qp, ffi.cast("struct nv_sqe *", entry.ctypes.data), buf_slot, buf_gen,
                           int(timeout_s * 1e9), self.one)
        return self.exec_result(r)

    def exec_result(self, r: int) -> tuple[int, int] | None:
        """What an exec call's return value ``r`` means: (status, DW1:DW0 as one 64-bit value: DW1 is
        Zone Append's LBA's high half), None when the command timed out (it stays in flight)."""
        if self._hook is not None:
            self._hook.check()
        if r == -errno.ETIMEDOUT:
            return None
        if r == -errno.EBUSY:
            raise Refused("queue-busy", f"queue {self.qid} has {self.in_flight} batched commands in flight; "
                          "reap them first", qid=self.qid, in_flight=self.in_flight)
        if r < 0:
            self._completions(r)
        return self.one.status, self.one.result | self.one.result_hi << 32

    def exec_rw(self, opcode: int, nsid: int, slba: int, nlb: int, prp1: int, prp2: int, timeout_ns: int,
                buf_slot: int = -1, buf_gen: int = 0, flags: int = 0) -> tuple[int, int] | None:
        """:meth:`exec` for one READ or WRITE without a PRP list, the entry built in C from its
        fields (``nv_qp_exec_rw``): the synchronous API's hot path."""
        one = self.one
        r = self.exec_rw_c(opcode, flags, nsid, slba, nlb, prp1, prp2, buf_slot, buf_gen, timeout_ns, one)
        if r == 0 and not self.hooked:
            return one.status, one.result
        return self.exec_result(r)

    # -- recovery --------------------------------------------------------------------------------
    def reset_rings(self) -> None:
        """After the broker zeroed the ring memory and the controller was reset: indexes to 0."""
        lib.nv_qp_reset_rings(self._qp)

    def repost(self, max_retries: int) -> tuple[int, list[int]]:
        """Requeue every in-flight command (same id and tag); returns the count and the ids that
        were already requeued ``max_retries`` times (not requeued: cancel them). No doorbell."""
        nover = ffi.new("uint32_t *")
        n = int(lib.nv_qp_repost(self._qp, max_retries, self._over, nover))
        return n, [int(self._over[i]) for i in range(nover[0])]

    def cancel(self, cid: int, status: int) -> tuple[np.ndarray, tuple[int, int]]:
        """End in-flight command ``cid`` with ``status`` (no device completion: the controller was
        disabled). Returns its COMPLETION record and its buffer (slot, generation)."""
        slot, gen = int(self.buf_slot[cid]), int(self.buf_gen[cid])
        out = ffi.new("struct nv_completion *")
        if lib.nv_qp_cancel(self._qp, cid, status, out) < 0:
            raise ValueError(f"queue {self.qid}: command id {cid} is not in flight")
        return np.frombuffer(ffi.buffer(out), dtype=COMPLETION).copy(), (slot, gen)

    # -- perf -----------------------------------------------------------------------------------
    def perf_run(self, perf: Any, slice_s: float, drain: bool) -> int:
        r = int(lib.nv_perf_run(self._qp, perf, int(slice_s * 1e9), int(drain)))
        if self._hook is not None:
            self._hook.check()
        return r
