"""Data, with nvme-cli's options and messages: read, write, compare, verify, flush, write-zeroes,
write-uncor, dsm, copy, and nvmevfio's deallocate (through the device or, where it says so, the
service). A block range is nvme-cli's: ``-s/--start-block`` and ``-c/--block-count`` 0's based."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from typing import Any, BinaryIO

import click

from nvmevfio.cli.common import (
    CHUNK,
    EXIT_ERROR,
    EXIT_REFUSED,
    IONUM,
    NUM,
    NUM_LIST,
    _fail,
    _hexdump,
    _progress,
    block_address_arg,
    block_range_opts,
    blockdev,
    data_size_opt,
    errors,
    fua_opt,
    limited_retry_opt,
    main,
    nsid_opt,
    num,
    service_socket_opt,
    start_block_opt,
)
from nvmevfio.cli.nvm_fields import (
    DSM_RANGE,
    Control,
    control_opts,
    copy_dwords,
    copy_ranges,
    dsm_attributes,
    dsm_ranges,
    protection_opts,
    send,
)

# nvme-cli's -v/-w/-t on read, write and compare: the command's fields, a dry run, the latency
show_command_opt = click.option("-v", "--show-command", is_flag=True, help="print the command's fields first")
dry_run_opt = click.option("-w", "--dry-run", is_flag=True, help="print the command's fields, send nothing")
latency_opt = click.option("-t", "--latency", is_flag=True, help="print the latency (stdout)")


def trace_opts(f: Any) -> Any:
    """-v, -w, -t: nvme-cli's show-command, dry-run and latency on read, write and compare."""
    return show_command_opt(dry_run_opt(latency_opt(f)))


data_file_opt = click.option("-d", "--data", "data", type=click.Path(dir_okay=False, allow_dash=True), default="-",
                             help="data file (default: stdin / stdout)")
# nvme-cli's metadata and end-to-end protection options of read and write (its submit_io)
metadata_opts = [
    click.option("-M", "--metadata", "metadata_file", type=click.Path(dir_okay=False), default=None,
                 help="metadata file: written from (write) or read into (read), block count x metadata size"),
    click.option("-y", "--metadata-size", type=IONUM, default=0,
                 help="bytes of metadata from or to the file (default: block count x the format's metadata size)"),
    click.option("-p", "--prinfo", type=num(0, 15), default=0,
                 help="PRINFO: 8 PRACT (the controller inserts or strips the protection information), "
                      "checks 4 guard, 2 application tag, 1 reference tag"),
    click.option("-r", "--ref-tag", type=IONUM, default=None,
                 help="the first block's reference tag (EILBRT; default: the LBA's low 32 bits)"),
    click.option("-m", "--app-tag-mask", type=num(0, 0xFFFF), default=0, help="application tag mask (LBATM)"),
    click.option("-a", "--app-tag", type=num(0, 0xFFFF), default=0, help="application tag (LBAT)"),
]


def metadata_options(f: Any) -> Any:
    for opt in reversed(metadata_opts):
        f = opt(f)
    return f


class Protected:
    """A command line's metadata and protection options, per chunk of blocks."""

    def __init__(self, dev: Any, metadata_file: str | None, metadata_size: int, prinfo: int, ref_tag: int | None,
                 app_tag_mask: int, app_tag: int) -> None:
        self.ms = getattr(dev, "metadata_size", 0)
        self.type = dev.protection.pi_type if getattr(dev, "protection", None) is not None else 0
        self.file, self.size = metadata_file, metadata_size
        self.on = bool(self.ms or metadata_file or prinfo or ref_tag is not None or app_tag or app_tag_mask)
        if self.on and not hasattr(dev, "metadata_size"):
            _fail("refused: metadata and protection information go through the device, not the service "
                  "[invalid-argument]", EXIT_REFUSED)
        self.prinfo, self.ref_tag, self.mask, self.tag = prinfo, ref_tag, app_tag_mask, app_tag

    def kwargs(self, slba: int, start: int) -> dict[str, Any]:
        """read_blocks/write_blocks keywords for the chunk at ``start`` of a command line at ``slba``."""
        if not self.on:
            return {}
        ref = self.ref_tag
        if ref is not None and self.type != 3:  # types 1 and 2: one more per block
            ref = (ref + start - slba) & 0xFFFFFFFF
        return {"pract": bool(self.prinfo & 8), "prchk": self.prinfo & 7, "reftag": ref, "apptag": self.tag,
                "appmask": self.mask}


def _show(name: str, opcode: int, nsid: int, slba: int, count: int, show: bool, dry: bool) -> bool:
    """-v / -w: the command's fields on stderr; True when nothing is to be sent (--dry-run)."""
    if show or dry:
        click.echo(f"opcode       : {opcode:#04x} ({name})\nnsid         : {nsid:#x}\nslba         : {slba:#x}\n"
                   f"nlb          : {count - 1:#x} ({count} blocks, 0's based)", err=True)
    return dry


def _latency(verb: str, t0: float, shown: bool) -> None:
    if shown:
        click.echo(f"  latency: {verb}: {(time.perf_counter() - t0) * 1e6:.0f} us")


@main.command()
@block_address_arg
@block_range_opts
@service_socket_opt
@data_size_opt
@data_file_opt
@click.option("--hexdump", is_flag=True, help="a hex dump instead of raw bytes")
@metadata_options
@control_opts
@trace_opts
def read(address: str, nsid: int, slba: int, nlb: int, service_socket: str | None, data_size: int, data: str,
         hexdump: bool, metadata_file: str | None, metadata_size: int, prinfo: int, ref_tag: int | None,
         app_tag_mask: int, app_tag: int, show_command: bool, dry_run: bool, latency: bool, **fields: Any) -> None:
    """Read blocks to a file or stdout (more than MDTS is split into several commands).

    \b
    Example: nvmevfio read 00:04.0 -n 1 --start-block 0 --block-count 7 --data-size 4096 -d out.bin
             nvmevfio read 00:04.0 -s 0 -c 0 --hexdump
             nvmevfio read --socket /run/nvmevfio/nvmevfio.sock -s 0 --hexdump
             nvmevfio read 00:04.0 -n 2 -s 8 -c 3 -d out.bin -M out.md --prinfo 7 (data, metadata, every check)
             nvmevfio read 00:04.0 -s 0 -c 7 -z 4096 -d out.bin --force-unit-access --dsm 0x7 (one command)
    """
    count = nlb + 1
    if _show("Read", 0x02, nsid, slba, count, show_command, dry_run):
        return
    ctl = Control(prinfo=prinfo, ref_tag=ref_tag, app_tag=app_tag, app_tag_mask=app_tag_mask, **fields)
    with blockdev(address, nsid, service_socket) as dev, errors():
        pi = Protected(dev, metadata_file, metadata_size, prinfo, ref_tag, app_tag_mask, app_tag)
        if ctl.wanted:  # nvme-cli's fields beyond the range: one command, as nvme-cli sends it
            _read_one(dev, ctl, pi, slba, count, data, data_size or count * dev.block_size, hexdump)
            click.echo("read: Success", err=True)
            return
        dev.check_window(slba, count)
        md_out = open(metadata_file, "wb") if metadata_file else None  # noqa: SIM115
        md_left = metadata_size or count * pi.ms
        per = max(1, CHUNK // dev.block_size)
        # nvme-cli writes --data-size bytes: the blocks' cut short, or followed by zeros
        left = data_size or count * dev.block_size
        out = sys.stdout.buffer if data == "-" else open(data, "wb")  # noqa: SIM115
        t0 = time.perf_counter()
        try:  # a reader that stops early (| head) is not an error: BrokenPipeError ends quietly below
            with _progress(count * dev.block_size, "reading") as bar:
                for start in range(slba, slba + count, per):
                    k = min(per, slba + count - start)
                    more = pi.kwargs(slba, start)
                    if md_out is not None:
                        more["metadata"] = True
                    got_blocks = dev.read_blocks(start, k, **more)
                    if md_out is not None:
                        got_blocks, md = got_blocks
                        md_out.write(md.tobytes()[:md_left])
                        md_left -= min(md_left, len(md))
                    got = got_blocks.tobytes()[:left]
                    left -= len(got)
                    if hexdump:
                        _hexdump(out, got, (start - slba) * dev.block_size)
                    else:
                        out.write(got)
                    if bar is not None:
                        bar.update(k * dev.block_size)
                    if not left:
                        break
                if left and not hexdump:
                    out.write(b"\0" * left)
        except BrokenPipeError:
            # Send what is left to /dev/null so the interpreter's final flush does not fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        finally:
            if md_out is not None:
                md_out.close()
            if out is not sys.stdout.buffer:
                out.close()
            else:
                with contextlib.suppress(BrokenPipeError):
                    out.flush()
    _latency("read", t0, latency)
    click.echo("read: Success", err=True)


def _read_one(dev: Any, ctl: Control, pi: Protected, slba: int, count: int, data: str, size: int,
              hexdump: bool) -> None:
    """read's one-command path (nvme-cli's fields set): the blocks and their metadata in one Read."""
    import numpy as np

    md = np.zeros(count * pi.ms, dtype=np.uint8) if pi.ms else None
    got = send(dev, ctl, 0x02, "Read", slba, count, data_len=count * dev.block_size, metadata=md) or b""
    got = got[:size] + b"\0" * max(0, size - len(got))  # nvme-cli writes --data-size bytes
    with contextlib.ExitStack() as stack:
        out = sys.stdout.buffer if data == "-" else stack.enter_context(open(data, "wb"))
        if hexdump:
            _hexdump(out, got, 0)
        else:
            out.write(got)
        if pi.file is not None and md is not None:
            with open(pi.file, "wb") as mf:
                mf.write(md.tobytes()[: pi.size or len(md)])


def _metadata_in(pi: Protected, n: int) -> Any:
    """The metadata to send with ``n`` blocks: --metadata-size bytes of -M's file, zero-filled past
    its end (nvme-cli), or zeros where the format has metadata and no file is given; None without."""
    import numpy as np

    if not pi.ms:
        return None
    md = np.zeros(n * pi.ms, dtype=np.uint8)
    if pi.file is not None:
        try:
            with open(pi.file, "rb") as mf:
                got = mf.read(pi.size or n * pi.ms)
        except OSError as exc:
            _fail(f"cannot read {pi.file}: {exc.strerror}", EXIT_ERROR)
        md[: min(len(got), len(md))] = np.frombuffer(got, dtype=np.uint8)[: len(md)]
    return md


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
@start_block_opt
@click.option("-c", "--block-count", "nlb", type=NUM, default=None,
              help="number of blocks, 0's based as in nvme-cli (default: the data's length)")
@data_size_opt
@data_file_opt
@click.option("--pad", is_flag=True, help="zero-pad a partial last block instead of refusing it")
@metadata_options
@control_opts
@trace_opts
def write(address: str, nsid: int, service_socket: str | None, slba: int, nlb: int | None, data_size: int,
          data: str, pad: bool, metadata_file: str | None, metadata_size: int, prinfo: int, ref_tag: int | None,
          app_tag_mask: int, app_tag: int, show_command: bool, dry_run: bool, latency: bool, **fields: Any) -> None:
    """Write a file (or stdin) at a block address.

    With --block-count, that many blocks are written from the data, zero-filled past its end as
    nvme-cli does; without it, the whole data (--data-size bytes of it when given), whose partial
    last block is refused unless --pad. A file is checked whole (size, window) before the first
    block is written, then streamed; stdin is read to its end first, for the same reason.

    \b
    Example: nvmevfio write 00:04.0 -n 1 --start-block 100 --block-count 7 --data-size 4096 -d image.bin
             head -c 4096 /dev/urandom | nvmevfio write 00:04.0 -s 0
             nvmevfio write 00:04.0 -n 2 -s 8 -c 3 -d in.bin -M in.md --prinfo 7 (with metadata, checked)
             nvmevfio write 00:04.0 -n 2 -s 8 -d in.bin --prinfo 8 (the controller adds the protection information)
    """
    import numpy as np

    payload: bytes | None = None
    if data == "-":
        payload = sys.stdin.buffer.read(data_size or -1)
        total = len(payload)
    else:
        try:
            total = os.path.getsize(data)
        except OSError as exc:
            _fail(f"cannot read {data}: {exc.strerror}", EXIT_ERROR)
        if data_size:
            total = min(total, data_size)
    with blockdev(address, nsid, service_socket) as dev, errors():
        bs = dev.block_size
        if nlb is not None:  # nvme-cli: the blocks named, from the data (zero-filled past its end)
            n = nlb + 1
            total = min(total, n * bs)
        else:
            if not total:
                _fail("refused: no data to write [length-mismatch]", EXIT_REFUSED)
            if total % bs and not pad:
                _fail(f"refused: {total} bytes is not a multiple of the {bs}-byte block; the last block "
                      f"would be partial [length-mismatch] — use --pad to zero-fill it", EXIT_REFUSED)
            n = -(-total // bs)
        if _show("Write", 0x01, nsid, slba, n, show_command, dry_run):
            return
        pi = Protected(dev, metadata_file, metadata_size, prinfo, ref_tag, app_tag_mask, app_tag)
        ctl = Control(prinfo=prinfo, ref_tag=ref_tag, app_tag=app_tag, app_tag_mask=app_tag_mask, **fields)
        if ctl.wanted:  # nvme-cli's fields beyond the range: one command, as nvme-cli sends it
            with io.BytesIO(payload) if payload is not None else open(data, "rb") as whole:
                blocks = whole.read(total)
            send(dev, ctl, 0x01, "Write", slba, n, data=blocks + b"\0" * (n * bs - len(blocks)),
                 metadata=_metadata_in(pi, n))
            click.echo("write: Success", err=True)
            return
        dev.check_window(slba, n)
        md = None
        if metadata_file is not None:  # nvme-cli: --metadata-size bytes of the file, zero-filled past its end
            try:
                with open(metadata_file, "rb") as mf:
                    md_bytes = mf.read(metadata_size or n * pi.ms)
            except OSError as exc:
                _fail(f"cannot read {metadata_file}: {exc.strerror}", EXIT_ERROR)
            md = np.zeros(n * pi.ms, dtype=np.uint8)
            md[: min(len(md_bytes), len(md))] = np.frombuffer(md_bytes, dtype=np.uint8)[: len(md)]
        src: BinaryIO = io.BytesIO(payload) if payload is not None else open(data, "rb")  # noqa: SIM115
        t0 = time.perf_counter()
        with src, _progress(n * bs, "writing") as bar:
            done, left = 0, total
            while done < n:
                k = min(CHUNK // bs, n - done)
                chunk = src.read(min(k * bs, left)) if left else b""
                if left and not chunk:
                    _fail(f"{data} shrank while it was being written ({done} blocks written)", EXIT_ERROR)
                left -= len(chunk)
                chunk += b"\0" * (k * bs - len(chunk))  # past the data's end: zeros (nvme-cli; --pad)
                more = pi.kwargs(slba, slba + done)
                if md is not None:
                    more["metadata"] = md[done * pi.ms : (done + k) * pi.ms]
                dev.write_blocks(slba + done, np.frombuffer(chunk, dtype=np.uint8), **more)
                done += k
                if bar is not None:
                    bar.update(k * bs)
    _latency("write", t0, latency)
    click.echo("write: Success", err=True)


@main.command("compare")
@block_address_arg
@block_range_opts
@data_size_opt
@data_file_opt
@metadata_options
@control_opts
@trace_opts
def compare_cmd(address: str, nsid: int, slba: int, nlb: int, data_size: int, data: str, metadata_file: str | None,
                metadata_size: int, prinfo: int, ref_tag: int | None, app_tag_mask: int, app_tag: int,
                show_command: bool, dry_run: bool, latency: bool, **fields: Any) -> None:
    """Compare (NVM opcode 05h): the device checks blocks (and, with -M, their metadata) against a
    file (or stdin); a difference is the status Compare Failure, exit 1 as nvme-cli.

    \b
    Example: nvmevfio compare 00:04.0 -n 1 --start-block 0 --block-count 7 --data-size 4096 --data expected.bin
    """
    count = nlb + 1
    if _show("Compare", 0x05, nsid, slba, count, show_command, dry_run):
        return
    ctl = Control(prinfo=prinfo, ref_tag=ref_tag, app_tag=app_tag, app_tag_mask=app_tag_mask, **fields)
    with blockdev(address, nsid) as dev, errors():
        pi = Protected(dev, metadata_file, metadata_size, prinfo, ref_tag, app_tag_mask, app_tag)
        want = count * dev.block_size
        with (sys.stdin.buffer if data == "-" else open(data, "rb")) as f:
            got = f.read(min(data_size, want) if data_size else want)
        if len(got) < want:  # nvme-cli compares its zero-filled buffer
            got += b"\0" * (want - len(got))
        t0 = time.perf_counter()
        if ctl.wanted or pi.on:  # nvme-cli's fields, metadata or protection: one command with them
            send(dev, ctl, 0x05, "Compare", slba, count, data=got, metadata=_metadata_in(pi, count))
        else:
            dev.provider.compare(nsid, slba, got)
    _latency("compare", t0, latency)
    click.echo("compare: Success", err=True)


@main.command("verify")
@block_address_arg
@block_range_opts
@protection_opts
def verify_cmd(address: str, nsid: int, slba: int, nlb: int, **fields: Any) -> None:
    """Verify (NVM opcode 0Ch): the device reads and checks blocks, transferring nothing.

    \b
    Example: nvmevfio verify 00:04.0 -n 1 --start-block 0 --block-count 255
             nvmevfio verify 00:04.0 -n 2 -s 8 -c 3 --prinfo 7 (with every protection check)
    """
    ctl = Control(**fields)
    with blockdev(address, nsid) as dev, errors():
        if ctl.wanted or ctl.protected:
            send(dev, ctl, 0x0C, "Verify", slba, nlb + 1)
        else:
            dev.provider.verify(nsid, slba, nlb + 1)
    click.echo("NVME Verify Success")


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
def flush(address: str, nsid: int, service_socket: str | None) -> None:
    """Flush the volatile write cache of a namespace.

    \b
    Example: nvmevfio flush 00:04.0 -n 1
    """
    with blockdev(address, nsid, service_socket) as dev, errors():
        dev.flush()
    click.echo("NVMe Flush: success")


@main.command("write-zeroes")
@block_address_arg
@block_range_opts
@service_socket_opt
@click.option("-d", "--deac", is_flag=True, help="let the controller deallocate the blocks (they read zeros)")
@protection_opts
def write_zeroes(address: str, nsid: int, slba: int, nlb: int, service_socket: str | None, deac: bool,
                 **fields: Any) -> None:
    """Write Zeroes over a range of blocks.

    \b
    Example: nvmevfio write-zeroes 00:04.0 -n 1 --start-block 0 --block-count 2047
             nvmevfio write-zeroes 00:04.0 -n 1 -s 0 -c 7 --force-unit-access --limited-retry (one command)
    """
    ctl = Control(**fields)
    with blockdev(address, nsid, service_socket) as dev, errors():
        if ctl.wanted or ctl.protected:  # one command (at most 65536 blocks) with nvme-cli's fields
            send(dev, ctl, 0x08, "Write Zeroes", slba, nlb + 1, cdw12=int(deac) << 25)
        elif deac:
            dev.provider.write_zeroes(nsid, slba, nlb + 1, deallocate=True)
        else:
            dev.write_zeroes(slba, nlb + 1)
    click.echo("NVME Write Zeroes Success")


@main.command("deallocate")
@block_address_arg
@block_range_opts
@service_socket_opt
def deallocate(address: str, nsid: int, slba: int, nlb: int, service_socket: str | None) -> None:
    """Deallocate (TRIM) a range of blocks: nvmevfio's short form of dsm --ad, through the service too.

    \b
    Example: nvmevfio deallocate 00:04.0 -n 1 --start-block 0 --block-count 2047
    """
    with blockdev(address, nsid, service_socket) as dev, errors():
        dev.deallocate(slba, nlb + 1)
    click.echo("NVMe DSM: success")


@main.command("write-uncor")
@block_address_arg
@block_range_opts
def write_uncor(address: str, nsid: int, slba: int, nlb: int) -> None:
    """Write Uncorrectable (NVM opcode 04h): the blocks read back as an Unrecovered Read Error until written.

    \b
    Example: nvmevfio write-uncor 00:04.0 -n 1 --start-block 100 --block-count 0
    """
    with blockdev(address, nsid) as dev, errors():
        dev.check_window(slba, nlb + 1)
        dev.provider.io_passthru(0x04, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=nlb)
    click.echo("NVME Write Uncorrectable Success")


@main.command("dsm")
@block_address_arg
@nsid_opt
@click.option("-a", "--ctx-attrs", type=NUM_LIST, default="", help="context attributes of each range (a,b,...)")
@click.option("-b", "--blocks", type=NUM_LIST, default="", help="blocks in each range (1's based, a,b,...)")
@click.option("-s", "--slbs", type=NUM_LIST, default="", help="first block of each range (a,b,...)")
@click.option("-d", "--ad", is_flag=True, help="attribute Deallocate")
@click.option("-w", "--idw", is_flag=True, help="attribute Integral Dataset for Write")
@click.option("-r", "--idr", is_flag=True, help="attribute Integral Dataset for Read")
@click.option("-c", "--cdw11", type=NUM, default=0, help="all of CDW11 (instead of --ad/--idw/--idr)")
def dsm(address: str, nsid: int, ctx_attrs: list[int], blocks: list[int], slbs: list[int], ad: bool, idw: bool,
        idr: bool, cdw11: int) -> None:
    """Dataset Management (NVM opcode 09h) over up to 256 ranges.

    \b
    Example: nvmevfio dsm 00:04.0 -n 1 --slbs 0,4096 --blocks 8,8 --ad
    """
    ranges = dsm_ranges(slbs, blocks, ctx_attrs)
    with blockdev(address, nsid) as dev, errors():
        for i in range(len(ranges) // DSM_RANGE):
            n = int.from_bytes(ranges[i * DSM_RANGE + 4 : i * DSM_RANGE + 8], "little")
            if n:
                dev.check_window(int.from_bytes(ranges[i * DSM_RANGE + 8 : (i + 1) * DSM_RANGE], "little"), n)
        dev.provider.io_passthru(0x09, nsid=nsid, data=ranges, cdw10=len(ranges) // DSM_RANGE - 1,
                                 cdw11=dsm_attributes(ad, idw, idr, cdw11))
    click.echo("NVMe DSM: success")


@main.command("copy")
@block_address_arg
@nsid_opt
@click.option("-d", "--sdlba", type=IONUM, required=True, help="first destination block")
@click.option("-s", "--slbs", type=NUM_LIST, required=True, help="first block of each source range (a,b,...)")
@click.option("-b", "--blocks", type=NUM_LIST, required=True, help="blocks in each range, 0's based (a,b,...)")
@limited_retry_opt
@fua_opt
@click.option("-p", "--prinfow", type=num(0, 15), default=0, help="PRINFO of the writes (PRINFOW)")
@click.option("-P", "--prinfor", type=num(0, 15), default=0, help="PRINFO of the reads (PRINFOR)")
@click.option("-r", "--ref-tag", type=IONUM, default=0, help="initial reference tag of the writes (ILBRT)")
@click.option("-R", "--expected-ref-tags", type=NUM_LIST, default="", help="each range's EILBRT (a,b,...)")
@click.option("-a", "--app-tag", type=num(0, 0xFFFF), default=0, help="application tag of the writes (LBAT)")
@click.option("-A", "--expected-app-tags", type=NUM_LIST, default="", help="each range's ELBAT (a,b,...)")
@click.option("-m", "--app-tag-mask", type=num(0, 0xFFFF), default=0, help="application tag mask (LBATM)")
@click.option("-M", "--expected-app-tag-masks", type=NUM_LIST, default="", help="each range's ELBATM (a,b,...)")
@click.option("-T", "--dir-type", "dtype", type=num(0, 15), default=0, help="directive type (DTYPE)")
@click.option("-S", "--dir-spec", "dspec", type=num(0, 0xFFFF), default=0, help="directive specific (DSPEC)")
@click.option("-F", "--format", "fmt_", type=num(0, 1), default=0,
              help="source range format: 0 (32-byte ranges) or 1 (40-byte, for 32b/64b guard formats; OCFS bit 1)")
def copy_cmd(address: str, nsid: int, sdlba: int, slbs: list[int], blocks: list[int], limited_retry: bool,
             fua: bool, prinfow: int, prinfor: int, ref_tag: int, expected_ref_tags: list[int], app_tag: int,
             expected_app_tags: list[int], app_tag_mask: int, expected_app_tag_masks: list[int], dtype: int,
             dspec: int, fmt_: int) -> None:
    """Copy (NVM opcode 19h): source ranges to one destination in the namespace, within its MSSRL, MCL
    and MSRC (refused by name otherwise, and where ONCS has no Copy).

    \b
    Example: nvmevfio copy 00:04.0 -n 1 --sdlba 200 --slbs 10,20 --blocks 3,3
    """
    from nvmevfio.errors import Refused

    with blockdev(address, nsid) as dev, errors():
        p = dev.provider
        if not p.id_ctrl.get("oncs", 0) & (1 << 8):
            raise Refused("unsupported-command", "the controller does not support Copy (ONCS bit 8)")
        Control(dtype=dtype, dspec=dspec).check(p)
        if fmt_ and not p.id_ctrl.get("ocfs", 0) & (1 << fmt_):  # format 0 comes with Copy (ONCS bit 8)
            raise Refused("copy-format-unsupported", f"source range format {fmt_}: the controller's OCFS "
                          f"({p.id_ctrl.get('ocfs', 0):#x}) does not have it", format=fmt_)
        ident = p.identify_namespace(nsid).identify
        ranges = copy_ranges(slbs, blocks, mssrl=ident["mssrl"], mcl=ident["mcl"], msrc=ident["msrc"],
                             eilbrts=tuple(expected_ref_tags), elbats=tuple(expected_app_tags),
                             elbatms=tuple(expected_app_tag_masks), fmt=fmt_)
        for s, b in zip(slbs, blocks):
            dev.check_window(s, b + 1)
        dev.check_window(sdlba, sum(b + 1 for b in blocks))
        p.io_passthru(0x19, nsid=nsid, data=ranges, **copy_dwords(sdlba, len(slbs), lr=limited_retry, fua=fua,
                                                                   prinfor=prinfor, prinfow=prinfow, dtype=dtype,
                                                                   dspec=dspec, ilbrt=ref_tag, lbat=app_tag,
                                                                   lbatm=app_tag_mask, fmt=fmt_))
    click.echo("NVMe Copy: success")
