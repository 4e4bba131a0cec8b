"""Asynchronous events (5.2): Asynchronous Event Configuration, Asynchronous Event Requests kept
outstanding (standing commands in C, never late), each event's log page read (RAE=0 clears it),
the namespace table refreshed after a namespace notice, and delivery to poll_events(), the
callbacks and the watcher thread. The state is :class:`~nvmevfio.broker.state.EventState`."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from nvmevfio import events as decode
from nvmevfio.broker.common import CANCELLED_STATUS
from nvmevfio.broker.core import Core
from nvmevfio.broker.execute import Executor, command_sqe
from nvmevfio.broker.namespaces import Namespaces
from nvmevfio.broker.state import EVENT_POLL_S
from nvmevfio.errors import CommandError, NvmeVfioError
from nvmevfio.nvme import builders, spec, structures

log = logging.getLogger("nvmevfio")


class Events:
    def __init__(self, core: Core, ex: Executor, ns: Namespaces) -> None:
        self.core = core
        self.ex = ex
        self.ns = ns
        self.state = core.events

    def arm_if_wanted(self) -> None:
        """After Identify Controller: arm the events once, when they are on."""
        if self.state.enabled and not self.state.armed:
            self.arm()

    def arm(self) -> None:
        """Asynchronous Event Configuration (Set Features 0Bh: the SMART/health critical warnings,
        and the notices OAES offers), then Asynchronous Event Requests outstanding."""
        qp, ident, st = self.core.admin, self.core.id_ctrl, self.state
        if qp is None or ident is None:
            return
        aec = structures.AEC_SMART_WARNINGS | (int(ident["oaes"]) & structures.AEC_NOTICES_FROM_OAES)
        try:
            self.ex.exec(qp, command_sqe(builders.set_async_event_configuration(aec)),
                         "Set Features (Asynchronous Event Configuration)")
            st.aec = aec
        except CommandError as exc:  # events still come, as the controller's defaults allow
            st.aec = None
            log.info("Asynchronous Event Configuration not set: %s", exc)
        st.armed = True
        self.post_aers()

    def post_aers(self) -> None:
        """Asynchronous Event Requests outstanding up to AERL+1 (at most MAX_AERS): standing commands,
        never late, beside which every other admin command runs. One SQ doorbell."""
        qp, ident = self.core.admin, self.core.id_ctrl
        if qp is None or ident is None or self.state.off is not None:
            return
        want = min(int(ident["aerl"]) + 1, self.state.aer_limit)
        with self.ex.using(qp):
            posted = 0
            while qp.ring.standing + qp.ring.nevents < want and qp.capacity > 1:  # one id kept for commands
                qp.ring.post_standing(command_sqe(builders.async_event_request()))
                posted += 1
            if posted:
                qp.ring.ring_sq()

    def _event_log(self, lid: int) -> bytes:
        """The log page an event names, read with RAE=0 (which clears the event, 5.16.1) into a
        buffer of its own (the scratch buffer may hold another command's data)."""
        core, st = self.core, self.state
        length = structures.async_event_log_bytes(lid, int((core.id_ctrl or {}).get("elpe", 0)))
        if st.buf is None or not st.buf.live:
            st.buf = core.ledger.alloc(4096, owner="broker:events")
        buf = st.buf
        buf.array[:length] = 0
        e = command_sqe(builders.get_log_page(lid, length))  # RAE=0, all namespaces
        self.ex.admin_sync(e, f"Get Log Page {lid:#04x} (asynchronous event)", buf, length)
        return bytes(buf.array[:length])

    def _handle_event(self, rec: np.ndarray) -> decode.AsyncEvent | None:
        """One AER completion: decode it, read its log page, refresh the namespaces it changed."""
        st = self.state
        status, dw0 = int(rec["status"]), int(rec["result"])
        if status:
            _, sc, sct, _, _, _ = spec.split_status(status << 1)
            if (sct, sc) == (1, 0x05):  # Asynchronous Event Request Limit Exceeded: post fewer
                st.aer_limit = max(1, st.aer_limit - 1)
            elif status != CANCELLED_STATUS:
                st.off = f"{spec.status_name(sct, sc)} (SCT {sct:#x}, SC {sc:#04x})"
                log.info("Asynchronous Event Request refused: %s; events are off", st.off)
            return None
        _, _, lid = structures.split_async_event(dw0)
        try:
            data, why = self._event_log(lid), ""
        except CommandError as exc:
            data, why = b"", str(exc)
        ev = decode.decode(dw0, data, why)
        if ev.namespace_changed:
            self.ns.reidentify(vanished_changed=False)  # the namespace table follows the controller's
        return ev

    def service(self) -> None:
        """Take the AER completions C kept aside, handle each, post AERs again, then deliver the
        events (outside the admin queue's lock)."""
        qp, st = self.core.admin, self.state
        if qp is None or st.servicing or self.core.recovery.resetter is not None or not st.armed:
            return
        new: list[decode.AsyncEvent] = []
        with self.ex.using(qp):
            if st.servicing:
                return
            st.servicing = True
            try:
                if qp.ring.pending() and not qp.in_flight:
                    qp.ring.reap()  # only standing commands are outstanding: their completions go aside
                    qp.ring.ring_cq()
                while True:
                    recs = qp.ring.take_events()
                    if not len(recs):
                        break
                    new += [ev for ev in map(self._handle_event, recs) if ev is not None]
                self.post_aers()
            finally:
                st.servicing = False
        with st.cond:
            st.backlog.extend(new)
            st.seen += len(new)
            st.cond.notify_all()
        for ev in new:
            for callback in list(st.callbacks):
                try:
                    callback(ev)
                except Exception:  # a caller's callback must not break the broker
                    log.exception("asynchronous event callback %r failed", callback)

    def service_quietly(self) -> None:
        """Service events after another admin command: a failure here is logged, not raised into
        that command's caller (its own command succeeded)."""
        try:
            self.service()
        except NvmeVfioError as exc:
            log.warning("asynchronous events: %s", exc)

    def poll_events(self, timeout_s: float = 0.0) -> list[decode.AsyncEvent]:
        """Events that arrived and were not taken yet, waiting up to ``timeout_s`` for one; taken."""
        st = self.state
        deadline = time.monotonic() + timeout_s
        while True:
            self.core.require_ready()
            with st.cond:
                if st.backlog:
                    out = list(st.backlog)
                    st.backlog.clear()
                    return out
            qp = self.core.admin
            if qp is not None and (qp.ring.pending() or qp.ring.nevents):
                self.service()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            with st.cond:  # another thread's servicing notifies; else look again soon
                st.cond.wait(min(EVENT_POLL_S, left))

    def on_event(self, callback: Callable[[decode.AsyncEvent], None]) -> None:
        """Call ``callback(event)`` for every event from now on; a watcher thread services the
        admin queue every EVENT_POLL_S while no other command does."""
        st = self.state
        st.callbacks.append(callback)
        if st.watch is None:
            st.watch_stop.clear()
            st.watch = threading.Thread(target=self._watch_events, name="nvmevfio-events", daemon=True)
            st.watch.start()

    def _watch_events(self) -> None:
        core = self.core
        while not self.state.watch_stop.wait(EVENT_POLL_S):
            qp = core.admin
            if qp is None or core.gone or core.failed is not None:
                continue
            if qp.ring.pending() or qp.ring.nevents:
                try:
                    self.service()
                except NvmeVfioError as exc:
                    log.warning("asynchronous events: %s", exc)

    def stop_watch(self) -> None:
        st = self.state
        if st.watch is not None:
            st.watch_stop.set()
            if st.watch is not threading.current_thread():
                st.watch.join(timeout=5)
            st.watch = None
