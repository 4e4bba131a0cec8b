"""Fuzzing the service daemon (issue 27): generated control messages (anything from raw bytes and
nested JSON to well-formed requests with hostile fields) and generated ring states (request
records with any field, raw 64-byte SQEs in the validated lane, forged ring indices) against a
live daemon over the simulator. Throughout and at the end: the daemon's thread runs, every
message is answered or its sender hung up on, every published request completes once with a
known label, the bytes outside the grant's window and another session's buffer are untouched,
and a witness client is served (its bytes read back, no cycle past a bound)."""

import json
import os
import select
import socket
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_service import served  # noqa: F401  # served: the daemon-in-a-thread fixture
from test_service_hostile import CYCLE_BOUND_S, Prober, alive, grants

import nvmevfio
from nvmevfio.nvme.spec import SQE, IoOpcode
from nvmevfio.service import ring

FIRST, BLOCKS = 1000, 2000  # RW's window
# generated control messages, default-lane ring states, validated-lane ring states: 10,112 in all
CONTROL, REQUESTS, RAW = (int(n) for n in os.environ.get("NVMEVFIO_FUZZ_COUNTS", "3120,4496,2496").split(","))
PER_EXAMPLE = 16  # messages or ring states an example generates: Hypothesis's own work amortized
FUZZ = settings(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                   max_size=4), max_leaves=8)
WITNESS = """
[[grant]]
uid = UID
nsid = 2
blocks = 100
access = "rw"
"""
FIELD = (st.integers(min_value=-(1 << 70), max_value=1 << 70) | st.sampled_from([0, 1, -1, 4096, 1 << 32, 1 << 64])
         | JSON)
REQUEST = st.fixed_dictionaries(
    {"op": st.sampled_from(["hello", "alloc", "free", "info", "status", "bye", ""]) | st.text(max_size=8) | FIELD},
    optional={"size": FIELD, "buffer": FIELD, "generation": FIELD, "nsid": FIELD, "queue_depth": FIELD,
              "lane": st.sampled_from(["default", "validated", "other"]) | FIELD})
MESSAGE = st.one_of(
    REQUEST.map(lambda m: json.dumps(m).encode()),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=256),
    st.integers(1, 60000).map(lambda n: b"[" * n),
    st.integers(1, 12000).map(lambda n: b'{"a":' * n),
    st.integers(65000, 70000).map(lambda n: b" " * n),  # past the daemon's message size
)
U32 = st.integers(0, (1 << 32) - 1)
# A ring state: its entry count, the seed its field values come from (numpy draws them: Hypothesis
# drawing some 60 fields a state cost ~10 ms of the test's minute), and one in 20 forging the indices.
STATE = st.tuples(st.integers(1, 8), st.integers(0, (1 << 63) - 1), st.integers(0, 19), U32, U32)


def pick(rng: np.random.Generator, n: int, edges: list[int], bits: int) -> np.ndarray:
    """``n`` values: three in four from ``edges`` (the boundaries that matter), the rest anything of
    ``bits`` bits."""
    wide = rng.integers(0, 1 << bits, n, dtype=np.uint64) if bits < 64 else rng.bytes(8 * n)
    wide = np.frombuffer(wide, dtype=np.uint64) if isinstance(wide, bytes) else wide
    return np.where(rng.random(n) < 0.75, rng.choice(np.array(edges, dtype=np.uint64), n), wide)


def requests(n: int, seed: int, buf_id: int, generation: int) -> np.ndarray:
    """Default-lane request records, every field generated (the tag is the client's)."""
    rng = np.random.default_rng(seed)
    e = np.zeros(n, dtype=ring.REQUEST)
    e["opcode"] = pick(rng, n, [0, 1, 2, 8, 9], 8)
    e["flags"] = pick(rng, n, [0], 8)
    e["buffer"] = pick(rng, n, [buf_id, 0, buf_id + 1], 32)
    e["generation"] = pick(rng, n, [generation, 0], 64)
    e["offset"] = pick(rng, n, [0, 4, 512, 4096, (64 << 10) - 512, 64 << 10], 64)
    e["lba"] = pick(rng, n, [0, BLOCKS - 1, BLOCKS, 1 << 40], 64)
    e["count"] = pick(rng, n, [0, 1, 8, 128, 256, 65536, 65537], 32)
    return e


def sqes(n: int, seed: int, iova: int) -> np.ndarray:
    """Raw NVMe SQEs for the validated lane: opcodes, namespaces, PRPs at, near and far from the
    client's own buffer, LBAs at the window's edges; the CID numbers them."""
    rng = np.random.default_rng(seed)
    e = np.zeros(n, dtype=SQE)
    e["opc"] = pick(rng, n, [IoOpcode.READ, IoOpcode.WRITE, IoOpcode.FLUSH, IoOpcode.WRITE_ZEROES,
                             IoOpcode.DATASET_MANAGEMENT], 8)
    e["flags"] = pick(rng, n, [0], 8)
    e["cid"] = np.arange(1, n + 1)
    e["nsid"] = pick(rng, n, [1, 2, 0, 0xFFFFFFFF], 32)
    e["prp1"] = pick(rng, n, [iova, iova + 4096, iova + 2, iova + (64 << 10), 0, 1 << 52], 64)
    e["prp2"] = pick(rng, n, [0, iova + 8192, iova + 4097, iova - 4096], 64)
    slba = pick(rng, n, [0, BLOCKS - 1, BLOCKS], 64)
    dsm = e["opc"] == IoOpcode.DATASET_MANAGEMENT
    e["cdw10"] = np.where(dsm, pick(rng, n, [0, 1, 255], 8), slba & 0xFFFFFFFF)
    e["cdw11"] = np.where(dsm, pick(rng, n, [4, 0, 6], 32), slba >> np.uint64(32))
    e["cdw12"] = np.where(dsm, 0, pick(rng, n, [0, 7, 255, 0xFFFF], 16))
    return e


class Pool:
    """Connections sending generated control messages: each is answered, or its sender is hung
    up on (and replaced), within a bound."""

    def __init__(self, path: str, n: int) -> None:
        self.path = path
        self.socks = [self._new() for _ in range(n)]
        self.generated = self.sent = self.answered = self.hung_up = 0

    def _new(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(self.path)
        s.setblocking(False)
        return s

    def send(self, i: int, data: bytes) -> None:
        s = self.socks[i]
        self.generated += 1
        try:
            s.send(data)
        except OSError:  # hung up on earlier (it was sent a refusal, or broke the protocol)
            self._replace(i)
            return
        self.sent += 1
        ready, _, _ = select.select([s], [], [], 5.0)
        assert ready, f"no answer and no hang-up within 5 s to {data[:60]!r}"
        try:
            reply = s.recv(1 << 17)
        except OSError:
            reply = b""
        if reply:
            got = json.loads(reply)
            assert isinstance(got.get("ok"), bool) and (got["ok"] or isinstance(got.get("reason"), str)), got
            self.answered += 1  # descriptors that came with it (hello, alloc) were dropped by recv()
        else:
            self.hung_up += 1
            self._replace(i)

    def _replace(self, i: int) -> None:
        self.socks[i].close()
        self.socks[i] = self._new()

    def close(self) -> None:
        for s in self.socks:
            s.close()


class RingFuzzer:
    """A session whose ring is written by generated states; connected again after a state that
    forged its indices (the daemon owes it nothing consistent afterwards)."""

    def __init__(self, path: str, lane: str) -> None:
        self.path, self.lane = path, lane
        self.batches = self.entries = self.forged = 0
        self.labels: dict[str, int] = {}
        self._connect()

    def _connect(self) -> None:
        self.dev = nvmevfio.connect(self.path, 1, lane=self.lane, queue_depth=8, timeout_s=10)
        self.buf = self.dev.alloc_buffer(64 << 10)

    def publish(self, entries: np.ndarray, forge: tuple[int, int] | None) -> None:
        dev = self.dev
        self.batches += 1
        self.entries += len(entries)
        if forge is not None:  # indices no client of good faith writes, then a doorbell
            self.forged += 1
            memory = dev._ring.memory
            memory[0:4].view("<u4")[0], memory[192:196].view("<u4")[0] = forge
            dev._ring_doorbell()
            time.sleep(0.002)
            dev.close()
            self._connect()
            return
        tags = dev.submit_raw(entries) if self.lane == "validated" else self._submit(entries)
        done = dev.reap(len(tags), timeout_s=10)
        assert sorted(done["tag"].tolist()) == sorted(int(t) for t in tags), "one completion per request"
        for reason in done["reason"].tolist():
            self.labels[reason] = self.labels.get(reason, 0) + 1

    def _submit(self, entries: np.ndarray) -> np.ndarray:
        dev = self.dev
        tags = np.arange(dev._next_tag, dev._next_tag + len(entries), dtype=np.int64) & 0xFFFFFFFF
        dev._next_tag = (dev._next_tag + len(entries)) & 0xFFFFFFFF or 1
        entries["tag"] = tags
        dev._publish(entries, tags)
        return tags


def test_fuzz_control_messages_and_rings(served):  # noqa: F811  # the fixture imported above
    rig, service, path = served(grants(connections=64, sessions=6, queue_depth=64, dma="4M",
                                       lanes='["default", "validated"]', extra=WITNESS), clients=6)
    ns = rig.sim.namespaces[0]
    ns.data[:] = 0x77
    t0 = time.monotonic()
    witness = Prober(path, lba=10, nsid=2)  # a namespace of its own: the fuzzing writes all over its window
    victim = nvmevfio.connect(path, 1, queue_depth=4)  # another session's buffer: never written
    kept = victim.alloc_buffer(8192)
    kept.array[:] = 0x5D
    witness.start()

    pool = Pool(path, 8)

    @given(st.lists(st.tuples(st.integers(0, 7), MESSAGE), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def control(messages: list[tuple[int, bytes]]) -> None:
        for i, data in messages:
            pool.send(i, data)

    run_examples(control, CONTROL // PER_EXAMPLE)
    pool.close()
    print(f"control: {pool.sent} in {time.monotonic() - t0:.1f} s")
    settle(service, 2)  # the pool's sessions (a hello may have worked) ended: their slots free again

    plain = RingFuzzer(path, "default")

    @given(st.lists(STATE, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def default_lane(states: list[tuple[int, int, int, int, int]]) -> None:
        for n, seed, forge, sq_tail, cq_head in states:
            entries = requests(n, seed, plain.buf.id, plain.buf.generation)
            plain.publish(entries, (sq_tail, cq_head) if forge == 0 else None)

    run_examples(default_lane, REQUESTS // PER_EXAMPLE)
    plain.dev.close()
    print(f"default lane: {plain.batches} at {time.monotonic() - t0:.1f} s")

    raw = RingFuzzer(path, "validated")
    iova = int(raw.buf.iova)

    @given(st.lists(STATE, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def validated_lane(states: list[tuple[int, int, int, int, int]]) -> None:
        for n, seed, forge, sq_tail, cq_head in states:
            raw.publish(sqes(n, seed, iova), (sq_tail, cq_head) if forge == 0 else None)

    run_examples(validated_lane, RAW // PER_EXAMPLE)
    raw.dev.close()

    took = time.monotonic() - t0
    slowest = witness.finish("fuzzing")
    total = pool.generated + plain.batches + raw.batches
    print(f"fuzz: {total} generated messages and ring states in {took:.1f} s: {pool.generated} control messages "
          f"({pool.sent} delivered, {pool.answered} answered, {pool.hung_up} hung up on), "
          f"{plain.batches} default-lane ring states "
          f"({plain.entries} requests, {plain.forged} with forged indices; labels {plain.labels}), "
          f"{raw.batches} validated-lane ring states ({raw.entries} SQEs; labels {raw.labels})")
    assert total >= 10_000 and slowest < CYCLE_BOUND_S
    outside = np.concatenate([ns.data[: FIRST * 512], ns.data[(FIRST + BLOCKS) * 512 :]])
    assert (outside == 0x77).all(), "a byte outside the grant's window changed"
    assert (kept.array == 0x5D).all(), "another session's buffer changed"
    victim.close()
    alive(service, path)


def run_examples(test, n: int) -> None:
    settings(FUZZ, max_examples=n)(test)()


def settle(service, sessions: int) -> None:
    deadline = time.monotonic() + 10
    while len(service.sessions) > sessions:
        assert time.monotonic() < deadline, f"{len(service.sessions)} sessions left, not {sessions}"
        time.sleep(0.01)
