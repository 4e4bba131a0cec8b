"""Admin verbs: format, compare, verify, ns-rescan, namespace management, sanitize, firmware, device self-test."""

from __future__ import annotations

from typing import Any, Callable

import click

from nvmevfio.cli.common import (
    EXIT_ERROR,
    INT0,
    _address,
    _emit_json,
    _fail,
    address_arg,
    blockdev,
    controller,
    errors,
    main,
    output_opt,
)


@main.command("format")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=1, show_default=True)
@click.option("-l", "--lbaf", type=click.IntRange(0, 63), required=True, help="LBA format index (see id-ns)")
@click.option("-s", "--ses", type=click.IntRange(0, 7), default=0, show_default=True,
              help="secure erase: 0 none, 1 user data, 2 cryptographic")
@click.option("-i", "--pi", type=click.IntRange(0, 7), default=0, show_default=True, help="protection information")
@click.option("-p", "--pil", type=click.IntRange(0, 1), default=0, show_default=True, help="PI location")
@click.option("-m", "--ms", "mset", type=click.IntRange(0, 1), default=0, show_default=True,
              help="metadata settings: 1 extended LBA")
@click.option("-t", "--timeout", "timeout_ms", type=INT0, help="milliseconds (default 600 s)")
@click.option("--force", is_flag=True, help="do not wait 10 s for Ctrl-C first")
def format_cmd(address: str, nsid: int, lbaf: int, ses: int, pi: int, pil: int, mset: int, timeout_ms: int | None,
               force: bool) -> None:
    """Format NVM (admin opcode 80h): destroys the namespace's data. The namespaces are identified
    again afterwards.

    \b
    Example: nvmevfio format 00:04.0 -n 1 --lbaf 4 --force
    """
    import time

    if not force:
        click.echo(f"You are about to format {_address(address)}, namespace {nsid:#x}.\nWARNING: Format may "
                   "irrevocably delete this device's data.\nYou have 10 seconds to press Ctrl-C to cancel.",
                   err=True)
        time.sleep(10)
    with controller(address) as s, errors():
        table = s.format_nvm(nsid, lbaf, ses=ses, pi=pi, pil=pil, mset=mset,
                             timeout_s=timeout_ms / 1000 if timeout_ms else None)
    ns = table.get(nsid)
    geometry = f" ({ns.size_blocks} blocks of {ns.block_size} bytes)" if ns is not None else ""
    click.echo(f"Success formatting namespace:{nsid:x}{geometry}")


def _block_range_command(verb: str) -> Callable[..., None]:
    @address_arg
    @click.option("-n", "--namespace-id", "nsid", type=INT0, default=1, show_default=True)
    @click.option("-s", "--start-block", "slba", type=INT0, required=True, help="first logical block")
    @click.option("-c", "--block-count", "nlb", type=INT0, required=True,
                  help="number of blocks, 0's based as in nvme-cli (0 is one block)")
    @click.option("-z", "--data-size", type=INT0, default=0, help="compare: bytes of --data")
    @click.option("-d", "--data", "data_file", type=click.File("rb"), help="compare: the expected data")
    def cmd(address: str, nsid: int, slba: int, nlb: int, data_size: int, data_file: Any) -> None:
        with blockdev(address, nsid) as dev, errors():
            if verb == "Compare":
                if data_file is None:
                    _fail("compare needs --data FILE", EXIT_ERROR)
                count = nlb + 1
                data = data_file.read(data_size or count * dev.block_size)
                if len(data) != count * dev.block_size:
                    _fail(f"--data holds {len(data)} bytes; {count} blocks are {count * dev.block_size}", EXIT_ERROR)
                dev.provider.compare(nsid, slba, data)
            else:
                dev.provider.verify(nsid, slba, nlb + 1)
        click.echo(f"NVMe {verb}: success (nsid {nsid}, LBA {slba}, {nlb + 1} blocks)")

    return cmd


main.command("compare", help="Compare (NVM opcode 05h): the device checks blocks against a file; a difference "
             "is the status Compare Failure, exit 4.\n\n\b\nExample: nvmevfio compare 00:04.0 -n 1 "
             "--start-block 0 --block-count 7 --data-size 4096 --data expected.bin")(_block_range_command("Compare"))
main.command("verify", help="Verify (NVM opcode 0Ch): the device reads and checks blocks, transferring nothing."
             "\n\n\b\nExample: nvmevfio verify 00:04.0 -n 1 --start-block 0 --block-count 255")(
    _block_range_command("Verify"))


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
@click.option("-s", "--nsze", type=INT0, required=True, help="size in blocks")
@click.option("-c", "--ncap", type=INT0, required=True, help="capacity in blocks")
@click.option("-f", "--flbas", type=INT0, default=0, show_default=True, help="LBA format index")
@click.option("-d", "--dps", type=INT0, default=0, show_default=True, help="data protection settings")
@click.option("-m", "--nmic", type=INT0, default=0, show_default=True, help="1: shared (multi-path)")
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
@click.option("-n", "--namespace-id", "nsid", type=INT0, required=True)
def delete_ns(address: str, nsid: int) -> None:
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
    @click.option("-n", "--namespace-id", "nsid", type=INT0, required=True)
    @click.option("-c", "--controllers", default="", help="comma-separated controller ids (default: this one)")
    def cmd(address: str, nsid: int, controllers: str) -> None:
        with controller(address) as s, errors():
            ids = [int(c, 0) for c in controllers.split(",") if c] or [int(s.identify_controller()["cntlid"])]
            (s.detach_namespace if detach else s.attach_namespace)(nsid, ids)
        click.echo(f"{verb}: Success, nsid:{nsid}")

    return cmd


main.command("attach-ns", help="Namespace Attachment, attach (admin opcode 15h).\n\n\b\nExample: nvmevfio "
             "attach-ns 00:04.0 -n 2")(_attach_command(False))
main.command("detach-ns", help="Namespace Attachment, detach (admin opcode 15h).\n\n\b\nExample: nvmevfio "
             "detach-ns 00:04.0 -n 2")(_attach_command(True))


@main.command("sanitize")
@address_arg
@click.option("-a", "--sanact", type=click.IntRange(1, 4), required=True,
              help="1 exit failure mode, 2 block erase, 3 overwrite, 4 crypto erase")
@click.option("-u", "--ause", is_flag=True, help="allow unrestricted sanitize exit")
@click.option("-p", "--owpass", type=click.IntRange(0, 15), default=0, help="overwrite passes")
@click.option("-i", "--oipbp", is_flag=True, help="overwrite invert pattern between passes")
@click.option("-D", "--no-dealloc", is_flag=True, help="no deallocate after sanitize")
@click.option("-O", "--ovrpat", type=INT0, default=0, help="overwrite pattern")
def sanitize_cmd(address: str, sanact: int, ause: bool, owpass: int, oipbp: bool, no_dealloc: bool,
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
@click.option("-x", "--xfer", type=INT0, default=4096, show_default=True, help="bytes per command")
@click.option("-O", "--offset", type=INT0, default=0, show_default=True, help="image offset, bytes")
def fw_download(address: str, fw: Any, xfer: int, offset: int) -> None:
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
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=0xFFFFFFFF, show_default=True)
@click.option("-s", "--self-test-code", "stc", type=INT0, required=True, help="1 short, 2 extended, 0xf abort")
def device_self_test(address: str, nsid: int, stc: int) -> None:
    """Device Self-test (admin opcode 14h). Results: self-test-log.

    \b
    Example: nvmevfio device-self-test 00:04.0 --self-test-code 1
    """
    with controller(address) as s, errors():
        s.device_self_test(stc, nsid=nsid)
    click.echo("Device self-test started" if stc != 0xF else "Aborting device self-test operation")
