"""The service's control messages on its Unix socket: JSON, one per SOCK_SEQPACKET datagram,
file descriptors riding along with SCM_RIGHTS. The daemon (:mod:`nvmevfio.service.daemon`) and its
clients (:mod:`nvmevfio.service.client`) both send and receive them here.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from nvmevfio.errors import NvmeVfioError

MAX_MESSAGE = 65536
MAX_FDS = 4


class ProtocolError(NvmeVfioError, ValueError):
    """A control message that is not one: truncated, not JSON, nested past what a parser may
    recurse into, or not a JSON object. The daemon hangs up on its sender (only)."""

    reason = "bad-message"


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None, flags: int = 0) -> None:
    """One control message (JSON), with file descriptors (SCM_RIGHTS) when given. The daemon
    passes MSG_DONTWAIT: a reply that does not fit the peer's queue raises BlockingIOError."""
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], fds, flags)
    else:
        sock.send(data, flags)


def receive(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One control message and its file descriptors; (None, []) when the peer has gone."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    if flags & socket.MSG_CTRUNC or flags & socket.MSG_TRUNC:
        for fd in fds:
            os.close(fd)
        raise ProtocolError("control message truncated", length=len(data))
    try:
        message = json.loads(data)
    except RecursionError:  # b"[" * 60000: the parser recurses once per level
        raise ProtocolError("control message nested too deeply", length=len(data)) from None
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ProtocolError(f"control message is not JSON: {exc}", length=len(data)) from None
    if not isinstance(message, dict):
        raise ProtocolError("a control message is a JSON object", length=len(data))
    return message, fds
