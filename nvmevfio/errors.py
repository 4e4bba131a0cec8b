"""The nvmevfio exception tree. Imports nothing from the package.

Every error carries a ``reason``: a stable label (see design.md, "Refusals") that
scripts and tests can match on, and a human message with the context (register
values, status names, what was attempted on what).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any


class NvmeVfioError(Exception):
    """Base of every nvmevfio error."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, **context: Any) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason
        self.context: dict[str, Any] = context

    def __str__(self) -> str:
        return f"{self.args[0]} [{self.reason}]"


class ShimError(NvmeVfioError, OSError):
    """A system call in the C shim failed (carries errno, the operation and its target)."""

    reason = "os-error"

    def __init__(self, op: str, target: str, err: int, hint: str = "") -> None:
        name = _errno.errorcode.get(err, f"errno {err}")
        msg = f"{op} on {target} failed: {name} ({os.strerror(err)})"
        if hint:
            msg += f"; {hint}"
        NvmeVfioError.__init__(self, msg, op=op, target=target, errno=err)
        self.errno = err
        self.op = op
        self.target = target
        self.strerror = os.strerror(err)


class VfioError(NvmeVfioError):
    """VFIO setup problem that is not a plain errno (group not viable, no IOMMU type...)."""

    reason = "vfio"


class PciError(NvmeVfioError):
    """PCI discovery or driver binding problem."""

    reason = "pci"


class DeviceInUse(PciError):
    """Binding refused: a namespace is mounted, used as swap, or held by another device."""

    reason = "device-in-use"

    def __init__(self, address: str, users: list[str]) -> None:
        super().__init__(
            f"{address} is in use: {'; '.join(users)} (unmount/release it, or force)",
            address=address,
            users=users,
        )
        self.users = users


class Refused(NvmeVfioError):
    """A request refused before anything touched the device. ``reason`` is the label."""

    reason = "refused"

    def __init__(self, reason: str, message: str, **context: Any) -> None:
        super().__init__(message, reason=reason, **context)


class StaleHandle(Refused):
    def __init__(self, message: str, **context: Any) -> None:
        super().__init__("stale-handle", message, **context)


class ControllerError(NvmeVfioError):
    """The controller misbehaved (not a refusal: the device was touched)."""

    reason = "controller"


class ControllerFatal(ControllerError):
    """CSTS.CFS is set (NVMe base spec 3.1.4.2 / 3.7.3)."""

    reason = "controller-fatal"


class ControllerTimeout(ControllerError):
    """A wait bounded by CAP.TO (or the shutdown bound) ran out."""

    reason = "ready-timeout"


class CommandTimeout(ControllerError):
    reason = "command-timeout"


class DeviceGone(ControllerError):
    """BAR0 reads all ones (CSTS == 0xFFFFFFFF): the device was removed or fell off the bus; or
    the kernel asked for it back (VFIO device request) and it was released."""

    reason = "device-gone"


class QueuePaused(ControllerError):
    """A wait ended because another thread is resetting the controller (internal: the broker parks
    the queue until the reset is done, then carries on; callers do not see it)."""

    reason = "queue-paused"


class ControllerFailed(ControllerError):
    """Recovery gave up (too many controller resets in a short time); reopen the device."""

    reason = "controller-failed"


class IllegalTransition(NvmeVfioError):
    """A lifecycle transition its table does not allow (a broker bug, not a caller's request):
    names the state it was in and the state asked for."""

    reason = "illegal-transition"

    def __init__(self, machine: str, from_state: str, to_state: str) -> None:
        super().__init__(f"{machine}: no transition from {from_state} to {to_state}", machine=machine,
                         from_state=from_state, to_state=to_state)
        self.from_state = from_state
        self.to_state = to_state


class CommandError(NvmeVfioError):
    """A completion with non-zero status (NVMe base spec 4.2.3, Status Field)."""

    reason = "command-error"

    def __init__(
        self,
        command: str,
        sct: int,
        sc: int,
        dnr: bool,
        *,
        sct_name: str,
        sc_name: str,
        more: bool = False,
        **context: Any,
    ) -> None:
        msg = (
            f"{command} failed: {sc_name} (SCT {sct:#x} {sct_name}, SC {sc:#04x})"
            f"{', DNR' if dnr else ''}{', MORE' if more else ''}"
        )
        if "slba" in context:  # which blocks: a media error is about them
            msg += f" at LBA {context['slba']}" + (f" (+{context['count']} blocks)" if "count" in context else "")
        super().__init__(msg, command=command, sct=sct, sc=sc, dnr=dnr, **context)
        self.command = command
        self.sct = sct
        self.sc = sc
        self.dnr = dnr
        self.more = more
        self.sct_name = sct_name
        self.sc_name = sc_name
