"""Property-based: random sequences of BlockDevice calls with random and hostile arguments,
against a model of the namespace. Every refusal carries a label and leaves the device untouched
(no register write, no command); every accepted call leaves the data equal to the model.
Over 10,000 generated calls per run (settings below)."""

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from nvmevfio.blockdev import BlockDevice
from nvmevfio.errors import Refused
from nvmevfio.sim.controller import SimNamespace

BLOCKS = 256
BS = 512
LABELS = {"window-past-namespace-end", "count-out-of-range", "length-mismatch", "invalid-argument",
          "stale-handle", "buffer-in-flight", "namespace-inactive", "queue-full", "queue-busy"}

# LBAs and counts: mostly sensible, sometimes hostile
lbas = st.one_of(st.integers(0, BLOCKS - 1), st.integers(-5, BLOCKS + 5), st.sampled_from(
    [-1, BLOCKS, 1 << 40, float("nan"), 3.0, True, "7", None, np.int64(4), np.uint16(9), np.float32(2)]))
counts = st.one_of(st.integers(1, 16), st.integers(-2, BLOCKS + 2), st.sampled_from(
    [0, 1 << 20, float("inf"), 2.5, False, np.int32(3), None]))
CALLS = 0


class DeviceModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        from nvmevfio.sim.rig import Rig

        self.rig = Rig([SimNamespace(BLOCKS, BS)])
        self.rig.broker.command_timeout_s = 1.0
        self.dev = BlockDevice(self.rig.p, 1, queue_depth=8)
        self.model = np.zeros(BLOCKS * BS, dtype=np.uint8)
        self.bufs = []  # (handle, live)
        self.rng = np.random.default_rng(0)

    def call(self, fn, *args):
        """Run one call; a refusal must carry a known label and touch nothing."""
        global CALLS
        CALLS += 1
        mark = self.rig.mark()
        try:
            return True, fn(*args)
        except Refused as exc:
            assert exc.reason in LABELS, exc.reason
            assert self.rig.unchanged_since(mark), f"refused {exc.reason} but the device was touched"
            return False, None

    @staticmethod
    def valid(lba, count):
        if type(lba) not in (int, np.int64, np.uint16) or type(count) not in (int, np.int32):
            return False
        return int(count) >= 1 and int(lba) >= 0 and int(lba) + int(count) <= BLOCKS

    @rule(lba=lbas, count=counts, seed=st.integers(0, 2**32 - 1))
    def write(self, lba, count, seed):
        n = count if isinstance(count, (int, np.integer)) and 0 < count < 64 and not isinstance(count, bool) else 1
        data = np.random.default_rng(seed).integers(0, 256, n * BS, dtype=np.uint8)
        ok, _ = self.call(self.dev.write_blocks, lba, data)
        assert ok == self.valid(lba, n)
        if ok:
            self.model[int(lba) * BS : (int(lba) + n) * BS] = data

    @rule(lba=lbas, count=counts)
    def read(self, lba, count):
        ok, got = self.call(self.dev.read_blocks, lba, count)
        assert ok == self.valid(lba, count)
        if ok:
            assert np.array_equal(got, self.model[int(lba) * BS : (int(lba) + int(count)) * BS])

    @rule(lba=lbas, count=counts)
    def zeroes(self, lba, count):
        ok, _ = self.call(self.dev.write_zeroes, lba, count)
        assert ok == self.valid(lba, count)
        if ok:
            self.model[int(lba) * BS : (int(lba) + int(count)) * BS] = 0

    @rule(data=st.sampled_from(["text", 42, None, np.zeros((4, 4), dtype=object), np.zeros(100, np.uint8),
                                 np.zeros((BS, 2), np.uint8)[:, 0]]))
    def write_hostile_data(self, data):
        ok, _ = self.call(self.dev.write_blocks, 0, data)
        if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.size == BS:
            assert ok  # a non-contiguous column is copied, not refused
            self.model[:BS] = data
        else:
            assert not ok

    @rule(size=st.sampled_from([BS, 4096, 3 * 4096, 8192 + BS]))
    def alloc(self, size):
        ok, buf = self.call(self.dev.alloc_buffer, size)
        assert ok
        buf.array[:] = self.rng.integers(0, 256, buf.size, dtype=np.uint8)
        self.bufs.append([buf, True])

    @precondition(lambda self: self.bufs)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        entry = self.bufs[i % len(self.bufs)]
        ok, _ = self.call(self.dev.free_buffer, entry[0])
        assert ok == entry[1]
        entry[1] = False

    @precondition(lambda self: self.bufs)
    @rule(i=st.integers(0, 100), write=st.booleans(), k=st.integers(1, 6), hostile=st.sampled_from(
        [None, "offset", "count", "lba", "lengths", "float-lba", "bool-count", "readonly", "stride"]))
    def batch(self, i, write, k, hostile):
        buf, live = self.bufs[i % len(self.bufs)]
        per = max(1, min(k, buf.size // BS))
        slbas = (self.rng.integers(0, BLOCKS - 8, per)).astype(np.int64)
        cnts = np.ones(per, dtype=np.int64)
        offs = np.arange(per, dtype=np.int64) * BS
        if hostile == "offset":
            offs[-1] = buf.size
        elif hostile == "count":
            cnts[0] = 0
        elif hostile == "lba":
            slbas[0] = BLOCKS
        elif hostile == "lengths":
            offs = offs[:-1]
        elif hostile == "float-lba":
            slbas = slbas + 0.5
        elif hostile == "bool-count":
            cnts = cnts.astype(bool)
        elif hostile == "readonly":
            slbas.flags.writeable = False  # read-only inputs are fine to read
        elif hostile == "stride":
            slbas = np.repeat(slbas, 2)[::2]  # non-contiguous is fine too
        fn = self.dev.submit_writes if write else self.dev.submit_reads
        ok, tags = self.call(fn, slbas, cnts, buf, offs)
        # repeated LBAs in one batch are accepted: the device runs the entries in ring order
        assert ok == (live and hostile in (None, "readonly", "stride"))
        if not ok:
            return
        done = self.dev.reap(len(tags))
        assert sorted(done["tag"].tolist()) == sorted(tags.tolist()) and not done["status"].any()
        for s, o in zip(slbas.tolist(), offs.tolist()):
            if write:
                self.model[s * BS : (s + 1) * BS] = buf.array[o : o + BS]
        if not write:
            for s, o in zip(slbas.tolist(), offs.tolist()):
                assert np.array_equal(buf.array[o : o + BS], self.model[s * BS : (s + 1) * BS])

    @invariant()
    def device_matches_model(self):
        if hasattr(self, "rig"):
            assert np.array_equal(self.rig.sim.namespaces[0].data, self.model)
            assert self.dev.in_flight() == 0


DeviceModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None,
                                         suppress_health_check=list(HealthCheck))
TestDeviceModel = DeviceModel.TestCase


def test_enough_calls_were_generated():
    """Runs after TestDeviceModel (file order): at least 10,000 calls went through the checks."""
    print(f"{CALLS} generated calls")
    assert CALLS >= 10_000, CALLS
