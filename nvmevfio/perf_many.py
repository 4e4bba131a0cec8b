"""Several controllers driven by one process (issue 25 part 3): ``nvmevfio perf ADDR ADDR ...``.

Each controller runs :func:`nvmevfio.perf.run` (its own queue pairs, a thread each, the C loop)
in a thread of its own, all started together; or, with ``shared_poller``, every controller's
queues are polled by one thread (``nv_perf_run_many``, as an SPDK reactor), one CPU for any
number of controllers. Unless the caller chooses, the shared poller is taken where a spinning
thread per queue would take every CPU this process may use (:func:`choose_poller`). The result is
one row per controller and the total. Each controller's DMA memory is on its function's NUMA node
and its queue threads on that node's CPUs where the host has several nodes
(``pci.numa_placement``, applied when the controller is opened); ``cpus`` given by the user win.
A host of one NUMA node (the test guest) has nothing to choose: a thread per queue is not pinned
unless asked, the one poller goes on the first CPU this process may use.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

from nvmevfio.errors import Refused
from nvmevfio.perf import PerfResult, Prepared, _run_threads, prepare, run


def choose_cpus(queues: int, user_cpus: list[int] | None,
                node_cpus: list[tuple[int | None, tuple[int, ...]]]) -> list[list[int] | None]:
    """The CPUs each controller's queue threads are pinned to (queue i on ``list[i]``), one entry
    per controller from its (NUMA node, that node's CPUs). ``user_cpus`` (--cpu) win: the
    controllers' queues, numbered across all of them (controller c's queue i is number
    ``c * queues + i``), take its CPUs in turn. Otherwise controllers on one node share its CPUs
    round robin, each starting where the previous one stopped; None: not pinned (no node, or none
    of its CPUs this process's)."""
    if user_cpus:
        n = len(user_cpus)
        return [[user_cpus[(c * queues + i) % n] for i in range(queues)] for c in range(len(node_cpus))]
    used: dict[int, int] = {}  # node -> queues already placed on its CPUs
    out: list[list[int] | None] = []
    for node, cpus in node_cpus:
        if node is None or not cpus:
            out.append(None)
            continue
        first = used.get(node, 0)
        out.append([cpus[(first + i) % len(cpus)] for i in range(queues)])
        used[node] = first + queues
    return out


def cpus_allowed() -> set[int]:
    """The CPUs this process may run on (its affinity mask, sched_getaffinity(2))."""
    return os.sched_getaffinity(0)


def choose_poller(shared_poller: bool | None, *, pollers: int, allowed_cpus: int, user_cpus: list[int] | None,
                  polled: bool, verify: bool, hybrid: bool) -> tuple[bool, str]:
    """Whether one thread polls every queue (True) or each queue has its own thread, and why.

    ``shared_poller`` given (True / False): the caller's choice. None (perf's default): the shared
    poller where ``pollers`` spinning threads (controllers x queues) would take every one of the
    ``allowed_cpus`` this process may use, leaving no CPU to the rest of the system (in a VM, to
    the hypervisor's device model as well): as spdk_nvme_perf's default core mask (0x1) runs one
    reactor for every controller. Not where it cannot run (interrupts, hybrid naps, verify's
    Python loop) or where ``user_cpus`` (--cpu) place the threads."""
    if shared_poller is not None:
        return shared_poller, "asked for" if shared_poller else "asked for (--thread-per-queue)"
    if not polled or verify or hybrid:
        why = "interrupts" if not polled else "verify runs in Python" if verify else "hybrid polling naps"
        return False, f"the default ({why}: no shared poller)"
    if user_cpus:
        return False, "the default (--cpu places the threads)"
    if pollers >= allowed_cpus:
        return True, (f"the default: {pollers} spinning threads would take all {allowed_cpus} CPUs this process "
                      "may use (--thread-per-queue for a thread each)")
    return False, f"the default: {pollers} spinning threads leave CPUs free of the {allowed_cpus} this process may use"


@dataclass
class ManyResult:
    """Each controller's run (``controllers``: its address, NUMA placement, pinned CPUs and
    :class:`PerfResult` figures) and their ``total``: counts and throughput added, the mean latency
    weighted by I/Os, the smallest minimum and largest maximum (percentiles stay per controller:
    the histograms are not merged across controllers)."""

    controllers: list[dict[str, Any]] = field(default_factory=list)
    total: dict[str, Any] = field(default_factory=dict)
    numa: str = ""  # what the placement was, in words
    poller: str = "per-queue"  # a thread per queue, or "shared": one thread polls every queue
    poller_why: str = ""  # asked for, or why the default chose it (choose_poller)

    def to_dict(self) -> dict[str, Any]:
        return {"controllers": self.controllers, "total": self.total, "numa": self.numa, "poller": self.poller,
                "poller_why": self.poller_why}

    @property
    def mismatches(self) -> int:
        return int(self.total.get("mismatches", 0))


def totals(results: list[PerfResult]) -> dict[str, Any]:
    """The controllers' runs as one: sums, the mean latency weighted by I/Os, min of minimums,
    max of maximums, the longest run's seconds."""
    ios = sum(r.ios for r in results)
    done = [r for r in results if r.ios]
    return {
        "controllers": len(results),
        "seconds": max((r.seconds for r in results), default=0.0),
        "ios": ios, "reads": sum(r.reads for r in results), "writes": sum(r.writes for r in results),
        "errors": sum(r.errors for r in results),
        "iops": sum(r.iops for r in results), "mib_per_s": sum(r.mib_per_s for r in results),
        "lat_mean_us": sum(r.lat_mean_us * r.ios for r in results) / ios if ios else 0.0,
        "lat_min_us": min((r.lat_min_us for r in done), default=0.0),
        "lat_max_us": max((r.lat_max_us for r in done), default=0.0),
        "verified_blocks": sum(r.verified_blocks for r in results),
        "mismatches": sum(len(r.mismatches) for r in results),
    }


def run_many(devices: list[tuple[str, Any]], *, cpus: list[int] | None = None, queues: int = 1,
             shared_poller: bool | None = None, **kw: Any) -> ManyResult:
    """Run one workload (``perf.run``'s keywords) on every (address, BlockDevice) at once, each
    controller in its own thread with ``queues`` queue pairs, or every queue of every controller
    polled by one thread (``shared_poller``: polled devices only, the thread pinned to the first
    of ``cpus`` when given, else to the first controller's NUMA node's first CPU, else to the
    first CPU this process may use; None: :func:`choose_poller` decides); the result has a row
    per controller and the total, and says which it was and why (``poller``, ``poller_why``). A
    controller named twice is refused; the first failure is raised once all have stopped."""
    if len(devices) < 1:
        raise Refused("invalid-argument", "no controller given")
    seen = [a for a, _ in devices]
    if len(set(seen)) != len(seen):
        raise Refused("invalid-argument", f"a controller named twice: {', '.join(seen)}")
    places = [getattr(d.provider, "numa", None) for _, d in devices]
    node_cpus = [(p.node, p.cpus) if p is not None else (None, ()) for p in places]
    chosen = choose_cpus(queues, cpus, node_cpus)
    polled = all(d.info.completion_mode == "poll" for _, d in devices)
    shared_poller, why = choose_poller(shared_poller, pollers=len(devices) * queues,
                                       allowed_cpus=len(cpus_allowed()), user_cpus=cpus, polled=polled,
                                       verify=bool(kw.get("verify")), hybrid=bool(kw.get("hybrid")))
    if shared_poller:
        if not any(chosen):
            # Nothing chosen (one NUMA node, no --cpu): the poller on the first CPU this process may
            # use, as spdk_nvme_perf's default core mask (0x1) pins its one reactor.
            chosen = [[min(cpus_allowed())] * queues for _ in devices]
        out = _run_shared(devices, places, chosen, queues=queues, **kw)
        out.poller_why = why
        return out
    results: list[PerfResult | None] = [None] * len(devices)
    failures: list[BaseException | None] = [None] * len(devices)
    start = threading.Barrier(len(devices))

    def one(i: int, dev: Any) -> None:
        try:
            start.wait()
            results[i] = run(dev, queues=queues, cpus=chosen[i], **kw)
        except BaseException as exc:  # raised by the calling thread below
            failures[i] = exc
            start.abort()

    threads = [threading.Thread(target=one, args=(i, d), name=f"nvmevfio-perf-{a}", daemon=True)
               for i, (a, d) in enumerate(devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for exc in failures:
        if exc is not None and not isinstance(exc, threading.BrokenBarrierError):
            raise exc
    done = [r for r in results if r is not None]
    out = ManyResult(total=totals(done), numa=_numa_words(places), poller_why=why)
    for (addr, _), place, pinned, res in zip(devices, places, chosen, done):
        out.controllers.append({"address": addr, "numa_node": getattr(place, "node", None),
                                "numa": getattr(place, "why", "not placed"), "pinned_cpus": pinned or [],
                                **res.to_dict()})
    return out


def _run_shared(devices: list[tuple[str, Any]], places: list[Any], chosen: list[list[int] | None], *,
                queues: int, status: Any = None, ramp_s: float = 0.0, **kw: Any) -> ManyResult:
    """run_many's shared poller: every controller's run prepared (all refusals before any I/O),
    then one thread drives all their queues, pinned to the first controller's first CPU."""
    preps: list[Prepared] = []
    try:
        for (_, dev), pinned in zip(devices, chosen):
            preps.append(prepare(dev, queues=queues, cpus=pinned, shared_poller=True, **kw))
    except BaseException:
        for p in preps:
            p.free()
        raise
    for p in preps:
        p.start()
    qs = [q for p in preps for q in p.qs]
    usr_s, sys_s = _run_threads(qs, seconds=preps[0].seconds, ramp_s=ramp_s, status=status, shared_poller=True)
    done = [p.result(usr_s, sys_s) for p in preps]
    out = ManyResult(total=totals(done), numa=_numa_words(places), poller="shared")
    first_cpu = chosen[0][0] if chosen and chosen[0] else None
    for (addr, _), place, res in zip(devices, places, done):
        out.controllers.append({"address": addr, "numa_node": getattr(place, "node", None),
                                "numa": getattr(place, "why", "not placed"),
                                "pinned_cpus": [first_cpu] if first_cpu is not None else [], **res.to_dict()})
    return out


def _numa_words(places: list[Any]) -> str:
    if all(p is None or p.node is None for p in places):
        why = next((p.why for p in places if p is not None), "not placed")
        return f"{why}: memory where the kernel puts it, threads pinned only with --cpu"
    return "; ".join("not placed" if p is None else p.why for p in places)


def table(res: ManyResult) -> list[str]:
    """The text rows: a header, one row per controller (its CPUs), the total (no percentiles)."""
    head = (f"{'controller':<14} {'cpus':>6} {'IOPS':>12} {'MiB/s':>10} {'avg(us)':>10} {'min(us)':>10} "
            f"{'max(us)':>10} {'p50(us)':>10} {'p99(us)':>10} {'p99.9(us)':>10}")
    lines = [head]
    for r in res.controllers:
        cpus = ",".join(map(str, r["pinned_cpus"])) or "-"
        lines.append(f"{r['address']:<14} {cpus:>6} {r['iops']:12.1f} {r['mib_per_s']:10.2f} {r['lat_mean_us']:10.1f} "
                     f"{r['lat_min_us']:10.1f} {r['lat_max_us']:10.1f} {r['lat_p50_us']:10.1f} "
                     f"{r['lat_p99_us']:10.1f} {r['lat_p999_us']:10.1f}")
    t = res.total
    lines.append(f"{'total':<14} {'':>6} {t['iops']:12.1f} {t['mib_per_s']:10.2f} {t['lat_mean_us']:10.1f} "
                 f"{t['lat_min_us']:10.1f} {t['lat_max_us']:10.1f} {'-':>10} {'-':>10} {'-':>10}")
    return lines
