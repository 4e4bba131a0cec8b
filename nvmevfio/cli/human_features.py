"""``get-feature -H``: a feature's value (Get Features DW0) and data buffer decoded in nvme-cli 2.3's words.

Pure functions: (value, data) in, nvme-cli's text out, byte for byte as nvme-print.c at v2.3 prints it
(``nvme_feature_show_fields`` and its helpers), its quirks kept: the missing newline after Predictable
Latency Mode Window's line, the trailing spaces of an APST entry's line, the SMART bits tested as a
byte, Namespace Write Protect's whole value as the state. The data lengths nvme-cli reads when no
``--data-len`` is given are libnvme 1.3's ``nvme_get_feature_length`` (FEATURE_DATA_LEN).
C's ``%#x`` prints 0 as ``0`` (``hex0``).
"""

from __future__ import annotations

import locale
import struct
import time
from typing import Callable

from nvmevfio.cli.human import hex0

# nvme-cli's nvme_feature_to_string, the name on get-feature's first line
FEATURE_NAMES = {
    0x01: "Arbitration", 0x02: "Power Management", 0x03: "LBA Range Type", 0x04: "Temperature Threshold",
    0x05: "Error Recovery", 0x06: "Volatile Write Cache", 0x07: "Number of Queues", 0x08: "Interrupt Coalescing",
    0x09: "Interrupt Vector Configuration", 0x0A: "Write Atomicity Normal", 0x0B: "Async Event Configuration",
    0x0C: "Autonomous Power State Transition", 0x0D: "Host Memory Buffer", 0x0E: "Timestamp",
    0x0F: "Keep Alive Timer", 0x10: "Host Controlled Thermal Management", 0x11: "Non-Operational Power State Config",
    0x12: "Read Recovery Level", 0x13: "Predictable Latency Mode Config", 0x14: "Predictable Latency Mode Window",
    0x15: "LBA Status Interval", 0x16: "Host Behavior", 0x17: "Sanitize", 0x18: "Endurance Event Group Configuration",
    0x19: "I/O Command Set Profile", 0x1A: "Spinup Control", 0x1D: "Flexible Direct Placement",
    0x1E: "Flexible Direct Placement Events", 0x7D: "Enhanced Controller Metadata", 0x7E: "Controller Metadata",
    0x7F: "Namespace Metadata", 0x80: "Software Progress", 0x81: "Host Identifier",
    0x82: "Reservation Notification Mask", 0x83: "Reservation Persistence", 0x84: "Namespace Write Protect",
}

# libnvme 1.3 nvme_get_feature_length: the bytes Get Features returns with the feature (sizeof the struct)
FEATURE_DATA_LEN = {0x03: 4096, 0x0C: 256, 0x0D: 4096, 0x0E: 8, 0x13: 512, 0x16: 512, 0x81: 8,
                    0x7D: 4096, 0x7E: 4096, 0x7F: 4096}
FDP_EVENTS_LEN = 0xFF * 2  # nvme-cli asks for 255 event descriptors (CDW11 bits 23:16 = FFh)


def feature_data_len(fid: int, cdw11: int) -> int:
    """The data nvme-cli 2.3 reads with Get Features ``fid`` when ``--data-len`` is 0 (get_feature_id)."""
    if fid == 0x81:
        return 16 if cdw11 & 1 else 8  # Extended Host Identifier (EXHID)
    if fid == 0x1E:
        return FDP_EVENTS_LEN
    return FEATURE_DATA_LEN.get(fid, 0)


def select_result(value: int) -> list[str]:
    """``-s 3`` (supported capabilities): nvme_show_select_result."""
    return [line for bit, line in ((1, "  Feature is saveable"), (2, "  Feature is per-namespace"),
                                   (4, "  Feature is changeable")) if value & bit]


def _tf(bit: int) -> str:
    return "True" if bit else "False"


def _en(bit: int) -> str:
    return "Enabled" if bit else "Disabled"


def _pad(data: bytes | None, n: int) -> bytes:
    """nvme-cli's buffer is at least the struct's size, zeroed before the command."""
    return (data or b"").ljust(n, b"\0")


# ------------------------------------------------------------------ 01h-0Ah
WORKLOAD_HINTS = {0: "No Workload", 1: "Extended Idle Period with a Burst of Random Writes",
                  2: "Heavy Sequential Writes"}
TMPSEL = {0: "Composite Temperature", **{i: f"Temperature Sensor {i}" for i in range(1, 9)}}
LBA_RANGE_TYPES = {0: "Reserved", 1: "Filesystem", 2: "RAID", 3: "Cache", 4: "Page / Swap file"}


def _arbitration(v: int, _d: bytes | None) -> list[str]:
    ab = v & 7
    return [f"\tHigh Priority Weight   (HPW): {(v >> 24) + 1}",
            f"\tMedium Priority Weight (MPW): {(v >> 16 & 0xFF) + 1}",
            f"\tLow Priority Weight    (LPW): {(v >> 8 & 0xFF) + 1}",
            f"\tArbitration Burst       (AB): {'No limit' if ab == 7 else 1 << ab}"]


def _power_management(v: int, _d: bytes | None) -> list[str]:
    wh = v >> 5 & 7
    return [f"\tWorkload Hint (WH): {wh} - {WORKLOAD_HINTS.get(wh, 'Reserved')}", f"\tPower State   (PS): {v & 0x1F}"]


def lba_range_entries(data: bytes, count: int) -> list[str]:
    """nvme_show_lba_range: ``count`` 64-byte entries (NUM + 1)."""
    out = []
    for i in range(count):
        e = data[i * 64:(i + 1) * 64]
        kind, attrs = e[0], e[1]
        slba, nlb = struct.unpack_from("<QQ", e, 16)
        name = LBA_RANGE_TYPES.get(kind, "Reserved" if kind <= 0x7F else "Vendor Specific")
        out += [f"\ttype       : {hex0(kind)} - {name}",
                f"\tattributes : {hex0(attrs)} - "
                f"{'LBA range may be overwritten' if attrs & 1 else 'LBA range should not be overwritten'}, "
                f"LBA range should be {'hidden' if attrs & 2 else 'visible'} from the OS/EFI/BIOS",
                f"\tslba       : {hex0(slba)}", f"\tnlb        : {hex0(nlb)}", f"\tguid       : {e[32:48].hex()}"]
    return out


def _lba_range(v: int, d: bytes | None) -> list[str]:
    num = v & 0x3F
    out = [f"\tNumber of LBA Ranges (NUM): {num + 1}"]
    return out + (lba_range_entries(_pad(d, 4096), num + 1) if d is not None else [])


def _temperature_threshold(v: int, _d: bytes | None) -> list[str]:
    thsel, tmpsel, k = v >> 20 & 3, v >> 16 & 0xF, v & 0xFFFF
    kind = {0: "Over Temperature Threshold", 1: "Under Temperature Threshold"}.get(thsel, "Reserved")
    return [f"\tThreshold Type Select         (THSEL): {thsel} - {kind}",
            f"\tThreshold Temperature Select (TMPSEL): {tmpsel} - {TMPSEL.get(tmpsel, 'Reserved')}",
            f"\tTemperature Threshold         (TMPTH): {k - 273}°C ({k} Kelvin)"]


def _error_recovery(v: int, _d: bytes | None) -> list[str]:
    return [f"\tDeallocated or Unwritten Logical Block Error Enable (DULBE): {_en(v >> 16 & 1)}",
            f"\tTime Limited Error Recovery                          (TLER): {(v & 0xFFFF) * 100} ms"]


def _irq_config(v: int, _d: bytes | None) -> list[str]:
    return [f"\tCoalescing Disable (CD): {_tf(v >> 16 & 1)}", f"\tInterrupt Vector   (IV): {v & 0xFFFF}"]


# ------------------------------------------------------------------ 0Bh-19h
AEN_BITS = ((31, "Discovery Log Page Change Notices"), (14, "Endurance Group Event Aggregate Log Change Notices"),
            (13, "LBA Status Information Notices"), (12, "Predictable Latency Event Aggregate Log Change Notices"),
            (11, "Asymmetric Namespace Access Change Notices"), (10, "Telemetry Log Notices"),
            (9, "Firmware Activation Notices"), (8, "Namespace Attribute Notices"))


def _send(bit: int) -> str:
    return "Send async event" if bit else "Do not send async event"


def _async_event(v: int, _d: bytes | None) -> list[str]:
    return [*(f"\t{name:<58}: {_send(v >> b & 1)}" for b, name in AEN_BITS),
            f"\t{'SMART / Health Critical Warnings':<58}: {_send(v & 0xFF)}"]


def apst_entries(data: bytes) -> list[str]:
    """nvme_show_auto_pst: the 32 entries of the APST data structure (5.27.1.12)."""
    out = ["\tAuto PST Entries\t................."]
    for i, entry in enumerate(struct.unpack_from("<32Q", _pad(data, 256))):
        out += [f"\tEntry[{i:2}]   ", "\t.................",
                f"\tIdle Time Prior to Transition (ITPT): {entry >> 8 & 0xFFFFFF} ms",
                f"\tIdle Transition Power State   (ITPS): {entry >> 3 & 0x1F}", "\t................."]
    return out


def _auto_pst(v: int, d: bytes | None) -> list[str]:
    return [f"\tAutonomous Power State Transition Enable (APSTE): {_en(v & 1)}",
            *(apst_entries(d) if d is not None else [])]


def _host_memory_buffer(v: int, d: bytes | None) -> list[str]:
    out = [f"\tEnable Host Memory (EHM): {_en(v & 1)}"]
    if d is not None:
        hsize, hmdlal, hmdlau, hmdlec = struct.unpack_from("<4I", _pad(d, 16))
        out += [f"\tHost Memory Descriptor List Entry Count (HMDLEC): {hmdlec}",
                f"\tHost Memory Descriptor List Address     (HMDLAU): 0x{hmdlau:x}",
                f"\tHost Memory Descriptor List Address     (HMDLAL): 0x{hmdlal:x}",
                f"\tHost Memory Buffer Size                  (HSIZE): {hsize}"]
    return out


def timestamp(data: bytes) -> list[str]:
    """nvme_show_timestamp: milliseconds since the epoch (48 bits), then the attributes' two lines.
    The date is local time in the process's locale (``%c %Z``), the number grouped as ``%'`` groups it."""
    d = _pad(data, 8)
    ms, attr = int.from_bytes(d[:6], "little"), d[6]
    when = time.strftime("%c %Z", time.localtime(ms // 1000))
    return [f"\tThe timestamp is : {locale.format_string('%d', ms, grouping=True)} ({when})",
            "\tThe Timestamp field was initialized with a Timestamp value using a Set Features command." if attr & 2
            else "\tThe Timestamp field was initialized to \u20180\u2019 by a Controller Level Reset.",  # curly quotes
            "\tThe controller may have stopped counting during vendor specific intervals after the Timestamp value "
            "was initialized" if attr & 1 else
            "\tThe controller counted time in milliseconds continuously since the Timestamp value was initialized."]


def _hctm(v: int, _d: bytes | None) -> list[str]:
    t1, t2 = v >> 16, v & 0xFFFF
    return [f"\tThermal Management Temperature 1 (TMT1) : {t1} Kelvin ({t1 - 273}°C)",
            f"\tThermal Management Temperature 2 (TMT2) : {t2} Kelvin ({t2 - 273}°C)"]


def plm_config(data: bytes) -> list[str]:
    """nvme_show_plm_config: the Predictable Latency Mode Configuration structure (5.27.1.18)."""
    d = _pad(data, 512)
    ee, (rt, wt, tt) = struct.unpack_from("<H", d)[0], struct.unpack_from("<3Q", d, 32)
    return [f"\tEnable Event          :{ee:04x}", f"\tDTWIN Reads Threshold :{rt}", f"\tDTWIN Writes Threshold:{wt}",
            f"\tDTWIN Time Threshold  :{tt}"]


def _plm_config(v: int, d: bytes | None) -> list[str]:
    return [f"\tPredictable Latency Window Enabled: {_tf(v & 1)}", *(plm_config(d) if d is not None else [])]


PLM_WINDOW = {1: "Deterministic Window (DTWIN)", 2: "Non-deterministic Window (NDWIN)"}


def _plm_window(v: int, _d: bytes | None) -> list[str]:
    return [f"\tWindow Select: {PLM_WINDOW.get(v & 7, 'Reserved')}"]  # nvme-cli prints no newline after it


def _lba_status_interval(v: int, _d: bytes | None) -> list[str]:
    return [f"\tLBA Status Information Poll Interval (LSIPI)  : {v >> 16 & 0xFFFF}",
            f"\tLBA Status Information Report Interval (LSIRI): {v & 0xFFFF}"]


def _host_behavior(_v: int, d: bytes | None) -> list[str]:
    return [] if d is None else [f"\tHost Behavior Support: {_tf(_pad(d, 1)[0] & 1)}"]


def _endurance_event(v: int, _d: bytes | None) -> list[str]:
    return [f"\tEndurance Group Identifier (ENDGID): {v & 0xFFFF}",
            f"\tEndurance Group Critical Warnings  : {v >> 16 & 0xFF}"]


FDP_EVENTS = {0x00: "Reclaim Unit Not Fully Written", 0x01: "Reclaim Unit Active Time Limit Exceeded",
              0x02: "Controller Level Reset Modified Reclaim Unit Handles", 0x03: "Invalid Placement Identifier",
              0x80: "Media Reallocated", 0x81: "Implicitly Modified Reclaim Unit Handle"}


def _fdp(v: int, _d: bytes | None) -> list[str]:
    return [f"\tFlexible Direct Placement Enable (FDPE)       : {'Yes' if v & 1 else 'No'}",
            f"\tFlexible Direct Placement Configuration Index : {v >> 8 & 0xF}"]


def _fdp_events(v: int, d: bytes | None) -> list[str]:
    if d is None:
        return []
    buf = _pad(d, 2 * v)  # DW0: the number of descriptors returned, two bytes each (evt, evta)
    return [f"\t{FDP_EVENTS.get(buf[2 * i], 'Unknown'):<53}: {'' if buf[2 * i + 1] & 1 else 'Not '}Enabled"
            for i in range(v)]


CTRL_METADATA_TYPES = {
    0x01: "Operating System Controller Name", 0x02: "Operating System Driver Name",
    0x03: "Operating System Driver Version", 0x04: "Pre-boot Controller Name", 0x05: "Pre-boot Driver Name",
    0x06: "Pre-boot Driver Version", 0x07: "System Processor Model", 0x08: "Chipset Driver Name",
    0x09: "Chipset Driver Version", 0x0A: "Operating System Name and Build", 0x0B: "System Product Name",
    0x0C: "Firmware Version", 0x0D: "Operating System Driver Filename", 0x0E: "Display Driver Name",
    0x0F: "Display Driver Version", 0x10: "Host-Determined Failure Record"}
NS_METADATA_TYPES = {0x01: "Operating System Namespace Name", 0x02: "Pre-boot Namespace Name",
                     0x03: "Operating System Namespace Name Qualifier 1",
                     0x04: "Operating System Namespace Name Qualifier 2"}


def host_metadata(fid: int, data: bytes) -> list[str]:
    """nvme_show_host_metadata (7Dh-7Fh, 5.27.1.25): each element descriptor (type, revision, length, value).
    nvme-cli copies each value with strncpy into one buffer it never clears, so a shorter value after a
    longer one shows the longer one's tail: kept (the buffer starts zeroed here)."""
    d = _pad(data, 4096)
    names, unknown = ((NS_METADATA_TYPES, "Unknown Namespace Type") if fid == 0x7F
                      else (CTRL_METADATA_TYPES, "Unknown Controller Type"))
    out, val, at = [f"\tNum Metadata Element Descriptors: {d[0]}"], bytearray(4096), 2
    for i in range(d[0]):
        head = _pad(d[at:at + 4], 4)
        kind, rev, n = head[0], head[1], int.from_bytes(head[2:4], "little")
        raw = d[at + 4:at + 4 + min(4095, n)].split(b"\0")[0]
        val[:min(4095, n)] = raw.ljust(min(4095, n), b"\0")  # strncpy: the bytes up to a NUL, then NULs
        text = bytes(val).split(b"\0")[0].decode("latin-1")
        out += [f"\tElement[{i:<3}]:", f"\t\tType\t    : 0x{kind:02x} ({names.get(kind, unknown)})",
                f"\t\tRevision : {rev}", f"\t\tLength   : {n}", f"\t\tValue    : {text}"]
        at += 4 + n
    return out


# ------------------------------------------------------------------ 80h-84h
def _host_identifier(_v: int, d: bytes | None) -> list[str]:
    # nvme-cli prints the first 8 bytes as one little-endian number, for the extended 128-bit one too
    return [] if d is None else [f"\tHost Identifier (HOSTID):  {int.from_bytes(_pad(d, 8)[:8], 'little')}"]


def _resv_mask(v: int, _d: bytes | None) -> list[str]:
    return [f"\tMask Reservation Preempted Notification  (RESPRE): {_tf(v >> 3 & 1)}",
            f"\tMask Reservation Released Notification   (RESREL): {_tf(v >> 2 & 1)}",
            f"\tMask Registration Preempted Notification (REGPRE): {_tf(v >> 1 & 1)}"]


NS_WRITE_PROTECT = ("No Write Protect", "Write Protect", "Write Protect Until Power Cycle", "Permanent Write Protect")


def _write_protect(v: int, _d: bytes | None) -> list[str]:
    return [f"\tNamespace Write Protect: {NS_WRITE_PROTECT[v] if v < 4 else 'Reserved'}"]  # the whole DW0, as nvme-cli


Decoder = Callable[[int, "bytes | None"], list[str]]
DECODERS: dict[int, Decoder] = {
    0x01: _arbitration, 0x02: _power_management, 0x03: _lba_range, 0x04: _temperature_threshold,
    0x05: _error_recovery,
    0x06: lambda v, _d: [f"\tVolatile Write Cache Enable (WCE): {_en(v & 1)}"],
    0x07: lambda v, _d: [f"\tNumber of IO Completion Queues Allocated (NCQA): {(v >> 16) + 1}",
                         f"\tNumber of IO Submission Queues Allocated (NSQA): {(v & 0xFFFF) + 1}"],
    0x08: lambda v, _d: [f"\tAggregation Time     (TIME): {(v >> 8 & 0xFF) * 100} usec",
                         f"\tAggregation Threshold (THR): {(v & 0xFF) + 1}"],
    0x09: _irq_config,
    0x0A: lambda v, _d: [f"\tDisable Normal (DN): {_tf(v & 1)}"],
    0x0B: _async_event, 0x0C: _auto_pst, 0x0D: _host_memory_buffer,
    0x0E: lambda _v, d: [] if d is None else timestamp(d),
    0x0F: lambda v, _d: [f"\tKeep Alive Timeout (KATO) in milliseconds: {v}"],
    0x10: _hctm,
    0x11: lambda v, _d: [f"\tNon-Operational Power State Permissive Mode Enable (NOPPME): {_tf(v & 1)}"],
    0x12: lambda v, _d: [f"\tRead Recovery Level (RRL): {v & 0xF}"],
    0x13: _plm_config, 0x14: _plm_window, 0x15: _lba_status_interval, 0x16: _host_behavior,
    0x17: lambda v, _d: [f"\tNo-Deallocate Response Mode (NODRM) : {v & 1}"],
    0x18: _endurance_event,
    0x19: lambda v, _d: [f"\tI/O Command Set Profile: {_tf(v & 1)}"],
    0x1A: lambda v, _d: [f"\tSpinup control feature Enabled: {_tf(v & 1)}"],
    0x1D: _fdp, 0x1E: _fdp_events,
    0x7D: lambda _v, d: [] if d is None else host_metadata(0x7D, d),
    0x7E: lambda _v, d: [] if d is None else host_metadata(0x7E, d),
    0x7F: lambda _v, d: [] if d is None else host_metadata(0x7F, d),
    0x80: lambda v, _d: [f"\tPre-boot Software Load Count (PBSLC): {v & 0xFF}"],
    0x81: _host_identifier, 0x82: _resv_mask,
    0x83: lambda v, _d: [f"\tPersist Through Power Loss (PTPL): {_tf(v & 1)}"],
    0x84: _write_protect,
}


def feature_fields(fid: int, value: int, data: bytes | None = None) -> list[str]:
    """The lines nvme-cli 2.3's ``get-feature -H`` prints under the value line (none for a feature it
    does not decode). ``data``: the buffer Get Features returned, None when none was read."""
    decode = DECODERS.get(fid)
    return decode(value, data) if decode else []


def feature_text(fid: int, value: int, data: bytes | None = None) -> str:
    """:func:`feature_fields` as printed: a newline after each line but Window Select's."""
    lines = feature_fields(fid, value, data)
    return "".join(line + ("" if fid == 0x14 else "\n") for line in lines)
