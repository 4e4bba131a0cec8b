"""Logs and features: smart-log, error-log, fw-log, get-log, get/set-feature, sanitize-log, self-test-log."""

from __future__ import annotations

import contextlib
import locale
import sys
from collections.abc import Iterator
from typing import Any

import click

from nvmevfio.cli.common import (
    IONUM,
    NUM,
    _address,
    _emit_json,
    _nvme_cli_json,
    _write_data,
    address_arg,
    controller,
    errors,
    human_opt,
    main,
    num,
    output_format_opt,
    output_long_opt,
    output_opt,
    raw_binary_opt,
    want_binary,
)

SMART_STR_FIELDS = {"data_units_read", "data_units_written", "host_read_commands", "host_write_commands",
                    "controller_busy_time", "power_cycles", "power_on_hours", "unsafe_shutdowns", "media_errors",
                    "num_err_log_entries"}


# ------------------------------------------------------------------ logs and features
SMART_LABELS = [
    ("critical_warning", "critical_warning"), ("temperature", "temperature"),
    ("avail_spare", "available_spare"), ("spare_thresh", "available_spare_threshold"),
    ("percent_used", "percentage_used"),
    ("endurance_grp_critical_warning_summary", "endurance group critical warning summary"),
    ("data_units_read", "Data Units Read"), ("data_units_written", "Data Units Written"),
    ("host_read_commands", "host_read_commands"), ("host_write_commands", "host_write_commands"),
    ("controller_busy_time", "controller_busy_time"), ("power_cycles", "power_cycles"),
    ("power_on_hours", "power_on_hours"), ("unsafe_shutdowns", "unsafe_shutdowns"),
    ("media_errors", "media_errors"), ("num_err_log_entries", "num_err_log_entries"),
    ("warning_temp_time", "Warning Temperature Time"), ("critical_comp_time", "Critical Composite Temperature Time"),
    ("thm_temp1_trans_count", "Thermal Management T1 Trans Count"),
    ("thm_temp2_trans_count", "Thermal Management T2 Trans Count"),
    ("thm_temp1_total_time", "Thermal Management T1 Total Time"),
    ("thm_temp2_total_time", "Thermal Management T2 Total Time"),
]


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} PB"  # pragma: no cover


CRITICAL_WARNING_BITS = ("Available Spare[0]", "Temp. Threshold[1]", "NVM subsystem Reliability[2]", "Read-only[3]",
                         "Volatile mem. backup failed[4]", "Persistent Mem. RO[5]")


@main.command("smart-log")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=0xFFFFFFFF, show_default=True,
              help="the namespace (0xffffffff: the controller)")
@output_opt
@raw_binary_opt
@human_opt
def smart_log(address: str, nsid: int, fmt: str, raw_binary: bool, human: bool) -> None:
    """SMART / Health Information log (log page 02h).

    \b
    Example: nvmevfio smart-log 00:04.0 -o json
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        raw = s.get_log(0x02, 512, nsid=nsid)
    if want_binary(fmt, raw_binary):
        _write_data(raw, True)
        return
    d = structures.parse_smart_log(raw)
    sensors = {f"temperature_sensor_{i}" for i in range(1, 9)}
    d = {k: v for k, v in d.items() if k not in sensors or v}  # nvme-cli prints sensors that report
    if fmt == "json":
        _emit_json(_nvme_cli_json(d, SMART_STR_FIELDS))
        return
    click.echo(f"Smart Log for NVME device:{_address(address)} namespace-id:{nsid:x}")
    for key, label in SMART_LABELS:
        v = d[key]
        if key == "temperature":
            text = f"{v - 273}°C ({v} Kelvin)"
        elif key in ("avail_spare", "spare_thresh", "percent_used"):
            text = f"{v}%"
        elif key in ("data_units_read", "data_units_written"):
            text = f"{v} ({_human_bytes(v * 512 * 1000)})"
        else:
            text = str(v)
        click.echo(f"{label:<40}: {text}")
        if key == "critical_warning" and human:
            for bit, name in enumerate(CRITICAL_WARNING_BITS):
                click.echo(f"      {name:<31}: {v >> bit & 1}")
    for i in range(1, 9):
        if f"temperature_sensor_{i}" in d:
            v = d[f"temperature_sensor_{i}"]
            click.echo(f"{'Temperature Sensor ' + str(i):<40}: {v - 273}°C ({v} Kelvin)")


@main.command("error-log")
@address_arg
@click.option("-e", "--log-entries", "entries", type=num(1, 256), default=64, show_default=True,
              help="entries to read (at most the controller's ELPE + 1)")
@output_opt
@raw_binary_opt
def error_log(address: str, entries: int, fmt: str, raw_binary: bool) -> None:
    """Error Information log (log page 01h).

    \b
    Example: nvmevfio error-log 00:04.0 -e 4
    """
    from nvmevfio.nvme import spec, structures

    with controller(address) as s, errors():
        elpe = s.id_ctrl["elpe"] + 1
        raw = s.get_log_page("error", entries=min(entries, elpe))
    if want_binary(fmt, raw_binary):
        _write_data(raw, True)
        return
    log = structures.parse_error_log(raw)
    if fmt == "json":
        _emit_json({"errors": log})
        return
    click.echo(f"Error Log Entries for device:{_address(address)} entries:{len(log)}")
    click.echo(".................")
    for i, e in enumerate(log):
        click.echo(f" Entry[{i:>2}]   \n.................")
        sct, sc = (e["status_field"] >> 8) & 7, e["status_field"] & 0xFF
        for k, v in e.items():
            text = f"{v}({spec.status_name(sct, sc)})" if k == "status_field" else v
            click.echo(f"{k:<16}: {text}")
        click.echo(".................")


def firmware_slots(raw: bytes) -> dict[str, Any]:
    """The Firmware Slot Information page as nvme-cli's JSON: the active slot and each filled slot's
    revision, its 8 bytes as a little-endian number and as text (non-printing bytes as '.')."""
    out: dict[str, Any] = {"Active Firmware Slot (afi)": raw[0]}
    for i in range(1, 8):
        rev = bytes(raw[8 * i : 8 * i + 8])
        if any(rev):
            text = "".join(chr(b) if 0x21 <= b <= 0x7E else "." for b in rev)
            out[f"Firmware Rev Slot {i}"] = f"{int.from_bytes(rev, 'little')} ({text})"
    return out


@main.command("fw-log")
@address_arg
@output_opt
@raw_binary_opt
def fw_log(address: str, fmt: str, raw_binary: bool) -> None:
    """Firmware Slot Information log (log page 03h); ``-o json`` as nvme-cli's.

    \b
    Example: nvmevfio fw-log 00:04.0
    """
    with controller(address) as s, errors():
        raw = s.get_log_page("firmware")
    if want_binary(fmt, raw_binary):
        _write_data(raw, True)
        return
    d = firmware_slots(raw)
    if fmt == "json":
        _emit_json({_address(address): d})
        return
    click.echo(f"Firmware Log for device:{_address(address)}")
    click.echo(f"afi  : {raw[0]:#x}")
    for i in range(1, 8):
        if f"Firmware Rev Slot {i}" in d:
            num_, text = d[f"Firmware Rev Slot {i}"].split(" ", 1)
            click.echo(f"frs{i} : {int(num_):#018x} {text}")


def c_hex(value: int) -> str:
    """C's ``%#010x``, as nvme-cli prints a value: no 0x for zero."""
    return f"{value:#010x}" if value else "00000000"


SELECT_NAMES = {0: "Current", 1: "Default", 2: "Saved", 3: "Supported capabilities", 8: "Changed"}
SC_INVALID_FIELD = 0x02  # Generic Command Status: Invalid Field in Command (NVMe Base 2.0, 4.2.3.1)


def _get_feature(s: Any, fid: int, sel: int, nsid: int, cdw11: int, data_len: int, uuid_index: int
                 ) -> tuple[int, bytes | None]:
    """One Get Features (SEL 0..7 in CDW10 10:8), as nvme-cli's get_feature_id: the feature's own data
    length unless -l says; 16 bytes for the extended Host Identifier and 255 descriptors for FDP
    Events whatever -l says; no data for SEL 3. Returns (DW0, the data or None)."""
    from nvmevfio.cli.human_features import feature_data_len

    data_len = data_len or feature_data_len(fid, cdw11)
    if (fid == 0x81 and cdw11 & 1) or fid == 0x1E:
        data_len = feature_data_len(fid, cdw11)
    if fid == 0x1E:
        cdw11 |= 0xFF << 16
    if sel == 3:
        data_len = 0
    if data_len or uuid_index or sel > 3 or not fid:
        return s.admin_passthru(0x0A, nsid=nsid, data_len=data_len, cdw10=fid | sel << 8, cdw11=cdw11,
                                cdw14=uuid_index)
    return s.get_features(fid, sel=sel, nsid=nsid, cdw11=cdw11), None


def _skipped(exc: Any) -> bool:
    """Whether nvme-cli 2.3's every-feature loop goes on past this status: only Invalid Field in
    Command exactly, as its nvme_status_equals compares the whole status value (libnvme 1.3), so
    with Do Not Retry or More set (QEMU 7.2 sets DNR) it stops there and exits 1."""
    return (exc.sct, exc.sc, exc.dnr, exc.more) == (0, SC_INVALID_FIELD, False, False)


def _changed(s: Any, fid: int, nsid: int, cdw11: int, data_len: int, uuid_index: int) -> tuple[int, bytes | None, bool]:
    """nvme-cli's -s 8 (get_feature_id_changed): the current value, and whether to show it: when the
    default differs, or cannot be read, or (nvme-cli's strcmp of the two buffers) both buffers read
    equal as C strings."""
    from nvmevfio.errors import CommandError

    value, data = _get_feature(s, fid, 0, nsid, cdw11, data_len, uuid_index)
    try:
        dvalue, ddata = _get_feature(s, fid, 1, nsid, cdw11, data_len, uuid_index)
    except CommandError:
        return value, data, True
    same_text = data is not None and ddata is not None and data.split(b"\0")[0] == ddata.split(b"\0")[0]
    return value, data, value != dvalue or same_text


@main.command("get-feature")
@address_arg
@click.option("-f", "--feature-id", "fid", type=num(0, 255), default=0,
              help="feature identifier (default 0: every feature, as nvme-cli)")
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=0, show_default=True)
@click.option("-s", "--sel", type=num(0, 8), default=0, show_default=True,
              help="0 current, 1 default, 2 saved, 3 supported capabilities, 8 changed (shown only when the "
                   "current value differs from the default); 4-7 are sent as given (reserved)")
@click.option("-l", "--data-len", type=NUM, default=0, help="bytes the feature returns (e.g. LBA Range Type)")
@raw_binary_opt
@click.option("-c", "--cdw11", type=NUM, default=0, help="feature-specific CDW11")
@click.option("-U", "--uuid-index", type=num(0, 127), default=0, help="UUID index (CDW14)")
@human_opt
@output_format_opt(binary=False)
def get_feature(address: str, fid: int, nsid: int, sel: int, data_len: int, raw_binary: bool, cdw11: int,
                uuid_index: int, human: bool, fmt: str) -> None:
    """Get Features (admin opcode 0Ah); ``-H`` decodes the value. Without -f, every feature the
    controller has (1..255; those it refuses with Invalid Field are skipped, as nvme-cli does).

    \b
    Example: nvmevfio get-feature 00:04.0 -f 0x07 -H
             nvmevfio get-feature 00:04.0 -f 0x04 -s 8 (only if changed from its default)
    """
    from nvmevfio.errors import CommandError

    shown: list[dict[str, Any]] = []
    failed: CommandError | None = None
    with controller(address) as s, errors():
        for f in range(fid, fid + 1 if fid else 0x100):  # nvme-cli: 0 means all, from 0, each shown as read
            failed = None
            try:
                if sel == 8:
                    value, data, show = _changed(s, f, nsid, cdw11, data_len, uuid_index)
                else:
                    (value, data), show = _get_feature(s, f, sel, nsid, cdw11, data_len, uuid_index), True
            except CommandError as exc:
                if fid or not _skipped(exc):
                    raise  # nvme-cli stops here too, with the status
                failed = exc  # not a feature of this controller: skipped (nvme-cli's exit is the last one's)
                continue
            if show and fmt == "json":
                shown.append({"feature_id": f, "name": _feature_name(f), "sel": sel, "value": value,
                              **({"data": data.hex()} if data is not None else {})})
            elif show:
                _show_feature(f, sel, value, data, raw_binary, human)
    if fmt == "json" and (shown or not fid):  # one object for one feature, a list of them for every feature
        _emit_json(shown if not fid else shown[0])
    if failed is not None:
        sys.exit(1)


def _feature_name(fid: int) -> str:
    from nvmevfio.cli.human_features import FEATURE_NAMES

    return FEATURE_NAMES.get(fid, "Unknown")


def _show_feature(fid: int, sel: int, value: int, data: bytes | None, raw_binary: bool, human: bool) -> None:
    """nvme-cli's get_feature_id_print."""
    from nvmevfio.cli.human_features import feature_text, select_result

    name = _feature_name(fid)
    if raw_binary and data:  # nvme-cli: -b with a buffer prints the buffer's bytes only
        _write_data(data, True)
        return
    click.echo(f"get-feature:{fid:#04x} ({name}), {SELECT_NAMES.get(sel, 'Reserved')} value:{c_hex(value)}")
    if sel == 3:
        for line in select_result(value):
            click.echo(line)
    elif human:  # the decode only, no dump of the buffer (nvme-cli's get_feature_id_print)
        with _user_locale():  # the timestamp's date and digit grouping, as nvme-cli's setlocale(LC_ALL, "")
            click.echo(feature_text(fid, value, data or None), nl=False)
    elif data:
        _write_data(data, False)


@contextlib.contextmanager
def _user_locale() -> Iterator[None]:
    saved = locale.setlocale(locale.LC_ALL)
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_ALL, "")
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


@main.command("set-feature")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=0, show_default=True)
@click.option("-f", "--feature-id", "fid", type=num(1, 255), required=True, help="feature identifier")
@click.option("-v", "--value", type=IONUM, default=0, show_default=True, help="the value (CDW11)")
@click.option("-c", "--cdw12", type=NUM, default=0, show_default=True)
@click.option("-l", "--data-len", type=NUM, default=0, help="bytes of --data to send")
@click.option("-d", "--data", "data_file", type=click.File("rb"), help="a data buffer the feature takes")
@click.option("-s", "--save", is_flag=True, help="keep the value across resets (CDW10.SV)")
@click.option("-U", "--uuid-index", type=num(0, 127), default=0, help="UUID index (CDW14 6:0)")
@output_format_opt(binary=False)
def set_feature(address: str, nsid: int, fid: int, value: int, cdw12: int, data_len: int, data_file: Any, save: bool,
                uuid_index: int, fmt: str) -> None:
    """Set Features (admin opcode 09h). Number of Queues and Host Memory Buffer are the broker's.

    \b
    Example: nvmevfio set-feature 00:04.0 -f 4 -v 0x150      # temperature threshold 336 K
    """
    from nvmevfio.cli.human_features import FEATURE_NAMES

    data = data_file.read(data_len or -1) if data_file is not None else None
    with controller(address) as s, errors():
        if uuid_index:  # CDW14's UUID index: through the passthrough (which refuses the broker's features too)
            dw0, _ = s.admin_passthru(0x09, nsid=nsid, data=data, cdw10=fid | int(save) << 31, cdw11=value,
                                      cdw12=cdw12, cdw14=uuid_index)
        else:
            dw0 = s.set_features(fid, value, cdw12=cdw12, save=save, nsid=nsid, data=data)
    name = FEATURE_NAMES.get(fid, "Unknown")
    if fmt == "json":
        _emit_json({"feature_id": fid, "name": name, "value": value, "cdw12": cdw12, "save": save, "result": dw0})
        return
    click.echo(f"set-feature:{fid:#04x} ({name}), value:{value:#010x}, cdw12:{cdw12:08x}, save:{int(save)}")


@main.command("get-log")
@address_arg
@click.option("-n", "--namespace-id", "nsid", type=NUM, default=0xFFFFFFFF, show_default=True)
@click.option("-i", "--log-id", "lid", type=num(0, 255), default=None, help="log page identifier")
@click.option("-l", "--log-len", "length", type=NUM, required=True, help="bytes (a multiple of 4)")
@click.option("-a", "--aen", type=NUM, default=None, help="an AEN's result: its log page (instead of --log-id)")
@click.option("-o", "--lpo", "offset", type=IONUM, default=0, show_default=True, help="log page offset, bytes")
@click.option("-s", "--lsp", type=num(0, 127), default=0, help="log specific field")
@click.option("-S", "--lsi", type=num(0, 0xFFFF), default=0, help="log specific identifier")
@click.option("-r", "--rae", is_flag=True, help="retain the asynchronous event")
@click.option("-U", "--uuid-index", type=num(0, 127), default=0, help="UUID index")
@raw_binary_opt
@click.option("-y", "--csi", type=num(0, 255), default=0, help="command set identifier")
@click.option("-O", "--ot", is_flag=True, help="offset type: --lpo is an index, not bytes")
@output_long_opt
def get_log(address: str, nsid: int, lid: int | None, length: int, aen: int | None, offset: int, lsp: int, lsi: int,
            rae: bool, uuid_index: int, raw_binary: bool, csi: int, ot: bool, fmt: str) -> None:
    """Get Log Page (admin opcode 02h): any log id, --log-len bytes from --lpo.

    \b
    Example: nvmevfio get-log 00:04.0 --log-id 2 --log-len 512
    """
    if aen is not None:
        lid = aen >> 16 & 0xFF
    if lid is None:
        raise click.UsageError("give --log-id (or --aen)")
    if length <= 0 or length % 4:
        raise click.UsageError(f"--log-len {length}: a positive multiple of 4")
    with controller(address) as s, errors():
        if lsp or lsi or rae or uuid_index or csi or ot:
            numd = length // 4 - 1
            _, got = s.admin_passthru(0x02, nsid=nsid, data_len=length,
                                      cdw10=lid | lsp << 8 | int(rae) << 15 | (numd & 0xFFFF) << 16,
                                      cdw11=numd >> 16 | lsi << 16, cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32,
                                      cdw14=uuid_index | int(ot) << 23 | csi << 24)
            data = got or b""
        else:
            data = s.get_log(lid, length, nsid=nsid, offset=offset)
    if fmt == "json":
        _emit_json({"log_id": lid, "length": length, "offset": offset, "data": data.hex()})
        return
    _write_data(data, raw_binary, f"Device:{_address(address)} log-id:{lid} namespace-id:{nsid:#x}")


def _show_decoded(d: dict[str, Any], indent: str = "") -> None:
    """A decoded log as ``name : value`` lines (nested objects and lists indented)."""
    width = max((len(k) for k in d), default=0)
    for k, v in d.items():
        if isinstance(v, dict):
            click.echo(f"{indent}{k}:")
            _show_decoded(v, indent + "  ")
        elif isinstance(v, list):
            click.echo(f"{indent}{k}: {len(v)}")
            for i, item in enumerate(v):
                click.echo(f"{indent}  [{i}]")
                _show_decoded(item, indent + "    ")
        else:
            shown = f"{v:#x}" if isinstance(v, int) and v > 9 else v
            click.echo(f"{indent}{k:<{width}} : {shown}")


SANITIZE_STATUS = {0: "NVM Subsystem has never been sanitized.",
                   1: "Most Recent Sanitize Command Completed Successfully.", 2: "Sanitize in Progress.",
                   3: "Most Recent Sanitize Command Failed.",
                   4: "Most Recent Sanitize Command (No-Deallocate After Sanitize) Completed Successfully."}
_SANITIZE_TIMES = ("Overwrite                   ", "Block Erase                 ", "Crypto Erase                ",
                   "Overwrite (No-Deallocate)   ", "Block Erase (No-Deallocate) ", "Crypto Erase (No-Deallocate)")


def sanitize_log_text(page: bytes, human: bool) -> str:
    """The Sanitize Status log (81h) as nvme-cli 2.3's nvme_show_sanitize_log prints it; ``-H`` adds
    SPROG's percentage (while a sanitize runs) and SSTAT's fields."""
    sprog, sstat = int.from_bytes(page[0:2], "little"), int.from_bytes(page[2:4], "little")
    words = [int.from_bytes(page[at : at + 4], "little") for at in range(4, 32, 4)]
    lines = [f"Sanitize Progress                      (SPROG) :  {sprog}"
             + (f"\t({sprog * 100 / 0x10000:f}%)" if human and sstat & 7 == 2 else ""),
             f"Sanitize Status                        (SSTAT) :  {hex(sstat & 7) if sstat & 7 else 0}"]
    if human:
        erased = ("Global Data Erased set: no NS LB in the NVM subsystem has been written to and no PMR in the NVM "
                  "subsystem has been enabled" if sstat & 0x100 else "Global Data Erased cleared: a NS LB in the NVM "
                  "subsystem has been written to or a PMR in the NVM subsystem has been enabled")
        lines += [f"\t[2:0]\t{SANITIZE_STATUS.get(sstat & 7, 'Unknown')}",
                  f"\t[7:3]\tNumber of completed passes if most recent operation was overwrite:\t{sstat >> 3 & 0x1F}",
                  f"\t  [8]\t{erased}"]
    lines.append(f"Sanitize Command Dword 10 Information (SCDW10) :  {hex(words[0]) if words[0] else 0}")
    lines += [f"Estimated Time For {name}:  {v}{' (No time period reported)' if v == 0xFFFFFFFF else ''}"
              for name, v in zip(_SANITIZE_TIMES, words[1:])]
    return "\n".join(lines) + "\n"


@main.command("sanitize-log")
@address_arg
@click.option("-r", "--rae", is_flag=True, help="retain the asynchronous event (the broker re-reads it anyway)")
@output_opt
@human_opt
@raw_binary_opt
def sanitize_log(address: str, rae: bool, fmt: str, human: bool, raw_binary: bool) -> None:
    """The Sanitize Status log page (81h), decoded; ``-o json`` has nvme-cli's field names.

    \b
    Example: nvmevfio sanitize-log 00:04.0 -o json
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        data = s.get_log(0x81, 512)
    if want_binary(fmt, raw_binary):
        _write_data(data, True, "")
        return
    d = structures.parse_sanitize_log(data)
    if fmt == "json":
        _emit_json({_address(address): d})
        return
    click.echo(sanitize_log_text(data, human), nl=False)


@main.command("self-test-log")
@address_arg
@click.option("-e", "--dst-entries", type=num(1, 20), default=20, show_default=True,
              help="how many of the 20 results to show, newest first")
@raw_binary_opt
@output_opt
@click.option("-v", "--verbose", is_flag=True, help="accepted; every field is shown anyway")
def self_test_log(address: str, dst_entries: int, raw_binary: bool, fmt: str, verbose: bool) -> None:
    """The Device Self-test log page (06h), decoded; ``-o json`` has nvme-cli's field names.

    \b
    Example: nvmevfio self-test-log 00:04.0 -e 3 -o json
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        data = s.get_log(0x06, 564)
    if want_binary(fmt, raw_binary):
        _write_data(data, True, "")
        return
    d = structures.parse_self_test_log(data, dst_entries)
    if fmt == "json":
        _emit_json(d)
        return
    click.echo(f"Device Self Test Log for NVME device:{_address(address)}")
    _show_decoded(d)
