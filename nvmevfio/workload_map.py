"""The workload engine's verify map (nvmevfio/workload_engine.py, cbits/workload.c): one entry per LBA of
the range, saved with what it belongs to (controller serial, nsid, block size, range, the run's
nonce) so that a later process (after a reset or a power-off) can read every mapped block back
and tell lost writes that had been acknowledged and flushed from those that had not been
(:func:`verify_only`).

An entry's ``gen`` is the generation last acknowledged at the LBA (every block of a write
carries its generation in its header) or a state: never written, zeroes (Write Zeroes, or a
Deallocate where DLFEAT promises zeroes), undefined (a Deallocate without that promise, or a
command that failed or was ended by a reset). ``pend`` is a command's in flight (either the
old or the new content is right). ``ack`` orders acknowledgements within a job, so that a
Flush (which covers every acknowledgement before it was submitted) marks them flushed.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from nvmevfio._ffi import ffi, lib
from nvmevfio.errors import Refused

VMAP = np.dtype([("gen", "<u8"), ("ack", "<u8"), ("pend", "<u8")])  # struct nv_wl_vmap
MISMATCH = np.dtype([("lba", "<u8"), ("want", "<u8"), ("found_lba", "<u8"), ("found_gen", "<u8"),
                     ("found_magic", "<u4"), ("found_crc", "<u4"), ("crc", "<u4"), ("pad", "<u4")])  # nv_wl_mismatch
ROWS_KEPT = 1000  # mismatch rows a report keeps (all are counted and classified)
# the states (cbits/workload.c ST_*); generations are GEN_FIRST and above
NEVER, ZERO, UNDEF, READING = 0, 1, 2, 3
GEN_FIRST = 16
STATE_NAMES = {NEVER: "never written", ZERO: "zeroes", UNDEF: "undefined", READING: "read in flight"}
FORMAT = "nvmevfio-verify-map/1"
READ_CHUNK = 128 << 10  # bytes per read of verify_only


def state_name(v: int) -> str:
    """A map value as words: a state's name, or ``generation N``."""
    return STATE_NAMES.get(v, f"generation {v}")


def mismatch_rows(records: np.ndarray) -> list[tuple[int, tuple[int, int, int], tuple[int, int, int, int]]]:
    """C mismatch records as perf's mismatch rows: (lba, expected (lba, generation, the CRC32C of
    the payload found), found header (magic, lba, generation, CRC32C))."""
    return [(int(r["lba"]), (int(r["lba"]), int(r["want"]), int(r["crc"])),
             (int(r["found_magic"]), int(r["found_lba"]), int(r["found_gen"]), int(r["found_crc"])))
            for r in records]


@dataclass
class MapFile:
    """A saved verify map: ``meta`` (what it belongs to) and the per-LBA arrays."""

    meta: dict[str, Any]
    vmap: np.ndarray  # VMAP, one entry per LBA of meta["range"]
    flushed: np.ndarray  # bool per LBA: its last acknowledged content was covered by a completed Flush

    @classmethod
    def from_run(cls, dev: Any, lo: int, vmap: np.ndarray, nonce: int, cuts: list[tuple[int, int]],
                 durable: list[int], read_zeroes: bool) -> MapFile:
        flushed = np.zeros(len(vmap), dtype=bool)
        for (start, blocks), upto in zip(cuts, durable):
            part = vmap[start - lo : start - lo + blocks]
            flushed[start - lo : start - lo + blocks] = (part["ack"] != 0) & (part["ack"] <= upto)
        meta = {"format": FORMAT, "serial": dev.info.serial, "model": dev.info.model, "nsid": dev.nsid,
                "block_size": dev.block_size, "range": [lo, lo + len(vmap)], "nonce": nonce,
                "jobs": [list(c) for c in cuts], "durable": durable, "read_zeroes": read_zeroes, "fua": False,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return cls(meta, vmap.copy(), flushed)

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(self.meta).encode(), dtype=np.uint8), gen=self.vmap["gen"],
                     ack=self.vmap["ack"], pend=self.vmap["pend"], flushed=self.flushed)

    @classmethod
    def load(cls, path: str) -> MapFile:
        try:
            with open(path, "rb") as f:
                z = np.load(io.BytesIO(f.read()), allow_pickle=False)
                meta = json.loads(bytes(z["meta"]).decode())
                vmap = np.zeros(len(z["gen"]), dtype=VMAP)
                vmap["gen"], vmap["ack"], vmap["pend"] = z["gen"], z["ack"], z["pend"]
                flushed = np.asarray(z["flushed"], dtype=bool)
        except (OSError, ValueError, KeyError) as exc:
            raise Refused("invalid-argument", f"verify map {path}: not readable as one ({exc})") from None
        if meta.get("format") != FORMAT:
            raise Refused("invalid-argument", f"verify map {path}: format {meta.get('format')!r}, not {FORMAT}")
        return cls(meta, vmap, flushed)

    def counts(self) -> dict[str, int]:
        g = self.vmap["gen"]
        return {"written": int((g >= GEN_FIRST).sum()), "zeroes": int((g == ZERO).sum()),
                "undefined": int((g == UNDEF).sum()), "never": int((g == NEVER).sum()),
                "in_flight": int(((self.vmap["pend"] != NEVER) & (self.vmap["pend"] != READING)).sum()),
                "flushed": int(self.flushed.sum())}


def verify_only(dev: Any, path: str, *, status: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Read back every block an earlier run's map (``path``) says something about, and check it
    in C (``nv_wl_check``, the loop's own check). The map must belong to this device's
    namespace (serial, nsid, block size), refused ``verify-map-mismatch`` otherwise. Returns the
    figures: blocks checked, mismatches (rows as perf's), and how many were lost writes that had
    been acknowledged and flushed (``lost_flushed``) or only acknowledged (``lost_unflushed``)."""
    m = MapFile.load(path)
    meta = m.meta
    mine = {"serial": dev.info.serial, "nsid": dev.nsid, "block_size": dev.block_size}
    theirs = {k: meta.get(k) for k in mine}
    if mine != theirs:
        raise Refused("verify-map-mismatch", f"verify map {path} belongs to {theirs}, not this namespace ({mine})",
                      map=theirs, device=mine)
    lo, hi = meta["range"]
    if hi > dev.block_count:
        raise Refused("verify-map-mismatch", f"verify map {path}: range {lo}..{hi} past the namespace end "
                      f"({dev.block_count} blocks)")
    bs = dev.block_size
    per = max(1, min(READ_CHUNK, dev.info.max_transfer_bytes) // bs)
    mapped = (m.vmap["gen"] != NEVER) | ((m.vmap["pend"] != NEVER) & (m.vmap["pend"] != READING))
    buf = dev.alloc_buffer(per * bs)
    out = np.zeros(per, dtype=MISMATCH)
    checked = ffi.new("uint64_t *")
    rows: list[Any] = []
    lbas: list[int] = []
    bad = 0
    vm = np.ascontiguousarray(m.vmap)
    vm_c = ffi.cast("struct nv_wl_vmap *", vm.ctypes.data)
    t0 = time.perf_counter()
    try:
        for start in range(lo, hi, per):
            n = min(per, hi - start)
            if not mapped[start - lo : start - lo + n].any():
                continue
            dev.read_into(start, n, buf, 0)
            got = int(lib.nv_wl_check(ffi.cast("uint8_t *", buf.array.ctypes.data), bs, start, n, vm_c, lo,
                                      meta["nonce"], ffi.cast("struct nv_wl_mismatch *", out.ctypes.data), len(out),
                                      checked))
            if got:
                recs = out[:got]  # (a chunk's mismatches all fit: one record per block)
                lbas.extend(int(x) for x in recs["lba"])
                if len(rows) < ROWS_KEPT:
                    rows.extend(mismatch_rows(recs[: ROWS_KEPT - len(rows)]))
                bad += got
            if status is not None:
                status(start + n - lo, hi - lo)
    finally:
        dev.free_buffer(buf)
    idx = np.array(lbas, dtype=np.int64) - lo
    acked = m.vmap["gen"][idx] >= GEN_FIRST if len(idx) else np.zeros(0, dtype=bool)
    flushed = m.flushed[idx] if len(idx) else np.zeros(0, dtype=bool)
    return {"map": path, "serial": meta["serial"], "nsid": meta["nsid"], "range": [lo, hi],
            "seconds": time.perf_counter() - t0, "verified_blocks": int(checked[0]), "mismatch_count": bad,
            "lost_flushed": int((acked & flushed).sum()), "lost_unflushed": int((acked & ~flushed).sum()),
            "mismatches": rows, "map_counts": m.counts()}
