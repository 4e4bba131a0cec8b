"""Asynchronous events (NVMe Base 2.0, 5.2 Asynchronous Event Request; 5.16.1 log pages).

The broker keeps Asynchronous Event Requests outstanding on the admin queue; when one completes,
it reads the log page the event names (which clears the event, RAE=0) and hands the decoded
event here. Pure: an event is a function of its completion DW0 and the log page bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from nvmevfio.nvme import structures


@dataclass(frozen=True)
class AsyncEvent:
    """One asynchronous event, decoded, with the log page it named as read."""

    result: int  # the AER completion's DW0
    type: int  # Asynchronous Event Type (bits 2:0)
    info: int  # Asynchronous Event Information (bits 15:8)
    log_page: int  # Log Page Identifier (bits 23:16)
    type_name: str
    info_name: str
    log_page_name: str
    log: bytes = b""  # the log page, read with RAE=0 (empty when reading it failed)
    log_error: str = ""  # why the log page could not be read
    nsids: tuple[int, ...] = ()  # Changed Namespace List entries (FFFFFFFFh: more than 1024 changed)
    detail: dict[str, Any] = field(default_factory=dict)  # decoded log fields worth showing
    time: float = 0.0  # time.time() when the broker decoded it

    @property
    def namespace_changed(self) -> bool:
        return self.type == structures.AER_TYPE_NOTICE and self.info == structures.AER_INFO_NS_ATTR_CHANGED

    def as_dict(self) -> dict[str, Any]:
        """JSON fields (``nvmevfio monitor -o json``)."""
        out: dict[str, Any] = {
            "time": round(self.time, 6), "result": self.result,
            "type": self.type, "type_name": self.type_name, "info": self.info, "info_name": self.info_name,
            "log_page": self.log_page, "log_page_name": self.log_page_name, "log_length": len(self.log)}
        if self.log_error:
            out["log_error"] = self.log_error
        if self.namespace_changed:
            out["changed_nsids"] = list(self.nsids)
        out.update(self.detail)
        return out

    def __str__(self) -> str:
        text = (f"{self.type_name} ({self.type}): {self.info_name} ({self.info:#04x}); "
                f"log page {self.log_page:#04x} ({self.log_page_name})")
        if self.namespace_changed:
            text += f"; changed namespaces: {', '.join(map(str, self.nsids)) or 'none listed'}"
        for k, v in self.detail.items():
            text += f"; {k} {v}"
        return text


def decode(result: int, log: bytes = b"", log_error: str = "", when: float | None = None) -> AsyncEvent:
    """An event from its AER completion DW0 and the log page it named."""
    t, info, lid = structures.split_async_event(result)
    names = structures.async_event_names(result)
    nsids: tuple[int, ...] = ()
    detail: dict[str, Any] = {}
    if lid == 0x04 and log:
        nsids = tuple(structures.parse_active_namespaces(log))
    elif lid == 0x02 and len(log) >= 512:
        smart = structures.parse_smart_log(log)
        detail = {"critical_warning": smart["critical_warning"], "temperature": smart["temperature"]}
    return AsyncEvent(result, t, info, lid, *names, log=bytes(log), log_error=log_error, nsids=nsids,
                      detail=detail, time=time.time() if when is None else when)
