"""The service daemon's compiled data path (``nvmevfio serve``): what a session's C pump needs of
its queue pair (page size, MDTS, ONCS, the PRP-list pages), each client buffer's page table,
the steady state in C (``nv_svc_serve``) with what only the broker can do done in Python
(recovery, a reset's ended commands completed to the client), and the validator lane's entries
(Model B: the broker authors PRP2 from the pages :mod:`nvmevfio.service.validator` checked)."""

from __future__ import annotations

import contextlib
import errno
from typing import Any

import numpy as np

from nvmevfio._ffi import ffi, lib
from nvmevfio.broker.common import BrokerQueue
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, take_cancelled
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.dma import DmaBuffer
from nvmevfio.errors import DeviceGone, ShimError
from nvmevfio.nvme import prp
from nvmevfio.nvme.spec import SQE


class ServicePath:
    def __init__(self, core: Core, ex: Executor, ns: Namespaces) -> None:
        self.core = core
        self.ex = ex
        self.ns = ns

    def service_attach(self, qid: int, svc: Any) -> None:
        """Give a service session (``struct nv_svc``, cbits/service.c) what it needs of I/O queue
        ``qid``: the page size, MDTS, ONCS, and the queue's PRP-list pages with their device
        addresses, which C fills from the session's page tables (:meth:`service_buffer`) or, for
        a deallocate, with its one range."""
        core = self.core
        qp = core.queue(qid)
        ps = core.page_size
        svc.page_size, svc.max_pages, svc.max_transfer = ps, self.ns.max_pages, core.max_transfer
        svc.oncs = int((core.id_ctrl or {}).get("oncs", 0))  # which of Write Zeroes and DSM C may post
        svc.ncids = qp.ring.ncids
        svc.prp_pages = qp.prp_pages if qp.prp_array is not None else 0
        if qp.prp_array is not None:
            dev = qp.prp_base + ps * np.arange(qp.ring.ncids * qp.prp_pages, dtype=np.uint64)
            core.ledger.translate(dev)  # the no-IOMMU lane's physical addresses; else nothing
            qp.prp_dev = dev  # kept alive with the queue: C points into it
            svc.prp_area = ffi.cast("uint64_t *", qp.prp_array.ctypes.data)
            svc.prp_dev = ffi.cast("uint64_t *", dev.ctypes.data)

    def service_buffer(self, entry: Any, buf: DmaBuffer) -> None:
        """Describe a caller buffer to a service session's C path (``struct nv_svc_buffer``): the
        device address of each of its memory pages (authored here, translated in the no-IOMMU
        lane; kept by the broker until the buffer is freed), the caller's memory and, in the
        no-IOMMU lane, the device-visible shadow C copies through."""
        ledger = self.core.ledger
        base = ledger.iova(buf)
        ps = self.core.page_size
        pages = base + ps * np.arange(-(-buf.size // ps), dtype=np.uint64)
        ledger.translate(pages)
        memory, shadow = ledger.bounce_arrays(buf)
        self.core.service_pages[(buf.slot, buf.generation)] = pages
        entry.generation, entry.size = buf.generation, buf.size
        entry.pages, entry.npages = ffi.cast("uint64_t *", pages.ctypes.data), len(pages)
        entry.user = ffi.cast("uint8_t *", memory.ctypes.data)
        entry.shadow = ffi.cast("uint8_t *", shadow.ctypes.data) if shadow is not None else ffi.NULL
        entry.ledger_slot, entry.ledger_gen = buf.slot, buf.generation

    def service_serve(self, sessions: list[tuple[int, Any]], watch: list[int], timeout_s: float,
                      idle_spin_s: float = 0.0) -> tuple[int, int]:
        """Run the service's steady state in C (``nv_svc_serve``) over ``sessions`` ((qid, struct
        nv_svc) pairs) until Python is needed: returns (event, session index), event one of
        ``lib.NV_SVC_*``. What only the broker can do is done here first: a late command is
        recovered (abort, reset), a reset by another thread waited for, and commands the broker
        ended are completed to their clients with their status; a completion for an id not in
        flight, or a gone device, raises. ``idle_spin_s``: on polled queues, how long the loop
        keeps spinning after its last work before it sleeps."""
        core, ex = self.core, self.ex
        qps = [core.queue(qid) for qid, _ in sessions]
        n = len(sessions)
        svcs = ffi.new("struct nv_svc *[]", max(n, 1))
        rings = ffi.new("struct nv_qp *[]", max(n, 1))
        for i, ((_, svc), qp) in enumerate(zip(sessions, qps)):
            svcs[i], rings[i] = svc, qp.ring._qp
        fds = ffi.new("int[]", watch or [0])
        which = ffi.new("uint32_t *")
        before = sum(qp.ring._qp.completed for qp in qps)
        with contextlib.ExitStack() as held:
            for qp in qps:
                held.enter_context(ex.using(qp))
            r = int(lib.nv_svc_serve(svcs, rings, n, fds, len(watch), int(core.command_timeout_s * 1e9),
                                     int(timeout_s * 1e9), int(idle_spin_s * 1e9), which))
            core.commands_completed += sum(qp.ring._qp.completed for qp in qps) - before
            i = int(which[0])
            if r == lib.NV_SVC_LATE:
                ex.recovery.recover_timeout(qps[i])
            elif r == -errno.EAGAIN:
                core.park()  # another thread's reset requeued (or cancelled) ours
            elif r == -errno.ENODEV:
                ex.recovery.gone_raise(DeviceGone(f"queue {qps[i].qid}: the device was taken away", qid=qps[i].qid))
            elif r == -errno.EPROTO:
                ex.reap(qps[i], 0, 0.0)  # names the completion whose id is not in flight
            elif r < 0:
                raise ShimError("nv_svc_serve", f"queue {qps[i].qid}", -r)
            for (_, svc), qp in zip(sessions, qps):
                self._service_ended(qp, svc)
        return r, i

    def _service_ended(self, qp: BrokerQueue, svc: Any) -> None:
        """Commands of a service session the broker ended itself (after a reset): to the client."""
        for records in take_cancelled(qp):
            self._service_complete(svc, records)

    @staticmethod
    def _service_complete(svc: Any, records: np.ndarray) -> None:
        """COMPLETION records of a service session's commands into its client's ring."""
        if len(records):
            records = np.ascontiguousarray(records)
            lib.nv_svc_complete(svc, ffi.cast("struct nv_completion *", records.ctypes.data), len(records))

    def service_pump(self, qid: int, svc: Any) -> int:
        """Take, check and post what a service session's client published (``nv_svc_pump``)."""
        qp = self.core.queue(qid)
        with self.ex.using(qp):
            return int(lib.nv_svc_pump(svc, qp.ring._qp))

    def service_drain(self, qid: int, svc: Any) -> None:
        """Reap a service session's commands until none is in flight on its queue, completing each
        to the client; late ones are recovered as every reap's are."""
        qp = self.core.queue(qid)
        with self.ex.using(qp):
            while qp.in_flight or qp.cancelled:
                self._service_complete(svc, self.ex.reap(qp, 1, None))

    def submit_validated(self, qid: int, sqe: np.ndarray, pages: np.ndarray, *, doorbell: bool = True) -> int:
        """Post one entry the Model B validator accepted (nvmevfio/service/validator.py): ``sqe``
        is the validator's copy (its LBAs already moved into the window, PRP1 checked), ``pages``
        the checked data-page addresses after PRP1's. The broker authors PRP2 from them, the page
        itself or a list in this queue's own list pages, so the device never follows a list the
        client could rewrite. The caller keeps the client's buffers from being freed until the
        command completes. Returns its tag (one thread per queue)."""
        qp = self.core.queue(qid)
        with self.ex.using(qp):
            e = np.array(sqe, dtype=SQE).reshape(1)
            cids = qp.ring.take(1)
            try:
                cid = int(cids[0])
                e["cid"] = cid
                if len(pages) <= 1:
                    e["prp2"] = int(pages[0]) if len(pages) else 0
                else:
                    lists = prp.list_pages(np.asarray(pages, dtype=np.uint64), self.core.page_size,
                                           qp.prp_list_iovas(cid))
                    qp.write_lists(cid, lists)
                    e["prp2"] = qp.prp_list_iovas(cid)[0]
                self.ex.for_device(qp, e)
                first = qp.ring.post(e, 1)
            except BaseException:
                qp.ring.untake(cids)
                raise
            if doorbell:
                qp.ring.ring_sq()
            return first
