"""Serving a namespace as a disk: nbd (nbdkit + the Python plugin) and ublk (the C server)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from nvmevfio.cli.common import (
    EXIT_ERROR,
    EXIT_SETUP,
    Ctx,
    _address,
    _complete_address,
    _emit_json,
    _fail,
    _need_root,
    _root_option,
    address_arg,
    blockdev,
    check_cpus,
    controller,
    cpu_list_opt,
    errors,
    io_queue_entries,
    io_queue_size_opt,
    main,
    nsid_opt,
    output_opt,
)


# ------------------------------------------------------------------ NBD export
@main.command()
@address_arg
@nsid_opt
@click.option("--socket", "socket_path", type=click.Path(path_type=Path),
              help="Unix socket to serve on (default /run/nvmevfio/nbd-ADDRESS-nNSID.sock)")
@click.option("--port", type=click.IntRange(1, 65535), help="serve on loopback TCP 127.0.0.1:PORT instead")
@click.option("--read-only", "readonly", is_flag=True, help="export read-only")
@click.option("--queues", type=click.IntRange(1, 64), default=4, show_default=True,
              help="I/O queue pairs: one per request in progress (nbdkit's parallel threads)")
@click.option("--mode", type=click.Choice(["irq", "poll"]), default="irq", show_default=True,
              help="completions by MSI-X interrupts, or polling (a spinning CPU per busy queue)")
@click.option("--background", is_flag=True,
              help="start nbdkit detached, wait until the device is open, print how to attach, return")
@click.option("--stop", is_flag=True, help="stop the background export of ADDRESS / -n (SIGTERM; the device "
                                           "is shut down cleanly)")
@click.option("--pidfile", type=click.Path(path_type=Path),
              help="nbdkit's pid file (default /run/nvmevfio/nbd-ADDRESS-nNSID.pid)")
@click.option("--plugin", type=click.Choice(["auto", "file", "python"]), default="auto", show_default=True,
              help="file: nbdkit's C file plugin on the namespace's ublk device (started, or the one serving "
                   "it), C end to end; python: nvmevfio's Python plugin; auto: file where the kernel has ublk")
@output_opt
def nbd(address: str, nsid: int, socket_path: Path | None, port: int | None, readonly: bool, queues: int,
        mode: str, background: bool, stop: bool, pidfile: Path | None, plugin: str, fmt: str) -> None:
    """Serve a namespace over NBD (nbdkit with its C file plugin over ublk, or nvmevfio's Python
    plugin), to use it as a disk.

    Runs in the foreground (Ctrl-C stops it) unless --background. Attach it with nbd-client,
    then mkfs and mount as any disk. Flush, trim (Deallocate), write-zeroes, FUA and
    multi-conn are offered; block size and max transfer are advertised.

    \b
    Example: nvmevfio nbd 00:04.0 --background
             nbd-client -unix /run/nvmevfio/nbd-0000:00:04.0-n1.sock /dev/nbd0 -b 512
             mkfs.ext4 /dev/nbd0 && mount /dev/nbd0 /mnt
             nvmevfio nbd 00:04.0 --stop
    """
    from nvmevfio import nbd as nbdmod

    address = _address(address)
    pidfile = pidfile or nbdmod.default_pidfile(address, nsid, socket_path)
    if stop:
        with errors():
            pid, ublk_dev = nbdmod.stop_export(pidfile)
        click.echo(f"{address} nsid {nsid}: NBD export stopped (" + ", ".join(
            ([f"nbdkit {pid}"] if pid is not None else []) + ([f"ublk {ublk_dev}"] if ublk_dev else [])) + ")")
        return
    if socket_path is not None and port is not None:
        _fail("--socket and --port exclude each other", EXIT_ERROR)
    if port is None:
        socket_path = socket_path or nbdmod.default_socket(address, nsid)
    with errors():
        chosen, why = nbdmod.choose_plugin(plugin, plugin != "python" and nbdmod.ublk_present())
    if chosen == "file":
        _nbd_file(address, nsid, socket_path, port, readonly, queues, mode, background, pidfile, why, fmt)
        return
    click.echo(f"{address} nsid {nsid}: nbdkit's Python plugin ({why})", err=True)
    with errors():
        want = nbdmod.nbdkit_python_version()
    if want != sys.version_info[:2]:
        _fail(f"nbdkit's Python plugin embeds Python {want[0]}.{want[1]}, this environment is "
              f"{sys.version_info[0]}.{sys.version_info[1]}: install nvmevfio for Python {want[0]}.{want[1]}",
              EXIT_SETUP)
    with controller(address) as s, errors():
        block_size = s.identify_namespace(nsid).block_size
    with errors():  # only the folders of the paths in use; one line where /run is not writable
        nbdmod.prepare_run_dirs(socket_path, pidfile)
    if socket_path is not None:
        with errors():
            nbdmod.clear_stale_socket(socket_path)
    ready = pidfile.with_suffix(".ready")
    ready.unlink(missing_ok=True)
    cmd = nbdmod.nbdkit_command(address, nsid, socket=socket_path, port=port, readonly=readonly, queues=queues,
                                block_size=block_size, pidfile=pidfile, ready=ready if background else None,
                                verbose=Ctx.verbose, foreground=not background, mode=mode)
    where = f"unix:{socket_path}" if socket_path is not None else f"nbd://127.0.0.1:{port}"
    attach = (f"nbd-client -unix {socket_path} /dev/nbd0 -b {min(block_size, 4096)}" if socket_path is not None
              else f"nbd-client 127.0.0.1 {port} /dev/nbd0 -b {min(block_size, 4096)}")
    if not background:
        click.echo(f"{address} nsid {nsid}: serving NBD on {where} (Ctrl-C stops); attach: {attach}", err=True)
        os.execvpe(cmd[0], cmd, nbdmod.nbdkit_env())
    log = pidfile.with_suffix(".log")
    import subprocess

    pidfile.unlink(missing_ok=True)
    with log.open("ab") as logf:  # nbdkit forks into the background itself once its socket is bound
        proc = subprocess.Popen(cmd, env=nbdmod.nbdkit_env(), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    with errors():
        info = nbdmod.wait_ready(proc, pidfile, ready, log, timeout_s=120)
    info.update({"socket": str(socket_path) if socket_path else None, "port": port, "pidfile": str(pidfile),
                 "log": str(log), "attach": attach, "read_only": readonly, "queues": queues, "mode": mode,
                 "plugin": "python", "ublk_device": None, "ublk_started": False})
    if fmt == "json":
        _emit_json(info)
        return
    click.echo(f"{address} nsid {nsid}: serving NBD on {where} (nbdkit pid {info['pid']}, log {log})")
    click.echo(f"attach: {attach}")
    click.echo(f"stop:   nvmevfio nbd {address} -n {nsid} --stop")


def _nbd_file(address: str, nsid: int, socket_path: Path | None, port: int | None, readonly: bool, queues: int,
              mode: str, background: bool, pidfile: Path, why: str, fmt: str) -> None:
    """`nvmevfio nbd --plugin file`: the namespace's ublk device (the one serving it, or a new
    one, recorded next to the pid file so that --stop takes down only what this started), then
    nbdkit's C file plugin on it."""
    import subprocess

    from nvmevfio import nbd as nbdmod
    from nvmevfio import ublk as ub

    claim = nbdmod.ublk_claim_path(pidfile)
    with errors():  # only the folders of the paths in use; one line where /run is not writable
        nbdmod.prepare_run_dirs(socket_path, pidfile)
        if socket_path is not None:
            nbdmod.clear_stale_socket(socket_path)
        found = nbdmod.serving_ublk(address, nsid, claim)
    if found is not None:
        ublk_info, started = found
    else:
        with errors():
            ublk_info = start_background(address, nsid, queues=min(queues, ub.possible_cpus()),
                                         depth=ub.DEFAULT_DEPTH, mode=mode, readonly=readonly)
        nbdmod.write_claim(claim, ublk_info)
        started = True
    device = str(ublk_info["device"])
    how = "started" if found is None else "its own, serving still" if started else "found serving, left running"
    click.echo(f"{address} nsid {nsid}: nbdkit's file plugin on {device} ({how}), C end to end ({why})", err=True)
    with errors():
        size, block_size = nbdmod.block_device_geometry(device)
    cmd = nbdmod.nbdkit_file_command(device, socket=socket_path, port=port, readonly=readonly, queues=queues,
                                     pidfile=pidfile, verbose=Ctx.verbose, foreground=not background)
    where = f"unix:{socket_path}" if socket_path is not None else f"nbd://127.0.0.1:{port}"
    attach = (f"nbd-client -unix {socket_path} /dev/nbd0 -b {min(block_size, 4096)}" if socket_path is not None
              else f"nbd-client 127.0.0.1 {port} /dev/nbd0 -b {min(block_size, 4096)}")
    if not background:
        click.echo(f"{address} nsid {nsid}: serving NBD on {where} (Ctrl-C stops); attach: {attach}", err=True)
        try:
            subprocess.run(cmd)
        except KeyboardInterrupt:
            pass
        finally:
            if found is None:
                with errors():
                    nbdmod.release_ublk(claim)
        return
    log = pidfile.with_suffix(".log")
    pidfile.unlink(missing_ok=True)
    with log.open("ab") as logf:  # nbdkit forks into the background itself once its socket is bound
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
    try:
        with errors():
            pid = nbdmod.wait_forked(proc, pidfile, log, timeout_s=120)
    finally:
        if proc.poll() and found is None:  # nothing serves: nor does the ublk device this started
            with errors():
                nbdmod.release_ublk(claim)
    info = {"pid": pid, "address": address, "nsid": nsid, "size": size, "block_size": block_size,
            "socket": str(socket_path) if socket_path else None, "port": port, "pidfile": str(pidfile),
            "log": str(log), "attach": attach, "read_only": readonly, "queues": queues, "mode": mode,
            "plugin": "file", "ublk_device": device, "ublk_dev_id": ublk_info["dev_id"], "ublk_started": started}
    if fmt == "json":
        _emit_json(info)
        return
    click.echo(f"{address} nsid {nsid}: serving NBD on {where} (nbdkit pid {pid}, file plugin on {device}, "
               f"log {log})")
    click.echo(f"attach: {attach}")
    click.echo(f"stop:   nvmevfio nbd {address} -n {nsid} --stop")


# ------------------------------------------------------------------ ublk block device
@main.command()
@click.argument("address", required=False, default=None, shell_complete=_complete_address)
@nsid_opt
@click.option("--queues", type=click.IntRange(1, 64), default=None,
              help="ublk queues, each on its own NVMe I/O queue pair and thread  "
                   "[default: see --mode; else one per CPU, at most 4 and at most the controller's grant]")
@click.option("--depth", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="requests in flight per queue (one DMA buffer slot each)")
@click.option("--mode", type=click.Choice(["poll", "irq"]), default=None,
              help="NVMe completions by MSI-X interrupts or by polling (while commands are in flight); either way "
                   "an idle server spins up to 300 us for the next request or completion before it sleeps  "
                   "[default: where a thread per CPU would take every CPU (2 to 4 CPUs), one queue, polled, on the "
                   "last CPU; otherwise irq and a queue per CPU; with --queues or --cpu alone, irq]")
@click.option("--read-only", "readonly", is_flag=True, help="a read-only disk")
@click.option("--refuse-writes", is_flag=True,
              help="the server fails every write (EROFS) while the disk is not marked read-only: what "
                   "Linux's NVMe target needs to export it read-only (nvmevfio export --read-only)")
@click.option("--recoverable", is_flag=True,
              help="ublk user recovery: a server that dies leaves the disk waiting for --recover (I/O held)")
@click.option("--background", is_flag=True, help="serve from a detached process; print the device and return")
@click.option("--stop", "stop_dev", type=int, metavar="DEV", help="stop ublk device DEV (its number: /dev/ublkbDEV)")
@click.option("--recover", "recover_dev", type=int, metavar="DEV",
              help="serve device DEV again after its --recoverable server died")
@click.option("--list", "list_", is_flag=True, help="list ublk devices, their servers, and stale ones")
@io_queue_size_opt
@cpu_list_opt
@click.option("--notify-fd", type=int, hidden=True)
@output_opt
def ublk(address: str | None, nsid: int, queues: int | None, depth: int, mode: str | None, readonly: bool,
         refuse_writes: bool,
         recoverable: bool, background: bool, stop_dev: int | None, recover_dev: int | None, list_: bool,
         io_queue_size: int | None, cpus: list[int] | None, notify_fd: int | None, fmt: str) -> None:
    """Serve a namespace as a Linux ublk block device (/dev/ublkbN): every request in C, one NVMe
    command each. Runs until SIGTERM or Ctrl-C (drain, stop, delete, controller shutdown).

    \b
    Example: nvmevfio ublk 00:04.0 --background     (prints /dev/ublkb0)
             mkfs.ext4 /dev/ublkb0 && mount /dev/ublkb0 /mnt
             nvmevfio ublk --stop 0
             nvmevfio ublk 00:04.0 --mode irq --background   (a queue per CPU, interrupts)
             nvmevfio ublk 00:04.0 --mode poll --cpu 1 --background   (every queue's poller on CPU 1)
    """
    from nvmevfio import ublk as ub
    from nvmevfio import ublk_devices as ubd

    if sum(map(bool, (background or recover_dev is not None, stop_dev is not None, list_))) > 1:
        _fail("--stop, --list and serving (--background, --recover) exclude each other", EXIT_ERROR)
    if list_ or stop_dev is not None:
        _need_root()
        with errors():
            if list_:
                devs = ubd.list_devices()
                if fmt == "json":
                    _emit_json([d.to_dict() for d in devs])
                    return
                for d in devs:
                    who = f"{d.address} nsid {d.nsid}" if d.address else "not nvmevfio's"
                    srv = (f"server pid {d.server_pid}" if d.server_alive
                           else "waiting for --recover" if d.waiting_for_recovery else "stale: server gone")
                    click.echo(f"/dev/ublkb{d.dev_id}: {who}, {d.state}, {srv}, {d.queues} queue(s) x {d.depth}")
                return
            assert stop_dev is not None
            d = ubd.stop_device(stop_dev)
        click.echo(f"/dev/ublkb{stop_dev} stopped ({'server pid ' + str(d.server_pid) if d.server_alive else 'stale'})")
        return
    _need_root()
    with errors():
        ubd.require_ublk()
        target = ubd.recovery_target(recover_dev) if recover_dev is not None else None
    if target is not None:
        assert target.address is not None and target.nsid is not None
        if address is not None and _address(address) != target.address:
            _fail(f"/dev/ublkb{recover_dev} serves {target.address}, not {_address(address)}", EXIT_ERROR)
        address, nsid, depth = target.address, target.nsid, target.depth
        recoverable = True
    if not address:
        _fail("give the controller's ADDRESS (or --stop DEV, --recover DEV, --list)", EXIT_ERROR)
    assert address is not None
    address = _address(address)
    check_cpus(cpus)
    entries = io_queue_entries(depth, io_queue_size, "--depth")
    if target is None:
        with errors():
            ubd.check_not_served(address, nsid)
    if background:  # the server process chooses its shape from the same options
        with errors():
            info = start_background(address, nsid, queues=queues, depth=depth, mode=mode,
                                    readonly=readonly, refuse_writes=refuse_writes, recoverable=recoverable,
                                    recover_dev=recover_dev, cpus=cpus, io_queue_size=io_queue_size)
        if fmt == "json":
            _emit_json(info)
        else:
            click.echo(info["device"])
        return
    shape = ub.choose_shape(queues, mode, cpus, allowed=os.sched_getaffinity(0), per_cpu=ub.default_queues(),
                            fixed_queues=target.queues if target is not None else None)
    default_count = shape.queues is None  # one per CPU up to four, fewer where the controller grants fewer
    with blockdev(address, nsid, irq=shape.mode == "irq", queues=shape.queues or ub.default_queues(),
                  queues_up_to=default_count, **entries) as dev, errors():
        queues = dev.info.io_queues
        server = ub.Server(dev, address=address, queues=queues, depth=depth, read_only=readonly,
                           recoverable=recoverable, refuse_writes=refuse_writes, cpus=shape.cpus)
        with ub.signals_stop(server):
            try:
                if target is not None:
                    server.adopt(target)
                else:
                    server.add()
                server.start(recovering=target is not None)
                info = {"device": server.block_device, "dev_id": server.dev_id, "address": address, "nsid": nsid,
                        "pid": os.getpid(), "queues": queues, "depth": depth,
                        "io_queue_size": dev.info.queue_depth, "mode": shape.mode,
                        "cpus": server.queue_cpus(), "shape_why": shape.why, "read_only": readonly,
                        "refuse_writes": refuse_writes, "serial": dev.info.serial,
                        "recoverable": recoverable, "io_bytes": server.geometry.io_bytes,
                        "block_size": server.geometry.block_size, "size": server.geometry.blocks *
                        server.geometry.block_size}
                click.echo(json.dumps(info) if fmt == "json" else server.block_device)
                sys.stdout.flush()
                pins = sorted({c for c in server.queue_cpus() if c is not None})
                click.echo(f"{server.block_device}: {queues} queue(s), {shape.mode}"
                           f"{', on CPU ' + ','.join(map(str, pins)) if pins else ''}; {shape.why}", err=True)
                if notify_fd is not None:
                    os.write(notify_fd, (json.dumps(info) + "\n").encode())
                    os.close(notify_fd)
                server.serve()
            finally:
                server.close()
        click.echo(f"{address} nsid {nsid}: ublk device stopped; {server.counters()}", err=True)


def start_background(address: str, nsid: int, *, queues: int | None = None, depth: int = 64,
                     mode: str | None = None, readonly: bool = False, refuse_writes: bool = False,
                     recoverable: bool = False, recover_dev: int | None = None,
                     cpus: list[int] | None = None, io_queue_size: int | None = None) -> dict[str, Any]:
    """Start `nvmevfio ublk` detached (its log in /run/nvmevfio) and return what it printed once
    its device is up (nvmevfio export starts its server this way too). The server's last log
    line is the error when it ends first."""
    import subprocess

    from nvmevfio import ublk_devices as ubd

    ubd.RUN_DIR.mkdir(parents=True, exist_ok=True)
    logpath = ubd.RUN_DIR / f"ublk-{address}-n{nsid}.log"
    rfd, wfd = os.pipe()
    cmd = [sys.executable, "-m", "nvmevfio"]
    for name in ("timeout", "backend"):
        if _root_option(name) is not None:
            cmd += [f"--{name}", str(_root_option(name))]
    if _root_option("unsafe_noiommu"):
        cmd.append("--unsafe-noiommu")
    cmd += ["ublk", address, "-n", str(nsid), *(["--queues", str(queues)] if queues else []), "--depth", str(depth),
            *(["--mode", mode] if mode else []), "--notify-fd", str(wfd)]
    cmd += ["--read-only"] if readonly else []
    cmd += ["--refuse-writes"] if refuse_writes else []
    cmd += ["--recoverable"] if recoverable else []
    cmd += ["--recover", str(recover_dev)] if recover_dev is not None else []
    cmd += ["--cpu", ",".join(map(str, cpus))] if cpus else []
    cmd += ["--io-queue-size", str(io_queue_size)] if io_queue_size else []
    with logpath.open("ab") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, pass_fds=(wfd,),
                                start_new_session=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline()
    if not line:
        proc.wait(30)
        tail = [s for s in logpath.read_text(errors="replace").splitlines() if s.strip()]
        raise ubd.UblkError(tail[-1].removeprefix("nvmevfio: error: ") if tail
                            else f"the server exited ({proc.returncode})", reason="server-failed")
    info: dict[str, Any] = json.loads(line)
    info["log"] = str(logpath)
    return info
