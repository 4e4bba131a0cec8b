"""Admin verbs: format, ns-rescan, namespace management, sanitize, firmware, device self-test."""

from __future__ import annotations

import time
from typing import Any, Callable

import click

from nvmevfio.cli.common import (
    EXIT_ERROR,
    IONUM,
    NUM,
    NUM_LIST,
    _address,
    _emit_json,
    _fail,
    _write_data,
    address_arg,
    controller,
    errors,
    main,
    num,
    output_opt,
    parse_number,
    timeout_ms_opt,
)


@main.command("format")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=1, show_default=True)
@click.option("-l", "--lbaf", type=num(0, 63), default=None,
              help="LBA format index (see id-ns; it brings the block and metadata sizes)")
@click.option("-b", "--block-size", type=IONUM, default=None,
              help="instead of --lbaf: the format with this block size and no metadata")
@click.option("-s", "--ses", type=num(0, 7), default=0, show_default=True,
              help="secure erase: 0 none, 1 user data, 2 cryptographic")
@click.option("-i", "--pi", type=num(0, 7), default=0, show_default=True, help="protection information")
@click.option("-p", "--pil", type=num(0, 1), default=0, show_default=True, help="PI location")
@click.option("-m", "--ms", "mset", type=num(0, 1), default=0, show_default=True,
              help="metadata setting: 0 a separate buffer, 1 extended LBA (the size comes with --lbaf)")
@click.option("-r", "--reset", "reset_after", is_flag=True, help="reset the controller after the format")
@timeout_ms_opt
@click.option("--force", is_flag=True, help="do not wait 10 s for Ctrl-C first")
def format_cmd(address: str, nsid: int, lbaf: int | None, block_size: int | None, ses: int, pi: int, pil: int,
               mset: int, reset_after: bool, timeout_ms: int | None, force: bool) -> None:
    """Format NVM (admin opcode 80h): destroys the namespace's data. The namespaces are identified
    again afterwards; the new geometry is printed on stderr.

    \b
    Example: nvmevfio format 00:04.0 -n 1 --lbaf 4 --force
             nvmevfio format 00:04.0 -n 1 --lbaf 1 --pi 1 --ms 1 --force (512 + 8 bytes, PI type 1, extended LBA)
    """
    if (lbaf is None) == (block_size is None):
        raise click.UsageError("give --lbaf or --block-size (one of them)")
    if not force:
        click.echo(f"You are about to format {_address(address)}, namespace {nsid:#x}.\nWARNING: Format may "
                   "irrevocably delete this device's data.\nYou have 10 seconds to press Ctrl-C to cancel.",
                   err=True)
        time.sleep(10)
    with controller(address) as s, errors():
        if lbaf is None:
            lbafs = s.identify_namespace(nsid).identify["lbafs"]
            match = [i for i, f in enumerate(lbafs) if f["ms"] == 0 and 1 << f["ds"] == block_size]
            if not match:
                _fail(f"no LBA format of namespace {nsid} has {block_size}-byte blocks without metadata; see "
                      "nvmevfio id-ns", EXIT_ERROR)
            lbaf = match[0]
        table = s.format_nvm(nsid, lbaf, ses=ses, pi=pi, pil=pil, mset=mset,
                             timeout_s=timeout_ms / 1000 if timeout_ms else None)
        if reset_after:
            s.reset()
    ns = table.get(nsid)
    click.echo(f"Success formatting namespace:{nsid:x}")
    if ns is not None:
        meta = ""
        if ns.metadata_size:
            prot = ns.protection
            meta = (f" + {ns.metadata_size} bytes of metadata ({'extended LBA' if ns.extended_lba else 'separate'}"
                    + (f", PI type {prot.pi_type}, the tuple {'first' if prot.first else 'last'}" if prot else "")
                    + ")")
        click.echo(f"namespace {nsid}: {ns.size_blocks} blocks of {ns.block_size} bytes{meta}", err=True)


@main.command("ns-rescan")
@address_arg
@output_opt
def ns_rescan(address: str, fmt: str) -> None:
    """Identify every active namespace again (after namespace management or a format).

    \b
    Example: nvmevfio ns-rescan 00:04.0
    """
    with controller(address) as s, errors():
        table = s.refresh_namespaces()
    rows = [{"nsid": n, "nsze": ns.size_blocks, "block_size": ns.block_size} for n, ns in sorted(table.items())]
    if fmt == "json":
        _emit_json({"namespaces": rows})
        return
    for r in rows:
        click.echo(f"[{r['nsid']:>4}]: {r['nsze']} blocks of {r['block_size']} bytes")


_SI = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "Z": 10**21,
       "Y": 10**24, "R": 10**27, "Q": 10**30}


def si_blocks(text: str, block: int) -> int:
    """nvme-cli's --nsze-si/--ncap-si (its suffix_si_parse): a number of blocks, or with an SI suffix
    (k, M, G, T, P, ... powers of 1000) bytes, divided by the LBA format's block size (data and
    metadata, as nvme-cli's parse_lba_num_si). ValueError naming the text otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)([A-Za-z]?)", text)
    if m is None or m.group(2) not in _SI:
        raise ValueError(f"{text!r}: expected a number with an optional SI suffix (k, M, G, T, P, ...)")
    value = int(float(m.group(1)) * _SI[m.group(2)])
    return value // block if m.group(2) else value


def ns_management_host(nsze: int, ncap: int, flbas: int, *, dps: int = 0, nmic: int = 0, anagrpid: int = 0,
                       nvmsetid: int = 0, lbstm: int = 0) -> bytes:
    """Namespace Management create's data: an Identify Namespace structure with the host-specified
    fields (NVMe Base 2.0, 5.22; libnvme 1.3's struct nvme_id_ns): NSZE 7:0, NCAP 15:8, FLBAS 26, DPS
    29, NMIC 30, ANAGRPID 95:92, NVMSETID 101:100, LBSTM 391:384."""
    host = bytearray(4096)
    for at, width, value in ((0, 8, nsze), (8, 8, ncap), (26, 1, flbas), (29, 1, dps), (30, 1, nmic),
                             (92, 4, anagrpid), (100, 2, nvmsetid), (384, 8, lbstm)):
        host[at : at + width] = value.to_bytes(width, "little")
    return bytes(host)


@main.command("create-ns")
@address_arg
@click.option("-s", "--nsze", type=IONUM, default=0, help="size in blocks")
@click.option("-c", "--ncap", type=IONUM, default=0, help="capacity in blocks")
@click.option("-f", "--flbas", type=num(0, 255), default=None,
              help="LBA format index (FLBAS); this or --block-size, as nvme-cli")
@click.option("-d", "--dps", type=num(0, 255), default=0, show_default=True, help="data protection settings")
@click.option("-m", "--nmic", type=num(0, 255), default=0, show_default=True, help="1: shared (multi-path)")
@click.option("-a", "--anagrp-id", "anagrpid", type=NUM, default=0, help="ANA group identifier")
@click.option("-i", "--nvmset-id", "nvmsetid", type=num(0, 0xFFFF), default=0, help="NVM set identifier")
@click.option("-b", "--block-size", type=IONUM, default=0,
              help="instead of --flbas: the format with this block size and no metadata")
@click.option("-t", "--timeout", "timeout_ms", type=NUM, default=120000, show_default=True, help="milliseconds")
@click.option("-y", "--csi", type=num(0, 255), default=0, help="command set identifier (CDW11 31:24)")
@click.option("-l", "--lbstm", type=IONUM, default=0, help="logical block storage tag mask")
@click.option("-S", "--nsze-si", default=None, help="size: blocks, or bytes with an SI suffix (k, M, G, ...)")
@click.option("-C", "--ncap-si", default=None, help="capacity: blocks, or bytes with an SI suffix (k, M, G, ...)")
def create_ns(address: str, nsze: int, ncap: int, flbas: int | None, dps: int, nmic: int, anagrpid: int,
              nvmsetid: int, block_size: int, timeout_ms: int, csi: int, lbstm: int, nsze_si: str | None,
              ncap_si: str | None) -> None:
    """Namespace Management, create (admin opcode 0Dh, SEL 0), with nvme-cli's fields. Attach it
    next (attach-ns).

    \b
    Example: nvmevfio create-ns 00:04.0 --nsze 2048 --ncap 2048 --flbas 0
             nvmevfio create-ns 00:04.0 --nsze-si 1G --ncap-si 1G --block-size 4096
    """
    if flbas is not None and block_size:
        raise click.UsageError("give --flbas or --block-size, not both (nvme-cli's rule)")
    if flbas is None and not block_size:
        raise click.UsageError("give --flbas or --block-size (nvme-cli: FLBAS corresponding to block size 0 not found)")
    if block_size and block_size & (block_size - 1):
        raise click.UsageError(f"--block-size {block_size} is not a power of two")
    if (nsze and nsze_si) or (ncap and ncap_si):
        raise click.UsageError("give a size in blocks or its --*-si form, not both")
    with controller(address) as s, errors():
        if flbas is None or nsze_si or ncap_si:  # the formats, from the namespace identify nvme-cli reads
            from nvmevfio.cli.identify import identify_raw
            from nvmevfio.nvme.structures import parse_identify_namespace

            # nvme-cli's parse_lba_num_si: the common namespace (FFFFFFFFh) where OACS has Namespace Management
            common = s.id_ctrl.get("oacs", 0) & 0x8
            ident = parse_identify_namespace(identify_raw(s, 0x00, 0xFFFFFFFF if common else s.active_namespaces()[0]))
            if flbas is None:
                flbas = next((i for i, f in enumerate(ident["lbafs"]) if 1 << f["ds"] == block_size and not f["ms"]),
                             None)
                if flbas is None:
                    raise click.UsageError(f"no LBA format has {block_size}-byte blocks without metadata: "
                                           "give --flbas (nvme-cli: FLBAS corresponding to block size not found)")
            fmt = ident["lbafs"][flbas & 0xF] if (flbas & 0xF) < len(ident["lbafs"]) else {"ds": 9, "ms": 0}
            per = (1 << fmt["ds"]) + fmt["ms"]
            nsze = si_blocks(nsze_si, per) if nsze_si else nsze
            ncap = si_blocks(ncap_si, per) if ncap_si else ncap
        host = ns_management_host(nsze, ncap, flbas, dps=dps, nmic=nmic, anagrpid=anagrpid, nvmsetid=nvmsetid,
                                  lbstm=lbstm)
        nsid, _ = s.admin_passthru(0x0D, data=host, cdw10=0, cdw11=csi << 24, timeout_s=timeout_ms / 1000)
    click.echo(f"create-ns: Success, created nsid:{nsid}")


@main.command("delete-ns")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, required=True)
@timeout_ms_opt
def delete_ns(address: str, nsid: int, timeout_ms: int | None) -> None:
    """Namespace Management, delete (admin opcode 0Dh).

    \b
    Example: nvmevfio delete-ns 00:04.0 -n 2
    """
    with controller(address) as s, errors():
        if timeout_ms:  # nvme-cli's -t: this command's timeout, through the passthrough (SEL 1h, delete)
            s.admin_passthru(0x0D, nsid=nsid, cdw10=1, timeout_s=timeout_ms / 1000)
        else:
            s.delete_namespace(nsid)
    click.echo(f"delete-ns: Success, deleted nsid:{nsid}")


def _attach_command(detach: bool) -> Callable[..., None]:
    verb = "detach-ns" if detach else "attach-ns"

    @address_arg
    @click.option("-n", "--namespace-id", "nsid", type=NUM, required=True)
    @click.option("-c", "--controllers", type=NUM_LIST, default="", help="controller ids a,b,... (default: this one)")
    def cmd(address: str, nsid: int, controllers: list[int]) -> None:
        with controller(address) as s, errors():
            ids = controllers or [int(s.identify_controller()["cntlid"])]
            (s.detach_namespace if detach else s.attach_namespace)(nsid, ids)
        click.echo(f"{verb}: Success, nsid:{nsid}")

    return cmd


main.command("attach-ns", help="Namespace Attachment, attach (admin opcode 15h).\n\n\b\nExample: nvmevfio "
             "attach-ns 00:04.0 -n 2")(_attach_command(False))
main.command("detach-ns", help="Namespace Attachment, detach (admin opcode 15h).\n\n\b\nExample: nvmevfio "
             "detach-ns 00:04.0 -n 2")(_attach_command(True))


SANACT_NAMES = {"exit-failure": 1, "start-block-erase": 2, "start-overwrite": 3, "start-crypto-erase": 4}


class SanitizeAction(click.ParamType):
    """nvme-cli's --sanact: 1..4, or its name (exit-failure, start-block-erase, ...)."""

    name = "sanact"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        n = SANACT_NAMES.get(str(value))
        if n is None:
            try:
                n = parse_number(str(value))
            except ValueError:
                n = 0
        if not 1 <= n <= 4:
            self.fail(f"{value!r}: 1..4 or one of {', '.join(SANACT_NAMES)}", param, ctx)
        return n


@main.command("sanitize")
@address_arg
@click.option("-d", "--no-dealloc", is_flag=True, help="no deallocate after sanitize")
@click.option("-i", "--oipbp", is_flag=True, help="overwrite invert pattern between passes")
@click.option("-n", "--owpass", type=num(0, 15), default=0, help="overwrite passes")
@click.option("-u", "--ause", is_flag=True, help="allow unrestricted sanitize exit")
@click.option("-a", "--sanact", type=SanitizeAction(), required=True,
              help="1 exit-failure, 2 start-block-erase, 3 start-overwrite, 4 start-crypto-erase (number or name)")
@click.option("-p", "--ovrpat", type=NUM, default=0, help="overwrite pattern")
def sanitize_cmd(address: str, no_dealloc: bool, oipbp: bool, owpass: int, ause: bool, sanact: int,
                 ovrpat: int) -> None:
    """Sanitize (admin opcode 84h): destroys every namespace's data. Progress: sanitize-log.

    \b
    Example: nvmevfio sanitize 00:04.0 --sanact 2
    """
    with controller(address) as s, errors():
        s.sanitize(sanact, ause=ause, owpass=owpass, oipbp=oipbp, no_dealloc=no_dealloc, ovrpat=ovrpat)
    click.echo("Sanitize: started (see sanitize-log)")


SC_OVERLAPPING_RANGE = 0x14  # Firmware Image Download, command specific status (NVMe Base 2.0, 5.13.1)


def _download_piece(s: Any, piece: bytes, at: int, total: int, ignore_ovr: bool) -> None:
    """One piece, as nvme-cli's fw_download_single: up to three tries unless the status says Do Not
    Retry; Overlapping Range is success with --ignore-ovr, and ends the download without it."""
    from nvmevfio.errors import CommandError

    for attempt in range(3):
        if attempt:
            click.echo(f"retrying offset {at:x} ({attempt}/3)", err=True)
        try:
            s.firmware_download(piece, offset=at, xfer=len(piece))
            return
        except CommandError as exc:
            ovr = (exc.sct, exc.sc) == (1, SC_OVERLAPPING_RANGE)
            if ovr and ignore_ovr:
                return
            if exc.dnr or ovr or attempt == 2:
                click.echo(f"fw-download: error on offset {at:#010x}/{total:#010x}", err=True)
                if ovr:
                    click.echo("Use --ignore-ovr to ignore overwrite errors", err=True)
                raise


@main.command("fw-download")
@address_arg
@click.option("-f", "--fw", "fw", type=click.File("rb"), required=True, help="the firmware image")
@click.option("-x", "--xfer", type=NUM, default=4096, show_default=True,
              help="bytes per command (not a multiple of 4096: 4096, as nvme-cli)")
@click.option("-o", "--offset", type=NUM, default=0, show_default=True,
              help="starting dword offset: the image from there, to that offset of the controller's")
@click.option("-p", "--progress", is_flag=True, help="print each piece's progress as it is transferred")
@click.option("-i", "--ignore-ovr", is_flag=True, help="take an Overlapping Range status as success")
def fw_download(address: str, fw: Any, xfer: int, offset: int, progress: bool, ignore_ovr: bool) -> None:
    """Firmware Image Download (admin opcode 11h), in --xfer pieces, as nvme-cli sends them. Activate
    with fw-commit.

    \b
    Example: nvmevfio fw-download 00:04.0 --fw image.bin --xfer 0x20000
    """
    image = fw.read()
    if not image or len(image) % 4:
        _fail(f"Invalid size:{len(image)} for f/w image", EXIT_ERROR)
    xfer = xfer if xfer and not xfer % 4096 else 4096
    at = offset << 2  # nvme-cli: --offset counts dwords
    with controller(address) as s, errors():
        while at < len(image):
            if progress:
                click.echo(f"Firmware download: transferring {at:#010x}/{len(image):#010x} bytes: "
                           f"{100 * at // len(image):03d}%\r", nl=False)
            piece = image[at : at + xfer]
            _download_piece(s, piece, at, len(image), ignore_ovr)
            at += len(piece)
    if progress:
        click.echo("")
    click.echo("Firmware download success")


@main.command("fw-commit")
@address_arg
@click.option("-s", "--slot", type=num(0, 7), default=0, show_default=True)
@click.option("-a", "--action", type=num(0, 7), required=True,
              help="0 replace, 1 replace and activate, 2 activate, 3 activate now, ...")
@click.option("-b", "--bpid", type=num(0, 1), default=0, show_default=True, help="boot partition id")
def fw_commit(address: str, slot: int, action: int, bpid: int) -> None:
    """Firmware Commit (admin opcode 10h).

    \b
    Example: nvmevfio fw-commit 00:04.0 --slot 1 --action 1
    """
    with controller(address) as s, errors():
        dw0 = s.firmware_commit(slot, action, bpid=bpid)
    click.echo(f"Success committing firmware action:{action} slot:{slot} (result {dw0:#x})")


@main.command("device-self-test")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=0xFFFFFFFF, show_default=True)
@click.option("-s", "--self-test-code", "stc", type=NUM, required=True, help="1 short, 2 extended, 0xf abort")
@click.option("-w", "--wait", is_flag=True, help="wait until the test ends (polls the self-test log)")
def device_self_test(address: str, nsid: int, stc: int, wait: bool) -> None:
    """Device Self-test (admin opcode 14h). Results: self-test-log.

    \b
    Example: nvmevfio device-self-test 00:04.0 --self-test-code 1
    """
    with controller(address) as s, errors():
        s.device_self_test(stc, nsid=nsid)
        click.echo("Device self-test started" if stc != 0xF else "Aborting device self-test operation")
        while wait and stc != 0xF and s.get_log(0x06, 4)[0] & 0xF:  # Current Device Self-Test Operation
            time.sleep(1)


@main.command("get-lba-status")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=1, show_default=True)
@click.option("-s", "--start-lba", "slba", type=IONUM, default=0, help="first block")
@click.option("-m", "--max-dw", type=NUM, default=0, help="dwords to return at most (MNDW, 0's based)")
@click.option("-a", "--action", type=num(0, 0xFF), default=0, help="action type (ATYPE): 2 or 3")
@click.option("-l", "--range-len", type=num(0, 0xFFFF), default=0, help="blocks from --start-lba (RL)")
@timeout_ms_opt
@output_opt
def get_lba_status(address: str, nsid: int, slba: int, max_dw: int, action: int, range_len: int,
                   timeout_ms: int | None, fmt: str) -> None:
    """Get LBA Status (admin opcode 86h): the potentially unrecoverable blocks' ranges.

    \b
    Example: nvmevfio get-lba-status 00:04.0 -n 1 --start-lba 0 --max-dw 15 --action 2
    """
    with controller(address) as s, errors():
        _, data = s.admin_passthru(0x86, nsid=nsid, data_len=(max_dw + 1) * 4, cdw10=slba & 0xFFFFFFFF,
                                   cdw11=slba >> 32, cdw12=max_dw, cdw13=range_len | action << 24,
                                   timeout_s=timeout_ms / 1000 if timeout_ms else None)
    raw = bytes(data or b"")
    if fmt == "binary":
        _write_data(raw, True)
        return
    nlsd = int.from_bytes(raw[0:4], "little") if len(raw) >= 4 else 0
    descs = [{"DSLBA": int.from_bytes(raw[8 + 16 * i : 16 + 16 * i], "little"),
              "NLB": int.from_bytes(raw[16 + 16 * i : 20 + 16 * i], "little")}
             for i in range(nlsd) if 24 + 16 * i <= len(raw)]
    if fmt == "json":
        _emit_json({"Number of LBA Status Descriptors(NLSD)": nlsd, "Completion Condition(CMPC)": raw[4] if raw else 0,
                    "LBA Status Descriptor List": descs})
        return
    click.echo(f"Get LBA Status for NSID {nsid}: {nlsd} descriptors")
    for d in descs:
        click.echo(f"DSLBA: {d['DSLBA']:#x}  NLB: {d['NLB']:#x}")
