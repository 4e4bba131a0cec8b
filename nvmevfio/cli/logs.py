"""Logs and features: smart-log, error-log, fw-log, get-log, get/set-feature, sanitize-log, self-test-log."""

from __future__ import annotations

from typing import Any

import click

from nvmevfio.cli.common import (
    INT0,
    _address,
    _emit_json,
    _nvme_cli_json,
    _write_data,
    address_arg,
    controller,
    errors,
    main,
    output_opt,
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


@main.command("smart-log")
@address_arg
@output_opt
def smart_log(address: str, fmt: str) -> None:
    """SMART / Health Information log (log page 02h).

    \b
    Example: nvmevfio smart-log 00:04.0 -o json
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        d = structures.parse_smart_log(s.get_log_page("smart"))
    sensors = {f"temperature_sensor_{i}" for i in range(1, 9)}
    d = {k: v for k, v in d.items() if k not in sensors or v}  # nvme-cli prints sensors that report
    if fmt == "json":
        _emit_json(_nvme_cli_json(d, SMART_STR_FIELDS))
        return
    click.echo("Smart Log for NVME device:" + _address(address) + " namespace-id:ffffffff")
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
    for i in range(1, 9):
        if f"temperature_sensor_{i}" in d:
            v = d[f"temperature_sensor_{i}"]
            click.echo(f"{'Temperature Sensor ' + str(i):<40}: {v - 273}°C ({v} Kelvin)")


@main.command("error-log")
@address_arg
@click.option("-e", "--log-entries", "entries", type=click.IntRange(1, 256), default=64, show_default=True)
@output_opt
def error_log(address: str, entries: int, fmt: str) -> None:
    """Error Information log (log page 01h).

    \b
    Example: nvmevfio error-log 00:04.0 -e 4
    """
    from nvmevfio.nvme import spec, structures

    with controller(address) as s, errors():
        elpe = s.id_ctrl["elpe"] + 1
        log = structures.parse_error_log(s.get_log_page("error", entries=min(entries, elpe)))
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


@main.command("fw-log")
@address_arg
@output_opt
def fw_log(address: str, fmt: str) -> None:
    """Firmware Slot Information log (log page 03h).

    \b
    Example: nvmevfio fw-log 00:04.0
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        d = structures.parse_firmware_log(s.get_log_page("firmware"))
    if fmt == "json":
        _emit_json({k: v for k, v in d.items() if k == "afi" or v})
        return
    click.echo(f"Firmware Log for device:{_address(address)}")
    click.echo(f"afi  : {d['afi']:#x}")
    for i in range(1, 8):
        if d[f"frs{i}"]:
            click.echo(f"frs{i} : {d[f'frs{i}']}")


@main.command("get-feature")
@address_arg
@click.option("-f", "--feature-id", "fid", type=click.IntRange(1, 255), required=True, help="feature identifier")
@click.option("-s", "--sel", type=click.IntRange(0, 3), default=0, show_default=True,
              help="0 current, 1 default, 2 saved, 3 supported capabilities")
@click.option("-n", "--namespace-id", "nsid", type=int, default=0, show_default=True)
@output_opt
def get_feature(address: str, fid: int, sel: int, nsid: int, fmt: str) -> None:
    """Get Features (admin opcode 0Ah).

    \b
    Example: nvmevfio get-feature 00:04.0 -f 7
    """
    from nvmevfio.nvme.spec import FEATURE_NAMES

    with controller(address) as s, errors():
        value = s.get_features(fid, sel=sel, nsid=nsid)
    name = FEATURE_NAMES.get(fid, "Unknown")
    if fmt == "json":
        _emit_json({"feature_id": fid, "name": name, "sel": sel, "value": value})
        return
    which = ["Current", "Default", "Saved", "Supported capabilities"][sel]
    click.echo(f"get-feature:{fid:#04x} ({name}), {which} value:{value:#010x}")


@main.command("set-feature")
@address_arg
@click.option("-f", "--feature-id", "fid", type=click.IntRange(1, 255), required=True, help="feature identifier")
@click.option("-V", "--value", type=INT0, default=0, show_default=True, help="the value (CDW11)")
@click.option("--cdw12", type=INT0, default=0, show_default=True)
@click.option("-s", "--save", is_flag=True, help="keep the value across resets (CDW10.SV)")
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=0, show_default=True)
@click.option("-d", "--data", "data_file", type=click.File("rb"), help="a data buffer the feature takes")
@output_opt
def set_feature(address: str, fid: int, value: int, cdw12: int, save: bool, nsid: int, data_file: Any,
                fmt: str) -> None:
    """Set Features (admin opcode 09h). Number of Queues and Host Memory Buffer are the broker's.

    \b
    Example: nvmevfio set-feature 00:04.0 -f 4 -V 0x150      # temperature threshold 336 K
    """
    from nvmevfio.nvme.spec import FEATURE_NAMES

    data = data_file.read() if data_file is not None else None
    with controller(address) as s, errors():
        dw0 = s.set_features(fid, value, cdw12=cdw12, save=save, nsid=nsid, data=data)
    name = FEATURE_NAMES.get(fid, "Unknown")
    if fmt == "json":
        _emit_json({"feature_id": fid, "name": name, "value": value, "cdw12": cdw12, "save": save, "result": dw0})
        return
    click.echo(f"set-feature:{fid:#04x} ({name}), value:{value:#010x}, cdw12:{cdw12:#010x}, save:{int(save)}")


@main.command("get-log")
@address_arg
@click.option("-i", "--log-id", "lid", type=INT0, required=True, help="log page identifier")
@click.option("-l", "--log-len", "length", type=INT0, required=True, help="bytes (a multiple of 4)")
@click.option("-O", "--lpo", "offset", type=INT0, default=0, show_default=True, help="log page offset, bytes")
@click.option("-n", "--namespace-id", "nsid", type=INT0, default=0xFFFFFFFF, show_default=True)
@click.option("-b", "--raw-binary", is_flag=True, help="the log to stdout as raw bytes")
@output_opt
def get_log(address: str, lid: int, length: int, offset: int, nsid: int, raw_binary: bool, fmt: str) -> None:
    """Get Log Page (admin opcode 02h): any log id, --log-len bytes from --lpo.

    \b
    Example: nvmevfio get-log 00:04.0 --log-id 2 --log-len 512
    """
    with controller(address) as s, errors():
        data = s.get_log(lid, length, nsid=nsid, offset=offset)
    if fmt == "json":
        _emit_json({"log_id": lid, "length": length, "offset": offset, "data": data.hex()})
        return
    _write_data(data, raw_binary, f"Device:{_address(address)} log-id:{lid} namespace-id:{nsid:#x}", offset)


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


@main.command("sanitize-log")
@address_arg
@click.option("-b", "--raw-binary", is_flag=True, help="the page's 512 bytes, raw")
@output_opt
def sanitize_log(address: str, raw_binary: bool, fmt: str) -> None:
    """The Sanitize Status log page (81h), decoded; ``-o json`` has nvme-cli's field names.

    \b
    Example: nvmevfio sanitize-log 00:04.0 -o json
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        data = s.get_log(0x81, 512)
    if raw_binary:
        _write_data(data, True, "")
        return
    d = structures.parse_sanitize_log(data)
    if fmt == "json":
        _emit_json({_address(address): d})
        return
    click.echo(f"Sanitize Progress Log for device:{_address(address)}")
    _show_decoded(d)


@main.command("self-test-log")
@address_arg
@click.option("-e", "--dst-entries", type=click.IntRange(1, 20), default=20, show_default=True,
              help="how many of the 20 results to show, newest first")
@click.option("-b", "--raw-binary", is_flag=True, help="the page's 564 bytes, raw")
@output_opt
def self_test_log(address: str, dst_entries: int, raw_binary: bool, fmt: str) -> None:
    """The Device Self-test log page (06h), decoded; ``-o json`` has nvme-cli's field names.

    \b
    Example: nvmevfio self-test-log 00:04.0 -e 3 -o json
    """
    from nvmevfio.nvme import structures

    with controller(address) as s, errors():
        data = s.get_log(0x06, 564)
    if raw_binary:
        _write_data(data, True, "")
        return
    d = structures.parse_self_test_log(data, dst_entries)
    if fmt == "json":
        _emit_json(d)
        return
    click.echo(f"Device Self Test Log for NVME device:{_address(address)}")
    _show_decoded(d)
