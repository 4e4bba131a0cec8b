"""Data: read, write, flush, write-zeroes, deallocate (through the device or the service)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any, Callable

import click

from nvmevfio.cli.common import (
    CHUNK,
    EXIT_ERROR,
    EXIT_REFUSED,
    _fail,
    _hexdump,
    _progress,
    block_address_arg,
    blockdev,
    errors,
    main,
    nsid_opt,
    service_socket_opt,
)


# ------------------------------------------------------------------ data
def _window(dev: Any, lba: int | None, count: int | None, offset: int | None, size: int | None) -> tuple[int, int]:
    bs = dev.block_size
    if offset is not None or size is not None:
        if lba is not None or count is not None:
            _fail("give either --lba/--count or --offset/--size, not both", EXIT_ERROR)
        offset = offset or 0
        if size is None:
            _fail("--offset needs --size", EXIT_ERROR)
        assert size is not None
        if offset % bs or size % bs:
            _fail(f"refused: --offset {offset} / --size {size} are not multiples of the {bs}-byte block "
                  "[length-mismatch]", EXIT_REFUSED)
        return offset // bs, size // bs
    return (lba or 0), (count if count is not None else 1)


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
@click.option("-s", "--lba", type=int, help="first logical block")
@click.option("-c", "--count", type=int, help="number of blocks (default 1)")
@click.option("--offset", type=int, help="byte offset (a multiple of the block size)")
@click.option("--size", type=int, help="bytes to read (a multiple of the block size)")
@click.option("-d", "--data", "data", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="output file (default: stdout)")
@click.option("--hexdump", is_flag=True, help="print a hex dump instead of raw bytes")
def read(address: str, nsid: int, service_socket: str | None, lba: int | None, count: int | None,
         offset: int | None, size: int | None, data: str, hexdump: bool) -> None:
    """Read blocks to a file or stdout.

    \b
    Example: nvmevfio read 00:04.0 -n 1 --lba 0 --count 8 --hexdump
             nvmevfio read 00:04.0 --offset 0 --size 1048576 -d out.bin
             nvmevfio read --socket /run/nvmevfio/nvmevfio.sock --lba 0 --hexdump
    """
    with blockdev(address, nsid, service_socket) as dev, errors():
        first, n = _window(dev, lba, count, offset, size)
        dev.check_window(first, n)
        per = max(1, CHUNK // dev.block_size)
        out = sys.stdout.buffer if data == "-" else open(data, "wb")  # noqa: SIM115
        try:  # a reader that stops early (| head) is not an error: BrokenPipeError ends quietly below
            with _progress(n * dev.block_size, "reading") as bar:
                for start in range(first, first + n, per):
                    k = min(per, first + n - start)
                    chunk = dev.read_blocks(start, k)
                    if hexdump:
                        _hexdump(out, chunk.tobytes(), (start - first) * dev.block_size)
                    else:
                        out.write(chunk.tobytes())
                    if bar is not None:
                        bar.update(len(chunk))
        except BrokenPipeError:
            # Send what is left to /dev/null so the interpreter's final flush does not fail too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        finally:
            if out is not sys.stdout.buffer:
                out.close()
            else:
                with contextlib.suppress(BrokenPipeError):
                    out.flush()


@main.command()
@block_address_arg
@nsid_opt
@service_socket_opt
@click.option("-s", "--lba", type=int, help="first logical block")
@click.option("--offset", type=int, help="byte offset (a multiple of the block size)")
@click.option("-d", "--data", "data", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="input file (default: stdin)")
@click.option("--pad", is_flag=True, help="zero-pad a partial last block instead of refusing it")
def write(address: str, nsid: int, service_socket: str | None, lba: int | None, offset: int | None, data: str,
          pad: bool) -> None:
    """Write a file (or stdin) at a block address.

    A file is checked whole (size, window, partial last block) before the first block is
    written, then streamed; stdin is read to its end first, for the same reason.

    \b
    Example: nvmevfio write 00:04.0 -n 1 --lba 100 -d image.bin
             head -c 4096 /dev/urandom | nvmevfio write 00:04.0 --lba 0
    """
    import numpy as np

    payload: bytes | None = None
    if data == "-":
        stdin_data = sys.stdin.buffer.read()
        payload, total = stdin_data, len(stdin_data)
    else:
        try:
            total = os.path.getsize(data)
        except OSError as exc:
            _fail(f"cannot read {data}: {exc.strerror}", EXIT_ERROR)
    with blockdev(address, nsid, service_socket) as dev, errors():
        bs = dev.block_size
        if offset is not None:
            if lba is not None:
                _fail("give either --lba or --offset, not both", EXIT_ERROR)
            if offset % bs:
                _fail(f"refused: --offset {offset} is not a multiple of the {bs}-byte block [length-mismatch]",
                      EXIT_REFUSED)
            lba = offset // bs
        lba = lba or 0
        if not total:
            _fail("refused: no data to write [length-mismatch]", EXIT_REFUSED)
        if total % bs and not pad:
            _fail(f"refused: {total} bytes is not a multiple of the {bs}-byte block; the last block "
                  f"would be partial [length-mismatch] — use --pad to zero-fill it", EXIT_REFUSED)
        n = -(-total // bs)
        dev.check_window(lba, n)
        src = io.BytesIO(payload) if payload is not None else open(data, "rb")  # noqa: SIM115
        with src, _progress(n * bs, "writing") as bar:
            done = 0
            while done < n:
                chunk = src.read(min(CHUNK // bs, n - done) * bs)
                if not chunk:
                    _fail(f"{data} shrank while it was being written ({done} blocks written)", EXIT_ERROR)
                if len(chunk) % bs:  # only the last chunk, and only with --pad
                    chunk += b"\0" * (bs - len(chunk) % bs)
                k = len(chunk) // bs
                dev.write_blocks(lba + done, np.frombuffer(chunk, dtype=np.uint8))
                done += k
                if bar is not None:
                    bar.update(k * bs)
    click.echo(f"wrote {n} blocks ({n * bs} bytes) at LBA {lba}", err=True)


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
    click.echo(f"NVMe Flush: success (nsid {nsid})")


def _range_command(verb: str, fn: Callable[[Any, int, int], None]) -> Callable[..., None]:
    @block_address_arg
    @nsid_opt
    @service_socket_opt
    @click.option("-s", "--lba", type=int, required=True, help="first logical block")
    @click.option("-c", "--count", type=int, required=True, help="number of blocks")
    def cmd(address: str, nsid: int, service_socket: str | None, lba: int, count: int) -> None:
        with blockdev(address, nsid, service_socket) as dev, errors():
            fn(dev, lba, count)
        click.echo(f"NVMe {verb}: success (nsid {nsid}, LBA {lba}, {count} blocks)")

    return cmd


main.command("write-zeroes", help="Write Zeroes over a range of blocks.\n\n\b\nExample: nvmevfio write-zeroes "
             "00:04.0 -n 1 --lba 0 --count 2048")(_range_command("Write Zeroes", lambda d, s, c: d.write_zeroes(s, c)))
main.command("deallocate", help="Deallocate (TRIM: Dataset Management) a range of blocks.\n\n\b\nExample: "
             "nvmevfio deallocate 00:04.0 -n 1 --lba 0 --count 2048")(
    _range_command("Deallocate", lambda d, s, c: d.deallocate(s, c)))
