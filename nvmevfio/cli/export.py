"""Sharing a namespace over the network: ``nvmevfio export`` puts its ublk device behind Linux's
NVMe target (nvmet) on NVMe/TCP (nvmevfio/export.py plans and applies the configfs part)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from nvmevfio.cli.common import (
    EXIT_ERROR,
    EXIT_SETUP,
    _address,
    _complete_address,
    _emit_json,
    _fail,
    _need_root,
    errors,
    main,
    nsid_opt,
    output_opt,
)
from nvmevfio.errors import NvmeVfioError


@main.command("export")
@click.argument("address", required=False, default=None, shell_complete=_complete_address)
@nsid_opt
@click.option("--tcp", "tcp", metavar="HOST:PORT", help="listen on this IP address and port (NVMe/TCP; port 4420 "
                                                        "when left out; 0.0.0.0 for every address)")
@click.option("--nqn", help="the subsystem NQN (default nqn.2014-08.org.nvmexpress:nvmevfio:SERIAL:nsNSID)")
@click.option("--allow-host", "hosts", multiple=True, metavar="HOSTNQN",
              help="a host NQN allowed to connect (repeatable; the initiator's /etc/nvme/hostnqn)")
@click.option("--any-host", is_flag=True, help="let any host connect (no access control: a warning is printed)")
@click.option("--read-only", "readonly", is_flag=True,
              help="the initiators' writes fail (the server refuses them); reads are served")
@click.option("--recoverable", is_flag=True,
              help="the ublk server it starts is --recoverable: if it dies, `nvmevfio ublk --recover N` brings "
                   "the export back while initiators wait and reconnect")
@click.option("--mode", type=click.Choice(["poll", "irq"]), default="irq", show_default=True,
              help="the ublk server it starts: NVMe completions by MSI-X interrupts, or polling (which spins a "
                   "CPU the TCP stack needs: 0.84 of the kernel's 128 KiB reads against 1.11 with irq, bench.py)")
@click.option("--stop", is_flag=True, help="take the export of ADDRESS / -n (or --nqn) down, and the ublk server it "
                                           "started")
@click.option("--list", "list_", is_flag=True, help="what is exported")
@output_opt
def export(address: str | None, nsid: int, tcp: str | None, nqn: str | None, hosts: tuple[str, ...],
           any_host: bool, readonly: bool, recoverable: bool, mode: str, stop: bool, list_: bool, fmt: str) -> None:
    """Export a namespace over NVMe/TCP through Linux's NVMe target (nvmet): its ublk device
    (started here unless `nvmevfio ublk` already serves it) becomes the namespace of an NVMe
    subsystem on a TCP port, which only the hosts named by --allow-host may connect to.

    \b
    Example: nvmevfio export 00:04.0 --tcp 10.0.0.1:4420 --allow-host nqn.2014-08.org.nvmexpress:uuid:...
             (on the initiator) nvme connect -t tcp -a 10.0.0.1 -s 4420 -n NQN
             nvmevfio export 00:04.0 --stop
    """
    from nvmevfio import export as ex

    if stop and list_:
        _fail("--stop and --list exclude each other", EXIT_ERROR)
    _need_root()
    if list_:
        _list(fmt)
        return
    if stop:
        _stop(address, nsid, nqn, fmt)
        return
    if not address or not tcp:
        _fail("give the controller's ADDRESS and --tcp HOST:PORT (or --stop, --list)", EXIT_ERROR)
    assert address is not None and tcp is not None
    with errors():  # what was asked, checked before anything starts
        where = ex.parse_tcp(tcp)
        ex.check_hosts(hosts, any_host)
        if nqn is not None:
            ex.check_nqn(nqn)
    address = _address(address)
    with errors():
        for rec in ex.load_records():
            if (rec.address, rec.nsid) == (address, nsid):
                raise ex.ExportError(f"{address} nsid {nsid} is already exported as {rec.nqn} on {rec.tcp}: "
                                     f"nvmevfio export {address} -n {nsid} --stop", reason="already-exported")
    fs = _prerequisites()
    if any_host:
        click.echo("nvmevfio: warning: --any-host: any host that reaches "
                   f"{where} can read and write this namespace", err=True)
    info, started = _ublk_device(address, nsid, readonly, recoverable, mode)
    try:
        with errors():
            serial = str(info.get("serial") or "")
            if nqn is None and not serial:
                raise ex.ExportError(f"{info['device']}'s server does not say the controller's serial: give --nqn",
                                     reason="bad-nqn")
            name = nqn or ex.derive_nqn(serial, nsid)
            _wait_block_device(info["device"])
            spec = ex.ExportSpec(nqn=name, device=info["device"], tcp=where, hosts=tuple(hosts), any_host=any_host,
                                 serial=serial)
            ops = ex.plan_export(spec, ex.survey(fs))
            ex.apply(fs, ops)
            rec = ex.Record(nqn=name, address=address, nsid=nsid, device=info["device"], dev_id=int(info["dev_id"]),
                            tcp=str(where), hosts=list(hosts), any_host=any_host, read_only=readonly,
                            ublk_started=started, ops=ex.ops_to_dicts(ops))
            try:
                ex.save_record(rec)
            except OSError:
                ex.unwind(fs, ops)
                raise
    except BaseException:
        if started:
            _stop_ublk(int(info["dev_id"]))
        raise
    out = rec.to_dict()
    out.pop("ops")
    out["connect"] = f"nvme connect -t tcp -a {where.traddr} -s {where.trsvcid} -n {name}"
    if fmt == "json":
        _emit_json(out)
        return
    click.echo(f"{address} nsid {nsid}: {info['device']} exported as {name} on tcp {where}"
               f"{' (read-only)' if readonly else ''}")
    click.echo(f"connect: {out['connect']}")
    click.echo(f"stop:    nvmevfio export {address} -n {nsid} --stop")


def _prerequisites() -> Any:
    """ublk, nvmet and nvmet-tcp (loaded when they can be), or one line naming what to load."""
    from nvmevfio import export as ex
    from nvmevfio import ublk_devices as ubd

    try:
        ubd.require_ublk()
    except NvmeVfioError:
        _fail(f"ublk is not available: export serves the namespace through a ublk device and this kernel has no "
              f"ublk_drv ({ubd.UBLK_CONTROL} is missing): modprobe ublk_drv (CONFIG_BLK_DEV_UBLK)", EXIT_SETUP)
    try:
        return ex.require_nvmet()
    except ex.ExportError as exc:
        _fail(str(exc.args[0]), EXIT_SETUP)


def _ublk_device(address: str, nsid: int, readonly: bool, recoverable: bool,
                 mode: str) -> tuple[dict[str, Any], bool]:
    """The ublk device serving the namespace: the one `nvmevfio ublk` already serves (if it fits),
    else one started here. Returns what its server says and whether it was started here."""
    from nvmevfio import export as ex
    from nvmevfio import ublk_devices as ubd
    from nvmevfio.cli.disk import start_background

    with errors():
        for d in ubd.list_devices():
            if (d.address, d.nsid) != (address, nsid):
                continue
            if not d.server_alive:
                ubd.check_not_served(address, nsid)  # waiting for --recover: its line says what to do
                raise ex.ExportError(f"/dev/ublkb{d.dev_id} serves {address} nsid {nsid} without a server: "
                                     f"nvmevfio ublk --stop {d.dev_id}", reason="namespace-served")
            if Path(f"/sys/block/ublkb{d.dev_id}/ro").read_text().strip() == "1":
                raise ex.ExportError(f"/dev/ublkb{d.dev_id} is a read-only disk, which nvmet cannot export (it opens "
                                     f"its device for writing): serve it with --refuse-writes instead of --read-only",
                                     reason="bad-device")
            if readonly and not d.stats.get("read_only"):
                raise ex.ExportError(f"--read-only: /dev/ublkb{d.dev_id} already serves {address} nsid {nsid} "
                                     f"with writes; stop it (nvmevfio ublk --stop {d.dev_id}) or serve it with "
                                     "--refuse-writes", reason="bad-device")
            return {"device": f"/dev/ublkb{d.dev_id}", "dev_id": d.dev_id, "serial": d.stats.get("serial")}, False
        info = start_background(address, nsid, refuse_writes=readonly, recoverable=recoverable, mode=mode)
    return info, True


def _wait_block_device(dev: str, timeout_s: float = 30.0) -> None:
    from nvmevfio import export as ex

    deadline = time.monotonic() + timeout_s
    while not Path(dev).exists():
        if time.monotonic() > deadline:
            raise ex.ExportError(f"{dev} did not appear within {timeout_s:g} s", reason="no-device")
        time.sleep(0.05)


def _stop_ublk(dev_id: int) -> None:
    from nvmevfio import ublk_devices as ubd

    try:
        ubd.stop_device(dev_id)
    except NvmeVfioError as exc:
        click.echo(f"nvmevfio: warning: /dev/ublkb{dev_id}: {exc}", err=True)


def _stop(address: str | None, nsid: int, nqn: str | None, fmt: str) -> None:
    from nvmevfio import export as ex

    if address is None and nqn is None:
        _fail("--stop: give the ADDRESS (and -n) of the export, or its --nqn", EXIT_ERROR)
    addr = _address(address) if address else None
    recs = [r for r in ex.load_records() if (r.nqn == nqn if nqn else (r.address, r.nsid) == (addr, nsid))]
    if not recs:
        what = nqn if nqn else f"{addr} nsid {nsid}"
        _fail(f"{what} is not exported (nvmevfio export --list)", EXIT_ERROR)
    rec = recs[0]
    with errors():
        fs = ex.require_nvmet()
        failed = ex.run_teardown(fs, ex.plan_teardown(rec.applied(), ex.survey(fs)))
        if failed:
            raise ex.ExportError(f"{rec.nqn}: nvmet kept {'; '.join(failed)}", reason="teardown-failed")
    if rec.ublk_started:
        from nvmevfio import ublk_devices as ubd

        with errors():
            d = ubd.device_info(rec.dev_id) if Path(f"/sys/class/ublk-char/ublkc{rec.dev_id}").exists() else None
        if d is not None and (d.address, d.nsid) == (rec.address, rec.nsid):
            _stop_ublk(rec.dev_id)
    ex.record_path(rec.nqn).unlink(missing_ok=True)
    if fmt == "json":
        _emit_json({"stopped": rec.nqn, "device": rec.device, "ublk_stopped": rec.ublk_started})
    else:
        click.echo(f"{rec.nqn}: export stopped{f'; {rec.device} stopped' if rec.ublk_started else ''}")


def _list(fmt: str) -> None:
    from nvmevfio import export as ex

    rows = []
    root = ex.CONFIGFS / ex.NVMET_DIR
    for rec in ex.load_records():
        row = rec.to_dict()
        row.pop("ops")
        row["live"] = (root / "subsystems" / rec.nqn).is_dir() and Path(rec.device).exists()
        rows.append(row)
    if fmt == "json":
        _emit_json(rows)
        return
    for r in rows:
        who = "any host" if r["any_host"] else f"{len(r['hosts'])} host(s)"
        click.echo(f"{r['nqn']}: {r['address']} nsid {r['nsid']} via {r['device']} on tcp {r['tcp']}, {who}"
                   f"{', read-only' if r['read_only'] else ''}{'' if r['live'] else ', NOT LIVE (--stop removes it)'}")
