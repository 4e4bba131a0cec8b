"""Passthrough: admin-passthru and io-passthru (the broker's own commands refused)."""

from __future__ import annotations

from typing import Any, Callable

import click

from nvmevfio.cli.common import (
    EXIT_REFUSED,
    NUM,
    _emit_json,
    _fail,
    _write_data,
    address_arg,
    blockdev,
    controller,
    errors,
    main,
    output_long_opt,
    raw_binary_opt,
    timeout_ms_opt,
)

# ------------------------------------------------------------------ passthrough


def _passthru_command(admin: bool) -> Callable[..., None]:
    kind = "Admin" if admin else "IO"

    @address_arg
    @click.option("-o", "--opcode", type=NUM, required=True, help="opcode (vendor-specific C0h-FFh allowed)")
    @click.option("-f", "--flags", type=NUM, default=0, show_default=True,
                  help="CDW0 flags: only 0 (fused and SGL commands are the broker's)")
    @click.option("-R", "--rsvd", type=NUM, default=0, show_default=True, help="reserved field: only 0")
    @click.option("-n", "--namespace-id", "nsid", type=NUM, default=0 if admin else 1, show_default=True)
    @click.option("-2", "--cdw2", type=NUM, default=0)
    @click.option("-3", "--cdw3", type=NUM, default=0)
    @click.option("-4", "--cdw10", type=NUM, default=0)
    @click.option("-5", "--cdw11", type=NUM, default=0)
    @click.option("-6", "--cdw12", type=NUM, default=0)
    @click.option("-7", "--cdw13", type=NUM, default=0)
    @click.option("-8", "--cdw14", type=NUM, default=0)
    @click.option("-9", "--cdw15", type=NUM, default=0)
    @click.option("-l", "--data-len", type=NUM, default=0, help="bytes to transfer")
    @click.option("-m", "--metadata-len", type=NUM, default=0,
                  help="I/O: bytes of metadata (the broker authors the metadata pointer); admin: only 0")
    @click.option("-M", "--metadata", "metadata_file", type=click.Path(dir_okay=False), default=None,
                  help="I/O: the metadata to send (--write) or the file it is received into")
    @click.option("-i", "--input-file", type=click.File("rb"), help="data to send (--write)")
    @click.option("-r", "--read", "read_", is_flag=True, help="controller to host (default: opcode bit 1)")
    @click.option("-w", "--write", "write_", is_flag=True, help="host to controller (default: opcode bit 0)")
    @click.option("-p", "--prefill", type=NUM, default=0, help="byte the data buffer is filled with first")
    @timeout_ms_opt
    @click.option("-s", "--show-command", is_flag=True, help="print the command's fields first")
    @click.option("-d", "--dry-run", is_flag=True, help="print the command's fields, send nothing")
    @raw_binary_opt
    @click.option("-T", "--latency", is_flag=True, help="print the command's latency")
    @output_long_opt
    def cmd(address: str, opcode: int, flags: int, rsvd: int, nsid: int, cdw2: int, cdw3: int, cdw10: int,
            cdw11: int, cdw12: int, cdw13: int, cdw14: int, cdw15: int, data_len: int, metadata_len: int,
            metadata_file: str | None, input_file: Any, read_: bool, write_: bool, prefill: int,
            timeout_ms: int | None, show_command: bool, dry_run: bool, raw_binary: bool, latency: bool,
            fmt: str) -> None:
        import time

        from nvmevfio.nvme.spec import command_name

        if flags or rsvd or (admin and (metadata_len or metadata_file)):
            _fail("refused: --flags, --rsvd and (admin) --metadata-len must be 0: fused and SGL commands and the "
                  "metadata pointer are the broker's [broker-owned-command]", EXIT_REFUSED)
        write = write_ or (not read_ and bool(opcode & 1))
        read = read_ or (not write_ and bool(opcode & 2))
        if write and read:
            _fail("refused: bidirectional transfers are not supported (give --read or --write)", EXIT_REFUSED)
        payload = None
        if write and data_len:
            payload = bytearray([prefill & 0xFF]) * data_len
            if input_file is not None:
                got = input_file.read(data_len)
                payload[: len(got)] = got
        md = bytearray(metadata_len) if metadata_len else None
        if md is not None and write and metadata_file:
            with open(metadata_file, "rb") as mf:
                got_md = mf.read(metadata_len)
            md[: len(got_md)] = got_md
        cdws = {"cdw2": cdw2, "cdw3": cdw3, "cdw10": cdw10, "cdw11": cdw11, "cdw12": cdw12, "cdw13": cdw13,
                "cdw14": cdw14, "cdw15": cdw15}
        name = command_name(admin, opcode)
        if show_command or dry_run:
            click.echo(f"opcode       : {opcode:#04x} ({name})\nnsid         : {nsid:#x}\n" + "".join(
                f"{k:<13}: {v:#010x}\n" for k, v in cdws.items()) + f"data_len     : {data_len} "
                f"({'write' if write else 'read' if read else 'none'})\ntimeout_ms   : {timeout_ms or 0}", err=True)
            if dry_run:
                return
        timeout_s = timeout_ms / 1000 if timeout_ms else None
        ctx = controller(address) if admin else blockdev(address, nsid if nsid else 1)
        with ctx as h, errors():
            provider = h if admin else h.provider
            t0 = time.perf_counter()
            if admin:
                dw0, data = provider.admin_passthru(opcode, nsid=nsid, data=payload,
                                                    data_len=data_len if read else 0, timeout_s=timeout_s, **cdws)
            else:
                dw0, data = provider.io_passthru(opcode, nsid=nsid, data=payload, data_len=data_len if read else 0,
                                                 timeout_s=timeout_s, metadata=md, **cdws)
                if md is not None and not write and metadata_file:
                    with open(metadata_file, "wb") as mf:
                        mf.write(md)
            took_us = (time.perf_counter() - t0) * 1e6
        if fmt == "json":
            _emit_json({"opcode": opcode, "command": name, "result": dw0,
                        "data": data.hex() if data is not None else None, "latency_us": round(took_us, 1)})
            return
        click.echo(f"{kind} Command {name} is Success and result: {dw0:#010x}", err=True)
        if latency:
            click.echo(f"latency: {kind} {name}: {took_us:.0f} us", err=True)
        if data is not None:
            _write_data(data, raw_binary)

    return cmd


main.command("admin-passthru", help="Send an admin command the broker does not own (nvme-cli's options); the "
             "broker authors its data pointer.\n\n\b\nExample: nvmevfio admin-passthru 00:04.0 --opcode 0x06 "
             "--cdw10 1 --data-len 4096 --read")(_passthru_command(True))
main.command("io-passthru", help="Send an I/O command the broker does not own (nvme-cli's options); the broker "
             "authors its data and metadata pointers.\n\n\b\nExample: nvmevfio io-passthru 00:04.0 -n 1 --opcode 0x02 "
             "--cdw10 0 --cdw12 7 --data-len 4096 --read -b > lba0-7.bin\n\b\n         nvmevfio io-passthru 00:04.0 "
             "-n 2 --opcode 0x02 --cdw12 7 --data-len 4096 --metadata-len 64 -M md.bin --read -b > lba0-7.bin"
             )(_passthru_command(False))
