"""The service's shared rings: the wire format and ring arithmetic (exact values), and both
sides over one piece of memory, as the daemon and a client see it."""

from pathlib import Path

import numpy as np
import pytest

from nvmevfio.service import ring as rings
from nvmevfio.service.grants import parse_grants


def test_wire_format_and_arithmetic():
    assert rings.REQUEST.itemsize == 40 and rings.COMPLETION.itemsize == 16
    assert rings.ring_bytes(16) == 4096 + 4096 + 4096
    assert rings.ring_bytes(200) == 4096 + 8192 + 4096  # 8000 bytes of requests, 3200 of completions
    assert rings.used(5, 9) == 4 and rings.used(0xFFFFFFFE, 2) == 4  # free-running counters wrap
    assert rings.slots(0xFFFFFFFE, 4, 16).tolist() == [14, 15, 0, 1]
    assert rings.REASONS[rings.reason_code("out-of-window")] == "out-of-window"


def test_both_sides_of_one_ring():
    memory = np.zeros(rings.ring_bytes(4), dtype=np.uint8)
    daemon = rings.SharedRings(memory, 4)
    client = rings.SharedRings(memory)  # learns the depth from the header
    assert client.depth == 4 and client.request_room(0) == 4
    req = np.zeros(3, dtype=rings.REQUEST)
    req["tag"] = [7, 8, 9]
    tail = client.put_requests(0, req)
    assert client.request_room(tail) == 1
    got, head = daemon.take_requests(0, 2)  # the daemon takes what its depth allows
    assert got["tag"].tolist() == [7, 8] and head == 2 and client.request_room(tail) == 3
    client.requests["tag"][2] = 99  # rewritten after it was published: the copy taken is what counts
    got2, head = daemon.take_requests(head, 8)
    assert got2["tag"].tolist() == [99] and head == 3
    got["tag"][0] = 1234  # a copy, not a view of the shared page
    assert client.requests["tag"][0] == 7
    done = np.zeros(2, dtype=rings.COMPLETION)
    done["tag"] = [8, 7]
    cq_tail = daemon.put_completions(0, done)
    assert daemon.completion_room(cq_tail) == 2
    out, cq_head = client.take_completions(0)
    assert out["tag"].tolist() == [8, 7] and cq_head == 2 and daemon.completion_room(cq_tail) == 4


@pytest.mark.parametrize("cq_tail", [0, 1 << 31, 3 + 5])
def test_a_completion_tail_past_a_ring_is_refused_not_allocated(cq_tail):
    """The daemon zeroes a session's ring when it ends it: a client whose head is 3 read a tail
    of 0 as 2**32 - 3 completions and tried to copy them (32 GiB, MemoryError). A tail more than
    a ring ahead raises RingBroken, and nothing is copied or published."""
    memory = np.zeros(rings.ring_bytes(4), dtype=np.uint8)
    daemon = rings.SharedRings(memory, 4)
    client = rings.SharedRings(memory)
    cq_tail_before = daemon.put_completions(0, np.zeros(3, dtype=rings.COMPLETION))
    _, head = client.take_completions(0)
    assert (cq_tail_before, head) == (3, 3)
    memory[128:132].view("<u4")[0] = cq_tail  # zeroed (0) or forged
    with pytest.raises(rings.RingBroken) as ei:
        client.take_completions(head)
    assert ei.value.reason == "ring-broken" and ei.value.context == {"head": 3, "tail": cq_tail, "depth": 4}
    assert memory[192:196].view("<u4")[0] == 3  # the client's head was not moved
    memory[128:132].view("<u4")[0] = 3 + 4  # exactly one ring ahead: a full ring, taken
    got, head = client.take_completions(head)
    assert len(got) == 4 and head == 7


def test_the_example_grants_file_parses():
    text = (Path(__file__).parents[2] / "contrib" / "grants.example.toml").read_text()
    grants = parse_grants(text.replace('user = "alice"', "uid = 1001").replace('group = "storage-ro"', "gid = 2000"))
    assert [(g.uid, g.gid, g.first_lba, g.blocks, g.writable, g.queue_depth, g.dma_memory, g.sessions,
             g.connections) for g in grants] == [
        (1001, None, 0, 2097152, True, 32, 16 << 20, 2, 8), (None, 2000, 2097152, 1048576, False, 8, 4 << 20, 2, 8)]
