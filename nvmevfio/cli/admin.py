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


@main.command("create-ns")
@address_arg
@click.option("-s", "--nsze", type=IONUM, required=True, help="size in blocks")
@click.option("-c", "--ncap", type=IONUM, required=True, help="capacity in blocks")
@click.option("-f", "--flbas", type=NUM, default=0, show_default=True, help="LBA format index")
@click.option("-d", "--dps", type=NUM, default=0, show_default=True, help="data protection settings")
@click.option("-m", "--nmic", type=NUM, default=0, show_default=True, help="1: shared (multi-path)")
def create_ns(address: str, nsze: int, ncap: int, flbas: int, dps: int, nmic: int) -> None:
    """Namespace Management, create (admin opcode 0Dh). Attach it next (attach-ns).

    \b
    Example: nvmevfio create-ns 00:04.0 --nsze 2048 --ncap 2048 --flbas 0
    """
    with controller(address) as s, errors():
        nsid = s.create_namespace(nsze, ncap, flbas, dps=dps, nmic=nmic)
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


@main.command("fw-download")
@address_arg
@click.option("-f", "--fw", "fw", type=click.File("rb"), required=True, help="the firmware image")
@click.option("-x", "--xfer", type=NUM, default=4096, show_default=True, help="bytes per command")
@click.option("-o", "--offset", type=NUM, default=0, show_default=True, help="image offset, bytes")
@click.option("-p", "--progress", is_flag=True, help="accepted; the pieces are counted at the end")
@click.option("-i", "--ignore-ovr", is_flag=True, help="accepted; nvmevfio never prompts here")
def fw_download(address: str, fw: Any, xfer: int, offset: int, progress: bool, ignore_ovr: bool) -> None:
    """Firmware Image Download (admin opcode 11h), in --xfer pieces. Activate with fw-commit.

    \b
    Example: nvmevfio fw-download 00:04.0 --fw image.bin --xfer 0x20000
    """
    image = fw.read()
    with controller(address) as s, errors():
        pieces = s.firmware_download(image, offset=offset, xfer=xfer)
    click.echo(f"Firmware download success ({len(image)} bytes in {pieces} pieces)")


@main.command("fw-commit")
@address_arg
@click.option("-s", "--slot", type=click.IntRange(0, 7), default=0, show_default=True)
@click.option("-a", "--action", type=click.IntRange(0, 7), required=True,
              help="0 replace, 1 replace and activate, 2 activate, 3 activate now, ...")
@click.option("-b", "--bpid", type=click.IntRange(0, 1), default=0, show_default=True, help="boot partition id")
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
