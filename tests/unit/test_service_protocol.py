"""The service's control protocol, one message at a time over a socketpair: what does not parse
is a typed ProtocolError (bad-message) for the daemon to hang up on, never another exception."""

import socket

import pytest

from nvmevfio.service.protocol import MAX_MESSAGE, ProtocolError, receive, send


@pytest.mark.parametrize("data, says", [
    (b"[" * 60000, "nested too deeply"),  # was RecursionError: the daemon died
    (b'{"a":' * 12000, "nested too deeply"),
    (b"\xff\xfe", "not JSON"),
    (b"{", "not JSON"),
    (b"[1, 2]", "a JSON object"),
    (b" " * (MAX_MESSAGE + 10), "truncated"),
])
def test_what_is_not_a_message(data, says):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        a.send(data)
        with pytest.raises(ProtocolError) as ei:
            receive(b)
    assert ei.value.reason == "bad-message" and says in str(ei.value) and isinstance(ei.value, ValueError)


def test_a_reply_that_does_not_fit_does_not_block():
    """The daemon's replies go with MSG_DONTWAIT: a peer that reads none fills its queue, and the
    next reply raises BlockingIOError at once (the daemon hangs up on it) instead of waiting."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        sent = 0
        with pytest.raises(BlockingIOError):
            for _ in range(100_000):
                send(a, {"ok": False, "reason": "not-connected", "message": "say hello first"},
                     flags=socket.MSG_DONTWAIT)
                sent += 1
        message, fds = receive(b)
        assert sent > 0 and message == {"ok": False, "reason": "not-connected", "message": "say hello first"}
        assert fds == []
