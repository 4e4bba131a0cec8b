"""Long-running: perf, serve (the service daemon), monitor (asynchronous events)."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from nvmevfio.cli.common import (
    EXIT_DEVICE,
    EXIT_ERROR,
    EXIT_MISMATCH,
    _address,
    _complete_address,
    _emit_json,
    _fail,
    _pin,
    address_arg,
    blockdev,
    check_cpus,
    controller,
    cpu_list_opt,
    cpu_opt,
    errors,
    io_queue_entries,
    io_queue_size_opt,
    main,
    output_opt,
    service_socket_opt,
)
from nvmevfio.service import DEFAULT_SOCKET

# ------------------------------------------------------------------ perf
# ---------------------------------------------------------------- perf: the workload engine
# Its options (kept here, in one place): any of them given runs nvmevfio/workload_engine.py instead
# of perf's plain loop. They reach perf() through the click context (_ENGINE), not its signature.
_ENGINE = "nvmevfio.workload"


def _engine_opt(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value not in (None, False, ()):
        ctx.meta.setdefault(_ENGINE, {})[param.name or ""] = value
    return value


def _workload_options(f: Any) -> Any:
    opts = [
        click.option("--mix", help="the workload engine: an op mix, e.g. read:70,write:20,trim:5,flush:5 (ops: read, "
                     "write, trim (Dataset Management, Deallocate), flush, write-zeroes or wz; percentages adding "
                     "up to 100)"),
        click.option("--bs", help="the engine's sizes, e.g. 4k:50,16k:30,128k:20 (each a multiple of the block, at "
                     "most MDTS; default -s)"),
        click.option("--skew", help="the engine: IO%:LBA% (e.g. 80:20: 80% of the I/Os to the first 20% of each "
                     "job's slice, the hot part; the rest to the other 80%)"),
        click.option("--step", type=click.IntRange(1), help="the engine, sequential (-w read or write): blocks "
                     "from one I/O's start to the next (default: the I/O's size)"),
        click.option("--rate", type=click.IntRange(1), help="the engine: at most this many I/Os a second, all jobs "
                     "together (a token bucket in C; the loop naps when ahead)"),
        click.option("--jobs", type=click.IntRange(1, 64), help="the engine: jobs (a queue pair and a thread "
                     "each, on its own slice of the range); --queues by another name"),
        click.option("--deac", is_flag=True, help="the engine: Write Zeroes with Deallocate (DEAC)"),
        click.option("--verify-map", "verify_map", type=click.Path(dir_okay=False),
                     help="the engine with --verify: save the verify map (one entry per LBA of the range) here; "
                     "with --verify-only: the map to check against"),
        click.option("--verify-only", "verify_only", is_flag=True,
                     help="read back every block an earlier run's --verify-map describes and check it (another "
                     "process, after a reset or a power-off); lost acknowledged writes are counted apart as "
                     "flushed or not; mismatches exit 4"),
        click.option("--seed", type=int, help="the engine's random seed (default 1)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    for p in f.__click_params__[-len(opts):]:
        p.callback, p.expose_value = _engine_opt, False
    return f


def _perf_engine(engine: dict[str, Any], *, address: str, nsid: int, workload: str, queue_depth: int, io_size: int,
                 seconds: float | None, count: int | None, lba_range: str | None, mode: str, rwmixread: int,
                 ramp: float, shadow: bool | None, sgl: bool, sq_in_cmb: bool, verify: bool, queues: int,
                 cpus: list[int] | None, service_socket: str | None, fmt: str, entries: dict[str, Any]) -> None:
    """perf with any of the engine's options: checked, run (or --verify-only), reported."""
    from nvmevfio import workload_engine as wl
    from nvmevfio import workload_map

    if service_socket:
        _fail("the workload engine (--mix, --bs, --verify-map, --verify-only, ...) runs on a controller opened "
              "by this process: not through --socket [unsupported-workload]", EXIT_ERROR)
    if mode == "hybrid" or ramp:
        _fail("the workload engine has no --mode hybrid and no --ramp", EXIT_ERROR)
    jobs = engine.get("jobs")
    if jobs and queues not in (1, jobs):
        _fail(f"--jobs {jobs} and --queues {queues}: the same thing, given twice differently", EXIT_ERROR)
    jobs = jobs or queues
    check_cpus(cpus)
    rng = _lba_range(lba_range)
    opened = {"sgl": True} if sgl else {}
    opened.update({"sq_in_cmb": True} if sq_in_cmb else {})
    if engine.get("verify_only"):
        if not engine.get("verify_map"):
            _fail("--verify-only checks against a saved map: give --verify-map FILE", EXIT_ERROR)
        with blockdev(address, nsid, None, **opened) as dev, errors():
            rep = workload_map.verify_only(dev, engine["verify_map"])
        _verify_report(rep, fmt)
        return
    if workload == "append":
        _fail("the workload engine writes at chosen LBAs: not -w append", EXIT_ERROR)
    mix = engine.get("mix") or {"randread": "read", "read": "read", "randwrite": "write", "write": "write"}.get(
        workload, f"read:{rwmixread},write:{100 - rwmixread}")
    text = fmt == "normal"
    with errors():  # the options checked before the controller is opened
        spec = wl.make_spec(mix=mix, bs=engine.get("bs") or str(io_size), random=workload.startswith("rand"),
                            step=engine.get("step") or 0, skew=engine.get("skew"), rate=engine.get("rate"),
                            deac=bool(engine.get("deac")), verify=verify)
    with contextlib.ExitStack() as stack:
        dev = stack.enter_context(blockdev(address, nsid, None, irq=mode == "irq",
                                           shadow_doorbells=shadow, queues=jobs, **entries, **opened))
        stack.enter_context(errors())
        res = wl.run(dev, spec, queue_depth=queue_depth, seconds=seconds, count=count, lba_range=rng,
                     seed=engine.get("seed") or 1, queues=jobs, cpus=cpus, verify_map=engine.get("verify_map"),
                     line=(lambda t: click.echo(t, err=True)) if text else None)
    if fmt == "json":
        _emit_json(res.to_dict())
        if res.mismatch_count:
            sys.exit(EXIT_MISMATCH)
        return
    click.echo(f"{_address(address)} nsid {nsid}: {res.workload}, {res.queues} job(s), QD {res.queue_depth} each, "
               f"{res.mode}, {res.seconds:.2f} s, {res.ios} I/Os, {res.errors} errors"
               + (f", rate cap {res.rate_cap} IOPS" if res.rate_cap else "")
               + (f", {res.resets} controller reset(s) during the run, carried on" if res.resets else ""))
    click.echo(f"{'op':>13} {'I/Os':>10} {'share%':>7} {'mix%':>5} {'IOPS':>10} {'MiB/s':>9} {'avg(us)':>9} "
               f"{'p50(us)':>9} {'p99(us)':>9} {'p99.9(us)':>9} {'errors':>6}")
    for op, v in res.ops.items():
        click.echo(f"{op:>13} {v['ios']:10d} {v['share_pct']:7.2f} {v['mix_pct']:5d} {v['iops']:10.1f} "
                   f"{v['mib_per_s']:9.2f} {v['lat_mean_us']:9.1f} {v['lat_p50_us']:9.1f} {v['lat_p99_us']:9.1f} "
                   f"{v['lat_p999_us']:9.1f} {v['errors']:6d}")
    _perf_table(res)
    click.echo(f"series: {len(res.series)} points (one a second)")
    if res.verify:
        click.echo(f"verify: {res.verified_blocks} blocks read back and checked, {res.mismatch_count} mismatches"
                   + (f"; map saved to {res.verify_map}" if res.verify_map else ""))
        _mismatch_lines(res.mismatches)
        if res.mismatch_count:
            _fail(f"verify: {res.mismatch_count} blocks did not hold what was written", EXIT_MISMATCH)


def _mismatch_lines(rows: list[Any]) -> None:
    from nvmevfio.workload_map import state_name

    for lba, want, found in rows[:10]:
        click.echo(f"  LBA {lba}: expected {state_name(want[1])}; found magic {found[0]:#010x} lba {found[1]} "
                   f"generation {found[2]} crc32c {found[3]:#010x} (the payload's: {want[2]:#010x})")


def _verify_report(rep: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        _emit_json(rep)
    else:
        c = rep["map_counts"]
        click.echo(f"verify-only {rep['map']}: serial {rep['serial']} nsid {rep['nsid']} LBAs {rep['range'][0]}.."
                   f"{rep['range'][1]}: {c['written']} written, {c['zeroes']} zeroes ({c['flushed']} of these covered "
                   f"by a completed Flush), {c['undefined']} undefined, {c['in_flight']} in flight when saved")
        click.echo(f"verify: {rep['verified_blocks']} blocks read back and checked, {rep['mismatch_count']} "
                   f"mismatches ({rep['lost_flushed']} lost acknowledged and flushed writes, "
                   f"{rep['lost_unflushed']} lost acknowledged writes not yet flushed)")
        _mismatch_lines(rep["mismatches"])
    if rep["mismatch_count"]:
        if fmt == "json":
            sys.exit(EXIT_MISMATCH)
        _fail(f"verify-only: {rep['mismatch_count']} blocks did not hold what the map says", EXIT_MISMATCH)


@main.command()
@click.argument("address", nargs=-1, shell_complete=_complete_address)
@click.option("--namespace-id", "nsid", type=int, default=1, show_default=True,
              help="namespace id (-n is the I/O count here, as in spdk_nvme_perf)")
@click.option("-w", "--workload", type=click.Choice(["randread", "randwrite", "read", "write", "randrw", "append"]),
              default="randread", show_default=True,
              help="append: Zone Append at depth (a zoned namespace); on a zoned namespace, write follows the "
                   "zones' write pointers; both reset the range's zones first and fill each once")
@click.option("-q", "--queue-depth", type=click.IntRange(1, 4095), default=1, show_default=True)
@click.option("-s", "--io-size", type=int, default=4096, show_default=True, help="bytes per I/O")
@click.option("-t", "--time", "seconds", type=float, help="seconds to run (default 5 unless -n)")
@click.option("-n", "--count", "count", type=int, help="number of I/Os to run")
@click.option("--range", "lba_range", help="LBA range START:END to use (default: the whole namespace)")
@click.option("--mode", type=click.Choice(["poll", "irq", "hybrid"]), default="poll", show_default=True,
              help="completions by polling, MSI-X interrupts, or hybrid polling (nap about half the time to "
                   "the next completion, then poll)")
@click.option("-M", "--rwmixread", type=click.IntRange(0, 100), default=50, show_default=True,
              help="percentage of reads for randrw")
@click.option("--ramp", "ramp", type=float, default=0.0, show_default=True,
              help="seconds to run first, unmeasured (like fio --ramp_time)")
@click.option("--shadow-doorbells/--no-shadow-doorbells", "shadow", default=None,
              help="Doorbell Buffer Config when the controller offers it (MMIO doorbells only when needed); "
                   "default: where it pays, not on QEMU's nvme model (docs/benchmarks.md)")
@click.option("--sgl", is_flag=True,
              help="describe each I/O's data with an SGL Data Block descriptor instead of PRPs (where Identify "
                   "Controller SGLS offers SGLs)")
@click.option("--sq-in-cmb", "sq_in_cmb", is_flag=True,
              help="place the submission queue in the controller's Controller Memory Buffer (CMBSZ.SQS)")
@click.option("--verify", is_flag=True,
              help="integrity mode (like fio's verify): every written block carries its LBA, a sequence number "
                   "and a CRC32C; blocks read back are checked; mismatches exit 4 (writes the range!)")
@click.option("--queues", type=click.IntRange(1, 64), default=1, show_default=True,
              help="I/O queue pairs run at once, each by its own thread, each -q deep, -n shared out (through "
                   "--socket: one service session per queue)")
@click.option("--shared-poller/--thread-per-queue", "shared_poller", default=None,
              help="one thread polls every queue of every controller given (as an SPDK reactor; --mode poll only), "
                   "pinned to the first --cpu or else the first CPU; or a thread per queue. Default: a thread per "
                   "queue, except with several controllers polled where those threads would take every CPU")
@click.option("--iodepth-batch", "iodepth_batch", type=click.IntRange(1, 4095), default=1, show_default=True,
              help="issue only when this many I/Os can go with one SQ tail doorbell (fio's iodepth_batch_submit); "
                   "at most -q")
@click.option("--iodepth-batch-complete-max", "reap_max", type=click.IntRange(0, 4095), default=None,
              help="reap at most this many completions before the CQ head doorbell and the next refill (fio's "
                   "iodepth_batch_complete_max); 0: every ready one; default: every ready one (past -q 64 each "
                   "command re-posted as it is reaped, the CQ head and SQ tail doorbells back to back), and past "
                   "-q 128 a quarter of -q once the reaps show whole-queue waves (through the service: that "
                   "quarter from the start); the JSON's iodepth_batch_complete_max is the cap in force at the end")
@io_queue_size_opt
@cpu_list_opt
@_workload_options
@service_socket_opt
@output_opt
def perf(address: tuple[str, ...], nsid: int, workload: str, queue_depth: int, io_size: int, seconds: float | None,
         count: int | None, lba_range: str | None, mode: str, rwmixread: int, ramp: float, shadow: bool | None,
         sgl: bool, sq_in_cmb: bool, verify: bool, queues: int, shared_poller: bool | None, iodepth_batch: int,
         reap_max: int | None, io_queue_size: int | None, cpus: list[int] | None, service_socket: str | None,
         fmt: str) -> None:
    """Measure IOPS, bandwidth and latency (like spdk_nvme_perf / fio).

    \b
    Example: nvmevfio perf 00:04.0 -w randread -q 32 -s 4096 -t 10
             nvmevfio perf 00:04.0 -w write -q 8 -s 131072 -n 10000 -o json
             nvmevfio perf 00:04.0 -w randrw -q 16 --verify -t 60 --range 0:65536
             nvmevfio perf 00:04.0 -w randread -q 32 --queues 2 --cpu 0,1   (two queue pairs, a thread each)
             nvmevfio perf --socket /run/nvmevfio/nvmevfio.sock -w randread -q 32   (through the daemon)
             nvmevfio perf 00:04.0 00:05.0 -w randread -q 32   (two controllers: a row each and the total)
             nvmevfio perf 00:04.0 00:05.0 -w randread -q 32 --shared-poller   (both polled by one thread)
             nvmevfio perf 00:04.0 -w randread -q 32 --iodepth-batch 16   (SQ doorbells for 16 or more)
             nvmevfio perf 00:04.0 --mix read:70,write:20,trim:5,flush:5 --bs 4k:50,16k:30,128k:20 -q 16 \\
                 --jobs 2 --verify --verify-map run.map -t 60 --rate 20000   (the workload engine)
             nvmevfio perf 00:04.0 --verify-only --verify-map run.map   (check an earlier run's blocks)
    """
    from nvmevfio import perf as perfmod

    engine = click.get_current_context().meta.get(_ENGINE, {})
    if service_socket and io_queue_size:
        _fail("--socket: the daemon sizes its queues (serve --queue-depth): no --io-queue-size", EXIT_ERROR)
    entries = io_queue_entries(queue_depth, io_queue_size, "-q")
    if engine and (iodepth_batch > 1 or reap_max is not None):
        _fail("--iodepth-batch and --iodepth-batch-complete-max are perf's C loop's: the workload engine (--mix, "
              "--bs, ...) issues as it goes", EXIT_ERROR)
    if shared_poller and (mode != "poll" or verify or engine or service_socket):
        _fail("--shared-poller: one thread spins over every queue in perf's C loop: --mode poll, and no --verify, "
              "workload engine options or --socket", EXIT_ERROR)
    if len(address) > 1:
        if service_socket:
            _fail("--socket serves one controller: give no ADDRESS with it", EXIT_ERROR)
        if engine:
            _fail("the workload engine (--mix, --bs, --verify-map, ...) runs on one controller at a time: "
                  "give one ADDRESS", EXIT_ERROR)
        check_cpus(cpus)
        _perf_many(address, nsid, fmt, mode=mode, opened={"shadow_doorbells": shadow, "sgl": sgl,
                                                          "sq_in_cmb": sq_in_cmb, **entries},
                   workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=seconds, count=count,
                   lba_range=_lba_range(lba_range), rwmixread=rwmixread, ramp_s=ramp, verify=verify,
                   queues=queues, cpus=cpus, shared_poller=shared_poller, iodepth_batch=iodepth_batch,
                   iodepth_batch_complete_max=reap_max)
        return
    one = address[0] if address else ""
    if engine:  # the workload engine (--mix, --bs, ...): its own options, run and report
        _perf_engine(engine, address=one, nsid=nsid, workload=workload, queue_depth=queue_depth,
                     io_size=io_size, seconds=seconds, count=count, lba_range=lba_range, mode=mode,
                     rwmixread=rwmixread, ramp=ramp, shadow=shadow, sgl=sgl, sq_in_cmb=sq_in_cmb, verify=verify,
                     queues=queues, cpus=cpus, service_socket=service_socket, fmt=fmt, entries=entries)
        return

    if service_socket and (verify or mode != "poll" or sgl or sq_in_cmb):
        _fail("through --socket the daemon decides how completions arrive, its queues and its data descriptors, "
              "and perf runs its C loop: no --mode, --sgl, --sq-in-cmb or --verify", EXIT_ERROR)
    if verify and queues > 1:
        _fail("--verify runs in Python on one queue: no --queues", EXIT_ERROR)
    check_cpus(cpus)
    opened: dict[str, Any] = {"sgl": True} if sgl else {}
    opened.update({"sq_in_cmb": True} if sq_in_cmb else {})

    rng = _lba_range(lba_range)
    live = sys.stderr.isatty() and fmt == "normal"

    def status(elapsed: float, ios: int) -> None:
        click.echo(f"\r  {elapsed:5.1f} s  {ios / elapsed:10.0f} IOPS", nl=False, err=True)

    with contextlib.ExitStack() as stack:
        if service_socket and queues > 1:  # one session per queue, each its share of the grant's depth
            from nvmevfio.service.client import connect

            stack.enter_context(errors())
            dev: Any = [stack.enter_context(connect(service_socket, nsid, queue_depth=queue_depth))
                        for _ in range(queues)]
        else:
            dev = stack.enter_context(blockdev(one, nsid, service_socket, irq=mode == "irq", shadow_doorbells=shadow,
                                               queues=queues, **({} if service_socket else entries), **opened))
            stack.enter_context(errors())
        res = perfmod.run(dev, workload=workload, io_size=io_size, queue_depth=queue_depth, seconds=seconds,
                          hybrid=mode == "hybrid", count=count, lba_range=rng, rwmixread=rwmixread,
                          status=status if live else None, ramp_s=ramp, verify=verify, queues=queues, cpus=cpus,
                          shared_poller=bool(shared_poller), iodepth_batch=iodepth_batch,
                          iodepth_batch_complete_max=reap_max)
    if live:
        click.echo("", err=True)
    bad = len(res.mismatches)
    if fmt == "json":
        _emit_json(res.to_dict())
        if bad:
            sys.exit(EXIT_MISMATCH)
        return
    click.echo(f"{service_socket or _address(one)} nsid {nsid}: {res.workload}, {res.io_size} B, "
               f"QD {res.queue_depth}, {res.mode}, {res.seconds:.2f} s, {res.ios} I/Os ({res.reads} reads, "
               f"{res.writes} writes), "
               f"{res.errors} errors")
    if not res.verify:  # the verify loop runs in Python: these figures are the C loop's
        click.echo(f"data: {res.data_descriptors.upper()}s; submission queue in "
                   f"{'the Controller Memory Buffer' if res.sq_in_cmb else 'host memory'}"
                   + (f"; {res.io_queue_size} entries a queue" if res.io_queue_size else ""))
        click.echo(f"doorbells: shadow {'on' if res.shadow_doorbells else 'off'}, MMIO writes "
                   f"{res.sq_doorbell_mmio} SQ tail / {res.cq_doorbell_mmio} CQ head, {res.shadow_only_updates} "
                   "updates without MMIO")
        click.echo(f"profile: {res.wait_pct:.0f}% of the time waiting for the device, {res.doorbell_pct:.0f}% in "
                   f"MMIO doorbell writes ({res.sq_doorbell_us:.1f} us an SQ tail, {res.cq_doorbell_us:.1f} us a CQ "
                   f"head), {res.ios_per_submit:.1f} commands per submit, {res.ios_per_reap:.1f} per reap"
                   + ("; each command re-posted as it was reaped" if res.refill_as_reaped else ""))
        click.echo(f"cpu: {res.cpu_us_per_io:.1f} us per I/O ({res.usr_us_per_io:.1f} user, {res.sys_us_per_io:.1f} "
                   f"system), the loop threads off CPU {100 * res.wait_share:.0f}% of the time")
    _perf_table(res)
    if res.verify:
        click.echo(f"verify: {res.verified_blocks} blocks read back and checked, {bad} mismatches")
        for lba, want, found in res.mismatches[:10]:
            click.echo(f"  LBA {lba}: expected lba {want[0]} seq {want[1]} crc32c {want[2]:#010x}; found magic "
                       f"{found[0]:#010x} lba {found[1]} seq {found[2]} crc32c {found[3]:#010x}")
        if bad:
            _fail(f"verify: {bad} blocks did not hold what was written", EXIT_MISMATCH)


def _lba_range(text: str | None) -> tuple[int, int] | None:
    """--range START:END (LBAs, END excluded)."""
    if not text:
        return None
    try:
        a, b = (int(x, 0) for x in text.split(":"))
    except ValueError:
        _fail(f"--range {text!r}: expected START:END", EXIT_ERROR)
    return a, b


def _perf_many(addresses: tuple[str, ...], nsid: int, fmt: str, *, mode: str, opened: dict[str, Any],
               verify: bool, queues: int, **kw: Any) -> None:
    """perf over several controllers at once (nvmevfio/perf_many.py): each opened here, a row each
    and the total."""
    from nvmevfio.perf_many import run_many, table

    if verify and queues > 1:
        _fail("--verify runs in Python on one queue: no --queues", EXIT_ERROR)
    named = [_address(a) for a in addresses]
    if len(set(named)) != len(named):
        _fail(f"a controller named twice: {' '.join(named)}", EXIT_ERROR)
    with contextlib.ExitStack() as stack:
        devs = [(a, stack.enter_context(blockdev(a, nsid, irq=mode == "irq", queues=queues, **opened)))
                for a in named]
        stack.enter_context(errors())
        res = run_many(devs, hybrid=mode == "hybrid", verify=verify, queues=queues, **kw)
    if fmt == "json":
        _emit_json(res.to_dict())
    else:
        first = res.controllers[0]
        click.echo(f"{len(devs)} controllers, nsid {nsid}: {first['workload']}, {first['io_size']} B, "
                   f"QD {first['queue_depth']} x {queues} queue(s) each, {first['mode']}, "
                   f"{res.total['seconds']:.2f} s, {res.total['ios']} I/Os, {res.total['errors']} errors")
        click.echo(f"NUMA: {res.numa}")
        click.echo(("poller: one thread polls every controller's queues" if res.poller == "shared"
                    else "poller: a thread per queue") + f" ({res.poller_why})")
        for line in table(res):
            click.echo(line)
        if verify:
            click.echo(f"verify: {res.total['verified_blocks']} blocks read back and checked, "
                       f"{res.mismatches} mismatches")
    if res.mismatches:
        _fail(f"verify: {res.mismatches} blocks did not hold what was written", EXIT_MISMATCH)


def _perf_table(res: Any) -> None:
    """IOPS, bandwidth and latency: one row, or with several queues a row per queue (its CPU, its
    CPU time per I/O, its share off CPU) and the total."""
    head = (f"{'IOPS':>12} {'MiB/s':>10} {'avg(us)':>10} {'min(us)':>10} {'max(us)':>10} {'p50(us)':>10} "
            f"{'p99(us)':>10} {'p99.9(us)':>10}")

    def figures(r: Any) -> str:
        return (f"{r['iops']:12.1f} {r['mib_per_s']:10.2f} {r['lat_mean_us']:10.1f} {r['lat_min_us']:10.1f} "
                f"{r['lat_max_us']:10.1f} {r['lat_p50_us']:10.1f} {r['lat_p99_us']:10.1f} {r['lat_p999_us']:10.1f}")

    if res.queues == 1:
        click.echo(head)
        click.echo(figures(res.to_dict()))
        return
    click.echo(f"{'queue':>6} {'cpu':>4} {head} {'cpu(us/IO)':>10} {'off-cpu':>7}")
    for q in res.per_queue:
        cpu = "-" if q["cpu"] is None else str(q["cpu"])
        click.echo(f"{q['queue']:>6} {cpu:>4} {figures(q)} {q['cpu_us_per_io']:10.1f} {100 * q['wait_share']:6.0f}%")
    click.echo(f"{'total':>6} {'':>4} {figures(res.to_dict())} {res.cpu_us_per_io:10.1f} "
               f"{100 * res.wait_share:6.0f}%")


@main.command()
@click.argument("address", nargs=-1, required=True, shell_complete=_complete_address)
@click.option("--grants", "grants_path", type=click.Path(dir_okay=False, exists=True), required=True,
              help="the grants file (TOML): who may use which namespace window, how")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), default=DEFAULT_SOCKET,
              show_default=True, help="the Unix socket clients connect to")
@click.option("--clients", type=click.IntRange(1, 64), default=4, show_default=True,
              help="client slots: one NVMe I/O queue pair each")
@click.option("--queue-depth", type=click.IntRange(2, 4096), default=64, show_default=True,
              help="entries per I/O queue (a client's depth is its grant's, at most this minus one)")
@click.option("--mode", type=click.Choice(["irq", "poll"]), default="irq", show_default=True,
              help="completions by MSI-X interrupts, or polling while commands are in flight")
@click.option("--idle-spin-us", type=click.IntRange(0, 10_000_000), default=1000, show_default=True,
              help="poll mode: keep polling this long after the last request or completion before "
                   "sleeping (clients skip their doorbell meanwhile); 0 sleeps at once")
@cpu_opt
def serve(address: tuple[str, ...], grants_path: str, socket_path: str, clients: int, queue_depth: int, mode: str,
          idle_spin_us: int, cpu: int | None) -> None:
    """Own a controller and serve its namespaces to unprivileged clients (grants file).

    Clients use nvmevfio.connect(SOCKET, nsid=…) or the block commands' --socket. Runs until
    SIGTERM or Ctrl-C; then every session ends (its commands waited for, its memory scrubbed)
    and the controller is shut down.

    Several controllers: one socket each, SOCKET with the controller's address before its suffix
    (nvmevfio-0000:00:04.0.sock); a grant with controller = "ADDRESS" applies on that one only.

    \b
    Example: nvmevfio serve 00:04.0 --grants /etc/nvmevfio/grants.toml
             nvmevfio serve 00:04.0 00:05.0 --grants /etc/nvmevfio/grants.toml
    """
    import logging

    from nvmevfio.service.daemon import Service, controller_socket, run, run_several
    from nvmevfio.service.grants import GrantsError, for_controller, load_grants

    named = [_address(a) for a in address]
    if len(set(named)) != len(named):
        _fail(f"a controller named twice: {' '.join(named)}", EXIT_ERROR)
    try:
        grants = load_grants(grants_path)
        mine = {a: for_controller(grants, a, named) for a in named}
    except GrantsError as exc:
        _fail(str(exc), EXIT_ERROR)
    _pin(cpu)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="nvmevfio serve: %(message)s")
    opts: dict[str, Any] = {"clients": clients, "queue_depth": queue_depth, "irq": mode == "irq",
                            "idle_spin_s": idle_spin_us / 1e6}
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(controller(a, enable=False)) for a in named]
        stack.enter_context(errors())
        try:
            if len(sessions) == 1:
                run(sessions[0], mine[named[0]], socket_path, address=sessions[0].address, **opts)
            else:
                run_several([Service(s, mine[a], controller_socket(socket_path, a), address=a, **opts)
                             for a, s in zip(named, sessions)])
        except GrantsError as exc:
            _fail(str(exc), EXIT_ERROR)


@main.command("monitor")
@address_arg
@click.option("-c", "--count", type=click.IntRange(min=1), help="exit after this many events")
@click.option("-d", "--duration", type=click.FloatRange(min=0), help="exit after this many seconds")
@output_opt
def monitor(address: str, count: int | None, duration: float | None, fmt: str) -> None:
    """Print asynchronous events as they arrive (Asynchronous Event Request, admin opcode 0Ch).

    The broker keeps AERs outstanding, reads the log page each event names (which clears it) and
    re-identifies the namespaces on a namespace notice. Runs until Ctrl-C, --count events or
    --duration seconds; exit 0. With -o json, one JSON object a line (JSON Lines). The controller
    is this command's while it runs.

    \b
    Example: nvmevfio monitor 00:04.0 -o json --count 1
    """
    import time

    seen = 0
    deadline = None if duration is None else time.monotonic() + duration
    with controller(address) as s, errors():
        cfg = s.event_config
        if cfg["events_off"]:
            _fail(f"the controller refused Asynchronous Event Requests: {cfg['events_off']}", EXIT_DEVICE)
        aec = f"{cfg['aec']:#x}" if cfg["aec"] is not None else "not set"
        click.echo(f"monitoring {_address(address)}: {cfg['outstanding']} Asynchronous Event Requests "
                   f"outstanding, Asynchronous Event Configuration {aec}; Ctrl-C to stop", err=True)
        try:
            while (count is None or seen < count) and (deadline is None or time.monotonic() < deadline):
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
                for ev in s.poll_events(wait):
                    if fmt == "json":
                        click.echo(json.dumps(ev.as_dict()))
                    else:
                        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ev.time))
                        click.echo(f"{stamp} {_address(address)}: {ev}")
                    seen += 1
                    if count is not None and seen >= count:
                        break
        except KeyboardInterrupt:
            pass
    click.echo(f"{seen} event{'s' if seen != 1 else ''}", err=True)
