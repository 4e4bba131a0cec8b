"""NVMe data structures: the 64-byte SQE and 16-byte CQE as numpy dtypes, opcodes,
status codes with their specification names, and IDENTIFY / log page parsing.

Field names of parsed structures follow nvme-cli's JSON output (``nvme id-ctrl -o json``).
Section numbers refer to the NVMe Base Specification 2.0 and NVM Command Set 1.0.
"""

from __future__ import annotations

import enum
import operator
import struct
import uuid
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from nvmevfio.errors import CommandError, Refused

# 4.2 Submission Queue Entry (64 bytes)
SQE = np.dtype([
    ("opc", "<u1"), ("flags", "<u1"), ("cid", "<u2"), ("nsid", "<u4"),
    ("cdw2", "<u4"), ("cdw3", "<u4"), ("mptr", "<u8"), ("prp1", "<u8"), ("prp2", "<u8"),
    ("cdw10", "<u4"), ("cdw11", "<u4"), ("cdw12", "<u4"), ("cdw13", "<u4"), ("cdw14", "<u4"), ("cdw15", "<u4"),
])
# 4.2.2 Completion Queue Entry (16 bytes)
CQE = np.dtype([("dw0", "<u4"), ("dw1", "<u4"), ("sqhd", "<u2"), ("sqid", "<u2"), ("cid", "<u2"),
                ("status", "<u2")])
# The same layouts as struct formats, for packing single entries without numpy's per-call cost.
SQE_STRUCT = struct.Struct("<BBHIIIQQQIIIIII")
CQE_STRUCT = struct.Struct("<IIHHHH")
if SQE.itemsize != 64 or CQE.itemsize != 16:  # pragma: no cover - a dtype typo
    raise ImportError(f"SQE is {SQE.itemsize} bytes and CQE {CQE.itemsize}: expected 64 and 16")
if SQE_STRUCT.size != 64 or CQE_STRUCT.size != 16 or \
        len(SQE.fields or ()) != len(SQE_STRUCT.format) - 1 or len(CQE.fields or ()) != len(CQE_STRUCT.format) - 1:
    raise ImportError("SQE/CQE struct formats do not match their dtypes")  # pragma: no cover
SQES_LOG2 = 6
CQES_LOG2 = 4


class AdminOpcode(enum.IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NAMESPACE_MANAGEMENT = 0x0D
    FIRMWARE_COMMIT = 0x10
    FIRMWARE_IMAGE_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NAMESPACE_ATTACHMENT = 0x15
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80
    SANITIZE = 0x84


class IoOpcode(enum.IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C


# Command names for passthrough output (NVMe base / NVM command set opcode tables, as nvme-cli).
ADMIN_COMMAND_NAMES = {
    0x00: "Delete I/O Submission Queue", 0x01: "Create I/O Submission Queue", 0x02: "Get Log Page",
    0x04: "Delete I/O Completion Queue", 0x05: "Create I/O Completion Queue", 0x06: "Identify", 0x08: "Abort",
    0x09: "Set Features", 0x0A: "Get Features", 0x0C: "Asynchronous Event Request", 0x0D: "Namespace Management",
    0x10: "Firmware Commit", 0x11: "Firmware Image Download", 0x14: "Device Self-test",
    0x15: "Namespace Attachment", 0x18: "Keep Alive", 0x19: "Directive Send", 0x1A: "Directive Receive",
    0x1C: "Virtualization Management", 0x1D: "NVMe-MI Send", 0x1E: "NVMe-MI Receive", 0x7C: "Doorbell Buffer Config",
    0x80: "Format NVM", 0x81: "Security Send", 0x82: "Security Receive", 0x84: "Sanitize", 0x86: "Get LBA Status",
}
IO_COMMAND_NAMES = {
    0x00: "Flush", 0x01: "Write", 0x02: "Read", 0x04: "Write Uncorrectable", 0x05: "Compare", 0x08: "Write Zeroes",
    0x09: "Dataset Management", 0x0C: "Verify", 0x0D: "Reservation Register", 0x0E: "Reservation Report",
    0x11: "Reservation Acquire", 0x15: "Reservation Release", 0x19: "Copy",
}


def command_name(admin: bool, opcode: int) -> str:
    """The command's name, "Vendor Specific" for C0h-FFh, else "Unknown"."""
    name = (ADMIN_COMMAND_NAMES if admin else IO_COMMAND_NAMES).get(opcode)
    return name or ("Vendor Specific" if opcode >= 0xC0 else "Unknown")


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACE_LIST = 0x02


class LogPage(enum.IntEnum):
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03


class Feature(enum.IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIGURATION = 0x09
    WRITE_ATOMICITY_NORMAL = 0x0A
    ASYNC_EVENT_CONFIGURATION = 0x0B
    AUTONOMOUS_POWER_STATE_TRANSITION = 0x0C
    HOST_MEMORY_BUFFER = 0x0D
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F


FEATURE_NAMES = {f.value: f.name.replace("_", " ").title() for f in Feature}
FEATURE_NAMES[0x07] = "Number of Queues"

# 4.2.3 Status Field: SCT and SC names
SCT_NAMES = {0: "Generic Command Status", 1: "Command Specific Status", 2: "Media and Data Integrity Errors",
             3: "Path Related Status", 7: "Vendor Specific"}
_GENERIC = {
    0x00: "Successful Completion", 0x01: "Invalid Command Opcode", 0x02: "Invalid Field in Command",
    0x03: "Command ID Conflict", 0x04: "Data Transfer Error",
    0x05: "Commands Aborted due to Power Loss Notification", 0x06: "Internal Error",
    0x07: "Command Abort Requested", 0x08: "Command Aborted due to SQ Deletion",
    0x09: "Command Aborted due to Failed Fused Command", 0x0A: "Command Aborted due to Missing Fused Command",
    0x0B: "Invalid Namespace or Format", 0x0C: "Command Sequence Error", 0x0D: "Invalid SGL Segment Descriptor",
    0x0E: "Invalid Number of SGL Descriptors", 0x0F: "Data SGL Length Invalid",
    0x10: "Metadata SGL Length Invalid", 0x11: "SGL Descriptor Type Invalid",
    0x12: "Invalid Use of Controller Memory Buffer", 0x13: "PRP Offset Invalid",
    0x14: "Atomic Write Unit Exceeded", 0x15: "Operation Denied", 0x16: "SGL Offset Invalid",
    0x18: "Host Identifier Inconsistent Format", 0x19: "Keep Alive Timer Expired",
    0x1A: "Keep Alive Timeout Invalid", 0x1B: "Command Aborted due to Preempt and Abort",
    0x1C: "Sanitize Failed", 0x1D: "Sanitize In Progress", 0x1E: "SGL Data Block Granularity Invalid",
    0x1F: "Command Not Supported for Queue in CMB", 0x20: "Namespace is Write Protected",
    0x21: "Command Interrupted", 0x22: "Transient Transport Error",
    0x80: "LBA Out of Range", 0x81: "Capacity Exceeded", 0x82: "Namespace Not Ready",
    0x83: "Reservation Conflict", 0x84: "Format In Progress",
}
_COMMAND_SPECIFIC = {
    0x00: "Completion Queue Invalid", 0x01: "Invalid Queue Identifier", 0x02: "Invalid Queue Size",
    0x03: "Abort Command Limit Exceeded", 0x05: "Asynchronous Event Request Limit Exceeded",
    0x06: "Invalid Firmware Slot", 0x07: "Invalid Firmware Image", 0x08: "Invalid Interrupt Vector",
    0x09: "Invalid Log Page", 0x0A: "Invalid Format", 0x0B: "Firmware Activation Requires Conventional Reset",
    0x0C: "Invalid Queue Deletion", 0x0D: "Feature Identifier Not Saveable", 0x0E: "Feature Not Changeable",
    0x0F: "Feature Not Namespace Specific", 0x10: "Firmware Activation Requires NVM Subsystem Reset",
    0x11: "Firmware Activation Requires Controller Level Reset",
    0x12: "Firmware Activation Requires Maximum Time Violation", 0x13: "Firmware Activation Prohibited",
    0x14: "Overlapping Range", 0x15: "Namespace Insufficient Capacity",
    0x16: "Namespace Identifier Unavailable", 0x18: "Namespace Already Attached",
    0x19: "Namespace Is Private", 0x1A: "Namespace Not Attached", 0x1B: "Thin Provisioning Not Supported",
    0x1C: "Controller List Invalid", 0x1D: "Device Self-test In Progress",
    0x1E: "Boot Partition Write Prohibited", 0x1F: "Invalid Controller Identifier",
    0x20: "Invalid Secondary Controller State", 0x21: "Invalid Number of Controller Resources",
    0x22: "Invalid Resource Identifier", 0x23: "Sanitize Prohibited While Persistent Memory Region is Enabled",
    0x24: "ANA Group Identifier Invalid", 0x25: "ANA Attach Failed",
    0x80: "Conflicting Attributes", 0x81: "Invalid Protection Information",
    0x82: "Attempted Write to Read Only Range",
}
_MEDIA = {
    0x80: "Write Fault", 0x81: "Unrecovered Read Error", 0x82: "End-to-end Guard Check Error",
    0x83: "End-to-end Application Tag Check Error", 0x84: "End-to-end Reference Tag Check Error",
    0x85: "Compare Failure", 0x86: "Access Denied", 0x87: "Deallocated or Unwritten Logical Block",
}
_PATH = {
    0x00: "Internal Path Error", 0x01: "Asymmetric Access Persistent Loss",
    0x02: "Asymmetric Access Inaccessible", 0x03: "Asymmetric Access Transition",
    0x60: "Controller Pathing Error", 0x70: "Host Pathing Error", 0x71: "Command Aborted By Host",
}
_BY_SCT = {0: _GENERIC, 1: _COMMAND_SPECIFIC, 2: _MEDIA, 3: _PATH}


def status_name(sct: int, sc: int) -> str:
    if sct == 7:
        return f"Vendor Specific status {sc:#04x}"
    return _BY_SCT.get(sct, {}).get(sc, f"Unknown status (SCT {sct:#x}, SC {sc:#04x})")


def sct_name(sct: int) -> str:
    return SCT_NAMES.get(sct, f"Reserved SCT {sct:#x}")


def split_status(status: int) -> tuple[int, int, int, int, int, int]:
    """CQE DW3[31:16] -> (phase, sc, sct, crd, more, dnr)."""
    return (status & 1, (status >> 1) & 0xFF, (status >> 9) & 0x7, (status >> 12) & 0x3,
            (status >> 14) & 1, (status >> 15) & 1)


# ----------------------------------------------------------------- structure parsing
def _le(buf: bytes, lo: int, hi: int) -> int:
    return int.from_bytes(buf[lo:hi], "little")


def _ascii(buf: bytes, lo: int, hi: int) -> str:
    return buf[lo:hi].decode("ascii", "replace")


def _parse(buf: bytes, table: list[tuple[str, int, int, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, lo, hi, kind in table:
        if kind == "s":
            out[name] = _ascii(buf, lo, hi)
        elif kind == "hex":
            out[name] = buf[lo:hi].hex()
        elif kind == "hexrev":
            out[name] = buf[lo:hi][::-1].hex()
        elif kind == "uuid":
            out[name] = str(uuid.UUID(bytes=bytes(buf[lo:hi])))
        else:
            out[name] = _le(buf, lo, hi)
    return out


# Identify Controller data structure (Figure 275), in nvme-cli's field order and names.
ID_CTRL = [
    ("vid", 0, 2, "u"), ("ssvid", 2, 4, "u"), ("sn", 4, 24, "s"), ("mn", 24, 64, "s"), ("fr", 64, 72, "s"),
    ("rab", 72, 73, "u"), ("ieee", 73, 76, "u"), ("cmic", 76, 77, "u"), ("mdts", 77, 78, "u"),
    ("cntlid", 78, 80, "u"), ("ver", 80, 84, "u"), ("rtd3r", 84, 88, "u"), ("rtd3e", 88, 92, "u"),
    ("oaes", 92, 96, "u"), ("ctratt", 96, 100, "u"), ("rrls", 100, 102, "u"), ("cntrltype", 111, 112, "u"),
    ("fguid", 112, 128, "uuid"), ("crdt1", 128, 130, "u"), ("crdt2", 130, 132, "u"), ("crdt3", 132, 134, "u"),
    ("nvmsr", 253, 254, "u"), ("vwci", 254, 255, "u"), ("mec", 255, 256, "u"),
    ("oacs", 256, 258, "u"), ("acl", 258, 259, "u"), ("aerl", 259, 260, "u"), ("frmw", 260, 261, "u"),
    ("lpa", 261, 262, "u"), ("elpe", 262, 263, "u"), ("npss", 263, 264, "u"), ("avscc", 264, 265, "u"),
    ("apsta", 265, 266, "u"), ("wctemp", 266, 268, "u"), ("cctemp", 268, 270, "u"), ("mtfa", 270, 272, "u"),
    ("hmpre", 272, 276, "u"), ("hmmin", 276, 280, "u"), ("tnvmcap", 280, 296, "u"), ("unvmcap", 296, 312, "u"),
    ("rpmbs", 312, 316, "u"), ("edstt", 316, 318, "u"), ("dsto", 318, 319, "u"), ("fwug", 319, 320, "u"),
    ("kas", 320, 322, "u"), ("hctma", 322, 324, "u"), ("mntmt", 324, 326, "u"), ("mxtmt", 326, 328, "u"),
    ("sanicap", 328, 332, "u"), ("hmminds", 332, 336, "u"), ("hmmaxd", 336, 338, "u"),
    ("nsetidmax", 338, 340, "u"), ("endgidmax", 340, 342, "u"), ("anatt", 342, 343, "u"),
    ("anacap", 343, 344, "u"), ("anagrpmax", 344, 348, "u"), ("nanagrpid", 348, 352, "u"),
    ("pels", 352, 356, "u"), ("domainid", 356, 358, "u"), ("megcap", 368, 384, "u"),
    ("sqes", 512, 513, "u"), ("cqes", 513, 514, "u"), ("maxcmd", 514, 516, "u"), ("nn", 516, 520, "u"),
    ("oncs", 520, 522, "u"), ("fuses", 522, 524, "u"), ("fna", 524, 525, "u"), ("vwc", 525, 526, "u"),
    ("awun", 526, 528, "u"), ("awupf", 528, 530, "u"), ("icsvscc", 530, 531, "u"), ("nwpc", 531, 532, "u"),
    ("acwu", 532, 534, "u"), ("ocfs", 534, 536, "u"), ("sgls", 536, 540, "u"), ("mnan", 540, 544, "u"),
    ("maxdna", 544, 560, "u"), ("maxcna", 560, 564, "u"), ("subnqn", 768, 1024, "s"),
    ("ioccsz", 1792, 1796, "u"), ("iorcsz", 1796, 1800, "u"), ("icdoff", 1800, 1802, "u"),
    ("fcatt", 1802, 1803, "u"), ("msdbd", 1803, 1804, "u"), ("ofcs", 1804, 1806, "u"),
]
# Power State Descriptor (Figure 276), 32 bytes each from offset 2048.
PSD = [
    ("max_power", 0, 2, "u"), ("flags", 3, 4, "u"), ("entry_lat", 4, 8, "u"), ("exit_lat", 8, 12, "u"),
    ("read_tput", 12, 13, "u"), ("read_lat", 13, 14, "u"), ("write_tput", 14, 15, "u"),
    ("write_lat", 15, 16, "u"), ("idle_power", 16, 18, "u"), ("idle_scale", 18, 19, "u"),
    ("active_power", 20, 22, "u"), ("active_power_work", 22, 23, "u"), ("active_scale", 22, 23, "u"),
]


def parse_identify_controller(buf: bytes) -> dict[str, Any]:
    if len(buf) < 4096:
        raise ValueError(f"Identify Controller data is 4096 bytes, got {len(buf)}")
    out = _parse(buf, ID_CTRL)
    out["subnqn"] = out["subnqn"].rstrip("\x00")
    psds = []
    for i in range(out["npss"] + 1):
        ps = _parse(buf[2048 + 32 * i : 2048 + 32 * (i + 1)], PSD)
        ps["idle_scale"] = (ps["idle_scale"] >> 6) & 3
        ps["active_scale"] = (ps["active_scale"] >> 6) & 3
        ps["active_power_work"] &= 7
        ps["read_tput"] &= 0x1F
        ps["read_lat"] &= 0x1F
        ps["write_tput"] &= 0x1F
        ps["write_lat"] &= 0x1F
        psds.append(ps)
    out["psds"] = psds
    return out


# Identify Namespace data structure, NVM command set (NVM Command Set spec, Figure 97).
ID_NS = [
    ("nsze", 0, 8, "u"), ("ncap", 8, 16, "u"), ("nuse", 16, 24, "u"), ("nsfeat", 24, 25, "u"),
    ("nlbaf", 25, 26, "u"), ("flbas", 26, 27, "u"), ("mc", 27, 28, "u"), ("dpc", 28, 29, "u"),
    ("dps", 29, 30, "u"), ("nmic", 30, 31, "u"), ("rescap", 31, 32, "u"), ("fpi", 32, 33, "u"),
    ("dlfeat", 33, 34, "u"), ("nawun", 34, 36, "u"), ("nawupf", 36, 38, "u"), ("nacwu", 38, 40, "u"),
    ("nabsn", 40, 42, "u"), ("nabo", 42, 44, "u"), ("nabspf", 44, 46, "u"), ("noiob", 46, 48, "u"),
    ("nvmcap", 48, 64, "u"), ("nsattr", 99, 100, "u"), ("nvmsetid", 100, 102, "u"),
    ("npwg", 64, 66, "u"), ("npwa", 66, 68, "u"), ("npdg", 68, 70, "u"), ("npda", 70, 72, "u"),
    ("nows", 72, 74, "u"), ("mssrl", 74, 76, "u"), ("mcl", 76, 80, "u"), ("msrc", 80, 81, "u"),
    ("nulbaf", 81, 82, "u"), ("anagrpid", 92, 96, "u"), ("endgid", 102, 104, "u"),
    ("eui64", 120, 128, "hex"), ("nguid", 104, 120, "hex"),
]


def parse_identify_namespace(buf: bytes) -> dict[str, Any]:
    if len(buf) < 4096:
        raise ValueError(f"Identify Namespace data is 4096 bytes, got {len(buf)}")
    out = _parse(buf, ID_NS)
    lbafs = []
    for i in range(out["nlbaf"] + 1):
        d = _le(buf, 128 + 4 * i, 132 + 4 * i)
        lbafs.append({"ms": d & 0xFFFF, "ds": (d >> 16) & 0xFF, "rp": (d >> 24) & 0x3})
    out["lbafs"] = lbafs
    return out


def flbas_index(flbas: int, nlbaf: int) -> int:
    """The LBA format in use: FLBAS bits 3:0, plus bits 6:5 as high bits when NLBAF > 16."""
    low = flbas & 0xF
    return low | (((flbas >> 5) & 0x3) << 4) if nlbaf >= 16 else low


def parse_active_namespaces(buf: bytes) -> list[int]:
    ids = np.frombuffer(bytes(buf[:4096]), dtype="<u4")
    nz = ids[ids != 0]
    return [int(x) for x in nz]


# SMART / Health Information log (Figure 207); 128-bit counters become ints.
SMART = [
    ("critical_warning", 0, 1, "u"), ("temperature", 1, 3, "u"), ("avail_spare", 3, 4, "u"),
    ("spare_thresh", 4, 5, "u"), ("percent_used", 5, 6, "u"),
    ("endurance_grp_critical_warning_summary", 6, 7, "u"),
    ("data_units_read", 32, 48, "u"), ("data_units_written", 48, 64, "u"),
    ("host_read_commands", 64, 80, "u"), ("host_write_commands", 80, 96, "u"),
    ("controller_busy_time", 96, 112, "u"), ("power_cycles", 112, 128, "u"),
    ("power_on_hours", 128, 144, "u"), ("unsafe_shutdowns", 144, 160, "u"),
    ("media_errors", 160, 176, "u"), ("num_err_log_entries", 176, 192, "u"),
    ("warning_temp_time", 192, 196, "u"), ("critical_comp_time", 196, 200, "u"),
] + [(f"temperature_sensor_{i + 1}", 200 + 2 * i, 202 + 2 * i, "u") for i in range(8)] + [
    ("thm_temp1_trans_count", 216, 220, "u"), ("thm_temp2_trans_count", 220, 224, "u"),
    ("thm_temp1_total_time", 224, 228, "u"), ("thm_temp2_total_time", 228, 232, "u"),
]


def parse_smart_log(buf: bytes) -> dict[str, Any]:
    return _parse(buf, SMART)


ERROR_ENTRY = [
    ("error_count", 0, 8, "u"), ("sqid", 8, 10, "u"), ("cmdid", 10, 12, "u"), ("status_field", 12, 14, "u"),
    ("parm_error_location", 14, 16, "u"), ("lba", 16, 24, "u"), ("nsid", 24, 28, "u"), ("vs", 28, 29, "u"),
    ("trtype", 29, 30, "u"), ("cs", 32, 40, "u"), ("trtype_spec_info", 40, 42, "u"),
]


def parse_error_log(buf: bytes) -> list[dict[str, Any]]:
    entries = []
    for i in range(len(buf) // 64):
        e = _parse(buf[64 * i : 64 * (i + 1)], ERROR_ENTRY)
        e["phase_tag"] = e["status_field"] & 1
        e["status_field"] >>= 1
        entries.append(e)
    return entries


def parse_firmware_log(buf: bytes) -> dict[str, Any]:
    out: dict[str, Any] = {"afi": buf[0]}
    for i in range(7):
        raw = bytes(buf[8 + 8 * i : 16 + 8 * i])
        out[f"frs{i + 1}"] = raw.decode("ascii", "replace") if any(raw) else ""
    return out


# Sanitize Status log page (81h, Figure 291): SSTAT bits 2:0 status of the most recent
# sanitize, 7:3 overwrite passes completed, bit 8 Global Data Erased. nvme-cli's JSON names.
SANITIZE_LOG = [
    ("sprog", 0, 2, "u"), ("sstat", 2, 4, "u"), ("cdw10_info", 4, 8, "u"), ("time_over_write", 8, 12, "u"),
    ("time_block_erase", 12, 16, "u"), ("time_crypto_erase", 16, 20, "u"),
    ("time_over_write_no_dealloc", 20, 24, "u"), ("time_block_erase_no_dealloc", 24, 28, "u"),
    ("time_crypto_erase_no_dealloc", 28, 32, "u"),
]
SANITIZE_STATUS = {0: "NVM Subsystem has never been sanitized.",
                   1: "Most Recent Sanitize Command Completed Successfully.",
                   2: "Sanitize in Progress.",
                   3: "Most Recent Sanitize Command Failed.",
                   4: "Most Recent Sanitize Command (No-Deallocate After Sanitize) Completed Successfully."}


def parse_sanitize_log(buf: bytes) -> dict[str, Any]:
    """The Sanitize Status log as nvme-cli's ``sanitize-log -o json`` shows one device."""
    raw = _parse(buf, SANITIZE_LOG)
    sstat = raw.pop("sstat")
    status = sstat & 0x7
    return {"sprog": raw.pop("sprog"),
            "sstat": {"global_erased": (sstat >> 8) & 1, "no_cmplted_passes": (sstat >> 3) & 0x1F,
                      "status": f"({status}) {SANITIZE_STATUS.get(status, 'Unknown')}"},
            **raw}


# Device Self-test log page (06h, Figure 284): byte 0 the current operation, byte 1 its
# completion (%), then 20 results of 28 bytes, newest first. nvme-cli's JSON names.
SELF_TEST_RESULTS = 20
SELF_TEST_RESULT = [
    ("dsts", 0, 1, "u"), ("Segment number", 1, 2, "u"), ("Valid Diagnostic Information", 2, 3, "u"),
    ("Power on hours", 4, 12, "u"), ("Namespace Identifier", 12, 16, "u"), ("Failing LBA", 16, 24, "u"),
    ("Status Code Type", 24, 25, "u"), ("Status Code", 25, 26, "u"), ("Vendor Specific", 26, 28, "u"),
]
# the optional fields, each with the Valid Diagnostic Information bit that says it holds a value
SELF_TEST_OPTIONAL = (("Namespace Identifier", 1), ("Failing LBA", 2), ("Status Code Type", 4), ("Status Code", 8))


def parse_self_test_log(buf: bytes, entries: int = SELF_TEST_RESULTS) -> dict[str, Any]:
    """The Device Self-test log as nvme-cli's ``self-test-log -o json`` shows it: a result of
    0xF (entry not used) carries nothing else, optional fields only where VDI says so."""
    reports = []
    for i in range(min(entries, SELF_TEST_RESULTS)):
        r = _parse(buf[4 + 28 * i : 32 + 28 * i], SELF_TEST_RESULT)
        r["Status Code Type"] &= 0x7
        report: dict[str, Any] = {"Self test result": r["dsts"] & 0xF}
        if r["dsts"] & 0xF != 0xF:
            vdi = r["Valid Diagnostic Information"]
            report["Self test code"] = r["dsts"] >> 4
            for name in ("Segment number", "Valid Diagnostic Information", "Power on hours"):
                report[name] = r[name]
            report.update((name, r[name]) for name, bit in SELF_TEST_OPTIONAL if vdi & bit)
            report["Vendor Specific"] = r["Vendor Specific"]
        reports.append(report)
    return {"Current Device Self-Test Operation": buf[0] & 0xF, "Current Device Self-Test Completion": buf[1] & 0x7F,
            "List of Valid Reports": reports}


# ---------------------------------------------------------------- Asynchronous Events (5.2)
# Completion DW0 of an Asynchronous Event Request (Figure 149): bits 2:0 Asynchronous Event
# Type, 15:8 Asynchronous Event Information, 23:16 Log Page Identifier.
AER_TYPE_NAMES = {0: "Error status", 1: "SMART / Health status", 2: "Notice", 6: "I/O Command specific status",
                  7: "Vendor specific"}
AER_INFO_NAMES = {
    0: {0: "Write to Invalid Doorbell Register", 1: "Invalid Doorbell Write Value", 2: "Diagnostic Failure",
        3: "Persistent Internal Error", 4: "Transient Internal Error", 5: "Firmware Image Load Error"},
    1: {0: "NVM subsystem Reliability", 1: "Temperature Threshold", 2: "Spare Below Threshold"},
    2: {0: "Namespace Attribute Changed", 1: "Firmware Activation Starting", 2: "Telemetry Log Changed",
        3: "Asymmetric Namespace Access Change", 4: "Predictable Latency Event Aggregate Log Change",
        5: "LBA Status Information Alert", 6: "Endurance Group Event Aggregate Log Page Change",
        7: "Normal NVM Subsystem Shutdown", 0xF0: "Discovery Log Page Change"},
    6: {0: "Reservation Log Page Available", 1: "Sanitize Operation Completed",
        2: "Sanitize Operation Completed With Unexpected Deallocation"},
}
AER_TYPE_NOTICE, AER_INFO_NS_ATTR_CHANGED = 2, 0
LOG_PAGE_NAMES = {0x01: "Error Information", 0x02: "SMART / Health Information", 0x03: "Firmware Slot Information",
                  0x04: "Changed Namespace List", 0x05: "Commands Supported and Effects", 0x06: "Device Self-test",
                  0x07: "Telemetry Host-Initiated", 0x08: "Telemetry Controller-Initiated",
                  0x0C: "Asymmetric Namespace Access", 0x0D: "Persistent Event Log",
                  0x80: "Reservation Notification", 0x81: "Sanitize Status"}
# bytes to read of the log page an event names (the error log: 64 bytes an entry, ELPE+1 entries)
AER_LOG_BYTES = {0x02: 512, 0x03: 512, 0x04: 4096, 0x80: 64, 0x81: 512}
# Asynchronous Event Configuration (Set Features 0Bh, Figure 316): SMART/health critical
# warnings in bits 7:0 (the five the spec defines), notices in bits 31:8 as OAES offers them.
AEC_SMART_WARNINGS = 0x1F
AEC_NOTICES_FROM_OAES = 0x7F00  # namespace attribute, firmware activation, telemetry, ANA, PLEA, LBA status, EGEA


def split_async_event(dw0: int) -> tuple[int, int, int]:
    """(type, information, log page identifier) of an Asynchronous Event Request's DW0."""
    return dw0 & 0x7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF


def async_event_names(dw0: int) -> tuple[str, str, str]:
    """Names of an event's type, information and log page, as the specification gives them."""
    t, info, lid = split_async_event(dw0)
    return (AER_TYPE_NAMES.get(t, f"Reserved ({t})"),
            AER_INFO_NAMES.get(t, {}).get(info, f"Vendor specific ({info:#04x})" if t == 7 or info >= 0xF0
                                          else f"Reserved ({info:#04x})"),
            LOG_PAGE_NAMES.get(lid, f"Vendor specific ({lid:#04x})" if lid >= 0xC0 else f"Log page {lid:#04x}"))


def async_event_log_bytes(lid: int, elpe: int) -> int:
    """How much of the log page an event names the host reads (which clears the event, RAE=0)."""
    if lid == 0x01:
        return 64 * (min(elpe, 63) + 1)
    return AER_LOG_BYTES.get(lid, 512)


def command_error(status: int, name: str, **context: Any) -> CommandError:
    """The CommandError for a completion's status field (without the phase tag), named."""
    _, sc, sct, _, more, dnr = split_status(int(status) << 1)
    return CommandError(name, sct, sc, bool(dnr), sct_name=sct_name(sct), sc_name=status_name(sct, sc),
                        more=bool(more), **context)


# ================================================================== command builders
# One pure function per command the broker sends: typed fields in, the command's opcode, NSID
# and CDW10..15 out. CDW0's command id, FUSE and PSDT, the metadata pointer and the data
# pointer (PRP1/PRP2, queue bases) are the broker's to author, never a builder's. A value that
# does not fit its field is refused (FieldOutOfRange), never truncated. Sections: NVMe Base
# Specification 2.0 (admin commands in 5, Flush in 7.1) and NVM Command Set 1.0 (3.2).
class FieldOutOfRange(Refused, ValueError):
    """A command field's value does not fit the field; ``field`` names it (reason ``invalid-argument``)."""

    def __init__(self, command: str, field: str, value: Any, allowed: str) -> None:
        super().__init__("invalid-argument", f"{command}: {field}={value!r:.40} does not fit ({allowed})",
                         command=command, field=field, value=value, allowed=allowed)
        self.field = field


@dataclass(frozen=True)
class Command:
    """A built command: the opcode, NSID and command dwords 10..15."""

    opc: int
    nsid: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    @property
    def cdws(self) -> dict[str, int]:
        """CDW10..15 by name, as the SQE dtype's fields and :meth:`Broker.passthru` take them."""
        return {"cdw10": self.cdw10, "cdw11": self.cdw11, "cdw12": self.cdw12, "cdw13": self.cdw13,
                "cdw14": self.cdw14, "cdw15": self.cdw15}


def _int(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (an int or numpy integer, not a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _fit(command: str, field: str, value: Any, bits: int, lo: int = 0) -> int:
    """``value`` in lo..2^bits-1 (a field of ``bits`` bits), else FieldOutOfRange naming the field.
    Bools are refused: a flag is a bool parameter of its own."""
    v = _int(value)
    if v is None or not lo <= v < 1 << bits:
        raise FieldOutOfRange(command, field, value, f"a whole number in {lo}..{(1 << bits) - 1}")
    return v


def _zeros_based(command: str, field: str, count: Any, bits: int, lo: int = 1, hi: int | None = None) -> int:
    """A count as the spec's 0's based field of ``bits`` bits: count - 1, the count in lo..hi
    (hi 2^bits unless the spec reserves the all-ones value)."""
    hi = 1 << bits if hi is None else hi
    v = _int(count)
    if v is None or not lo <= v <= hi:
        raise FieldOutOfRange(command, field, count, f"a count in {lo}..{hi}")
    return v - 1


def _dwords(command: str, field: str, nbytes: Any, lo: int, hi: int) -> int:
    """A byte length or offset as whole dwords, lo..hi of them."""
    v = _int(nbytes)
    if v is None or v % 4 or not lo <= v // 4 <= hi:
        raise FieldOutOfRange(command, field, nbytes, f"whole dwords, {4 * lo}..{4 * hi} bytes")
    return v // 4


def _flag(value: Any) -> int:
    """A one-bit flag: 1 when ``value`` is true (never a wider value shifted into the next field)."""
    return 1 if value else 0


_Q = TypeVar("_Q", int, np.ndarray)


def split_qword(value: _Q) -> tuple[_Q, _Q]:
    """A 64-bit value (or an array of them) as its low and high dwords."""
    return value & 0xFFFFFFFF, value >> 32


def _nsid(command: str, nsid: Any) -> int:
    return _fit(command, "NSID", nsid, 32)


# ---------------------------------------------------------------- admin commands (NVMe Base 2.0, 5)
def abort(sqid: int, cid: int) -> Command:
    """Abort (5.1): CDW10 SQID 15:0, CID 31:16."""
    return Command(AdminOpcode.ABORT, cdw10=_fit("Abort", "SQID", sqid, 16) | (_fit("Abort", "CID", cid, 16) << 16))


def async_event_request() -> Command:
    """Asynchronous Event Request (5.2): no command dwords."""
    return Command(AdminOpcode.ASYNC_EVENT_REQUEST)


def _queue_dw10(command: str, qid: int, size: int) -> int:
    """CDW10 of Create I/O CQ/SQ: QID 15:0 (not 0: the admin queue's), QSIZE 31:16, 0's based
    (2..65536 entries)."""
    return _fit(command, "QID", qid, 16, lo=1) | (_zeros_based(command, "QSIZE", size, 16, lo=2) << 16)


def create_io_cq(qid: int, size: int, *, contiguous: bool = True, interrupts: bool = False,
                 vector: int = 0) -> Command:
    """Create I/O Completion Queue (5.4, Figures 155-156): CDW10 QID, QSIZE; CDW11 PC bit 0,
    IEN bit 1, IV 31:16. The queue's base (PRP1) is the broker's."""
    name = "Create I/O CQ"
    return Command(AdminOpcode.CREATE_IO_CQ, cdw10=_queue_dw10(name, qid, size),
                   cdw11=_flag(contiguous) | (_flag(interrupts) << 1) | (_fit(name, "IV", vector, 16) << 16))


def create_io_sq(qid: int, size: int, cqid: int, *, contiguous: bool = True, qprio: int = 0) -> Command:
    """Create I/O Submission Queue (5.5, Figures 159-160): CDW10 QID, QSIZE; CDW11 PC bit 0,
    QPRIO 2:1, CQID 31:16. The queue's base (PRP1) is the broker's."""
    name = "Create I/O SQ"
    return Command(AdminOpcode.CREATE_IO_SQ, cdw10=_queue_dw10(name, qid, size),
                   cdw11=_flag(contiguous) | (_fit(name, "QPRIO", qprio, 2) << 1)
                   | (_fit(name, "CQID", cqid, 16, lo=1) << 16))


def delete_io_cq(qid: int) -> Command:
    """Delete I/O Completion Queue (5.6): CDW10 QID 15:0."""
    return Command(AdminOpcode.DELETE_IO_CQ, cdw10=_fit("Delete I/O CQ", "QID", qid, 16, lo=1))


def delete_io_sq(qid: int) -> Command:
    """Delete I/O Submission Queue (5.7): CDW10 QID 15:0."""
    return Command(AdminOpcode.DELETE_IO_SQ, cdw10=_fit("Delete I/O SQ", "QID", qid, 16, lo=1))


def device_self_test(stc: int, *, nsid: int = 0xFFFFFFFF) -> Command:
    """Device Self-test (5.8): CDW10 STC 3:0 (1 short, 2 extended, Eh vendor specific, Fh abort)."""
    name = "Device Self-test"
    return Command(AdminOpcode.DEVICE_SELF_TEST, nsid=_nsid(name, nsid), cdw10=_fit(name, "STC", stc, 4))


def doorbell_buffer_config() -> Command:
    """Doorbell Buffer Config (5.11): no command dwords; the shadow doorbell page (PRP1) and the
    EventIdx page (PRP2) are the broker's."""
    return Command(AdminOpcode.DOORBELL_BUFFER_CONFIG)


def firmware_commit(slot: int, action: int, *, bpid: int = 0) -> Command:
    """Firmware Commit (5.12): CDW10 FS 2:0, CA 5:3, BPID bit 31."""
    name = "Firmware Commit"
    return Command(AdminOpcode.FIRMWARE_COMMIT, cdw10=_fit(name, "FS", slot, 3) | (_fit(name, "CA", action, 3) << 3)
                   | (_fit(name, "BPID", bpid, 1) << 31))


def firmware_image_download(length: int, offset: int) -> Command:
    """Firmware Image Download (5.13): CDW10 NUMD, the 0's based dword count of ``length`` bytes;
    CDW11 OFST, the byte ``offset`` in dwords."""
    name = "Firmware Image Download"
    return Command(AdminOpcode.FIRMWARE_IMAGE_DOWNLOAD, cdw10=_dwords(name, "length", length, 1, 1 << 32) - 1,
                   cdw11=_dwords(name, "offset", offset, 0, (1 << 32) - 1))


def format_nvm(nsid: int, lbaf: int, *, mset: int = 0, pi: int = 0, pil: int = 0, ses: int = 0) -> Command:
    """Format NVM (5.14): CDW10 LBAF 3:0, MSET 4, PI 7:5, PIL 8, SES 11:9, LBAFU 13:12 (bits 5:4
    of the LBA format index)."""
    name = "Format NVM"
    lbaf = _fit(name, "LBAF", lbaf, 6)
    return Command(AdminOpcode.FORMAT_NVM, nsid=_nsid(name, nsid),
                   cdw10=(lbaf & 0xF) | (_fit(name, "MSET", mset, 1) << 4) | (_fit(name, "PI", pi, 3) << 5)
                   | (_fit(name, "PIL", pil, 1) << 8) | (_fit(name, "SES", ses, 3) << 9) | ((lbaf >> 4) << 12))


def get_features(fid: int, *, sel: int = 0, cdw11: int = 0, nsid: int = 0) -> Command:
    """Get Features (5.15): CDW10 FID 7:0, SEL 10:8 (0 current, 1 default, 2 saved, 3 supported
    capabilities); CDW11 feature specific."""
    name = "Get Features"
    return Command(AdminOpcode.GET_FEATURES, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "FID", fid, 8) | (_fit(name, "SEL", sel, 3) << 8),
                   cdw11=_fit(name, "CDW11", cdw11, 32))


def get_log_page(lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, lsp: int = 0,
                 rae: bool = False) -> Command:
    """Get Log Page (5.16): CDW10 LID 7:0, LSP 14:8, RAE bit 15, NUMDL 31:16; CDW11 NUMDU 15:0
    (NUMD: the 0's based dword count of ``length`` bytes); CDW12/13 LPOL/LPOU, the byte offset."""
    name = "Get Log Page"
    numd = _dwords(name, "length", length, 1, 1 << 32) - 1
    lpol, lpou = split_qword(_fit(name, "offset", offset, 64))
    return Command(AdminOpcode.GET_LOG_PAGE, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "LID", lid, 8) | (_fit(name, "LSP", lsp, 7) << 8) | (_flag(rae) << 15)
                   | ((numd & 0xFFFF) << 16), cdw11=numd >> 16, cdw12=lpol, cdw13=lpou)


def identify(cns: int, *, nsid: int = 0, cntid: int = 0, csi: int = 0) -> Command:
    """Identify (5.17): CDW10 CNS 7:0, CNTID 31:16; CDW11 CSI 31:24."""
    name = "Identify"
    return Command(AdminOpcode.IDENTIFY, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "CNS", cns, 8) | (_fit(name, "CNTID", cntid, 16) << 16),
                   cdw11=_fit(name, "CSI", csi, 8) << 24)


def namespace_attachment(nsid: int, *, detach: bool = False) -> Command:
    """Namespace Attachment (5.20): CDW10 SEL 3:0, 0 attach, 1 detach; the controller list is data."""
    return Command(AdminOpcode.NAMESPACE_ATTACHMENT, nsid=_nsid("Namespace Attachment", nsid), cdw10=_flag(detach))


def namespace_create() -> Command:
    """Namespace Management, create (5.21): CDW10 SEL 3:0 = 0, NSID 0; the namespace's fields are data."""
    return Command(AdminOpcode.NAMESPACE_MANAGEMENT, cdw10=0)


def namespace_delete(nsid: int) -> Command:
    """Namespace Management, delete (5.21): CDW10 SEL 3:0 = 1."""
    return Command(AdminOpcode.NAMESPACE_MANAGEMENT, nsid=_nsid("Namespace Management", nsid), cdw10=1)


def sanitize(sanact: int, *, ause: bool = False, owpass: int = 0, oipbp: bool = False, no_dealloc: bool = False,
             ovrpat: int = 0) -> Command:
    """Sanitize (5.24): CDW10 SANACT 2:0, AUSE 3, OWPASS 7:4, OIPBP 8, NDAS 9; CDW11 OVRPAT."""
    name = "Sanitize"
    return Command(AdminOpcode.SANITIZE,
                   cdw10=_fit(name, "SANACT", sanact, 3) | (_flag(ause) << 3) | (_fit(name, "OWPASS", owpass, 4) << 4)
                   | (_flag(oipbp) << 8) | (_flag(no_dealloc) << 9), cdw11=_fit(name, "OVRPAT", ovrpat, 32))


def set_features(fid: int, value: int = 0, *, save: bool = False, cdw12: int = 0, nsid: int = 0) -> Command:
    """Set Features (5.27): CDW10 FID 7:0, SV bit 31; CDW11 (``value``) and CDW12 feature specific."""
    name = "Set Features"
    return Command(AdminOpcode.SET_FEATURES, nsid=_nsid(name, nsid),
                   cdw10=_fit(name, "FID", fid, 8) | (_flag(save) << 31),
                   cdw11=_fit(name, "CDW11", value, 32), cdw12=_fit(name, "CDW12", cdw12, 32))


def set_number_of_queues(sq_count: int, cq_count: int) -> Command:
    """Set Features Number of Queues (5.27.1, FID 07h): CDW11 NSQR 15:0, NCQR 31:16, 0's based
    (FFFFh is invalid: 1..65535 queues)."""
    name = "Set Features (Number of Queues)"
    return set_features(Feature.NUMBER_OF_QUEUES, _zeros_based(name, "NSQR", sq_count, 16, hi=0xFFFF)
                        | (_zeros_based(name, "NCQR", cq_count, 16, hi=0xFFFF) << 16))


def split_number_of_queues(dw0: int) -> tuple[int, int]:
    """(I/O SQs, I/O CQs) allocated, from Number of Queues' completion DW0: NSQA 15:0, NCQA 31:16,
    0's based."""
    return (dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1


def set_async_event_configuration(aec: int) -> Command:
    """Set Features Asynchronous Event Configuration (5.27.1, FID 0Bh): CDW11 the events to report
    (SMART/health critical warnings 7:0, notices 31:8)."""
    return set_features(Feature.ASYNC_EVENT_CONFIGURATION, aec)


# ----------------------------------------------------------- NVM commands (NVM Command Set 1.0, 3.2)
_FUA, _LR = 1 << 30, 1 << 31  # CDW12 of Read, Write, Compare, Verify, Write Zeroes


def rw_dwords(slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
              command: str = "Read/Write") -> tuple[int, int, int]:
    """CDW10, CDW11, CDW12 of a command on a range of blocks: SLBA's low and high dwords; NLB
    15:0, 0's based (1..65536 blocks), FUA bit 30, LR bit 31."""
    if not (type(slba) is int and type(nlb) is int and 0 <= slba < 1 << 64 and 0 < nlb <= 1 << 16):  # cheap when fine
        slba, nlb = _fit(command, "SLBA", slba, 64), _zeros_based(command, "NLB", nlb, 16) + 1
    low, high = split_qword(slba)
    return low, high, (nlb - 1) | (_FUA if fua else 0) | (_LR if lr else 0)


def rw_dword_arrays(slbas: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`rw_dwords` for a batch (no FUA, no LR): arrays of CDW10, CDW11 and CDW12."""
    bad = (counts < 1) | (counts > 1 << 16)
    if bad.any():
        raise FieldOutOfRange("Read/Write", "NLB", int(counts[bad][0]), f"a count in 1..{1 << 16}")
    if (slbas < 0).any():
        raise FieldOutOfRange("Read/Write", "SLBA", int(slbas[slbas < 0][0]), f"a whole number in 0..{(1 << 64) - 1}")
    low, high = split_qword(slbas)
    return low, high, counts - 1


def _blocks(opc: int, name: str, nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False,
            cdw12: int = 0) -> Command:
    """A command on blocks SLBA..SLBA+NLB-1 of a namespace (CDW10..12 as :func:`rw_dwords`)."""
    cdw10, cdw11, dw12 = rw_dwords(slba, nlb, fua=fua, lr=lr, command=name)
    return Command(opc, nsid=_nsid(name, nsid), cdw10=cdw10, cdw11=cdw11, cdw12=dw12 | cdw12)


def read(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False) -> Command:
    """Read (NVM 3.2.4): SLBA, NLB 0's based, FUA, LR. The PRPs are the broker's."""
    return _blocks(IoOpcode.READ, "Read", nsid, slba, nlb, fua=fua, lr=lr)


def write(nsid: int, slba: int, nlb: int, *, fua: bool = False, lr: bool = False) -> Command:
    """Write (NVM 3.2.6): SLBA, NLB 0's based, FUA, LR. The PRPs are the broker's."""
    return _blocks(IoOpcode.WRITE, "Write", nsid, slba, nlb, fua=fua, lr=lr)


def compare(nsid: int, slba: int, nlb: int) -> Command:
    """Compare (NVM 3.2.1): SLBA, NLB 0's based; the data to compare is the broker's buffer."""
    return _blocks(IoOpcode.COMPARE, "Compare", nsid, slba, nlb)


def verify(nsid: int, slba: int, nlb: int) -> Command:
    """Verify (NVM 3.2.5): SLBA, NLB 0's based; nothing is transferred."""
    return _blocks(IoOpcode.VERIFY, "Verify", nsid, slba, nlb)


def write_zeroes(nsid: int, slba: int, nlb: int, *, deac: bool = False) -> Command:
    """Write Zeroes (NVM 3.2.8): SLBA, NLB 0's based; CDW12 DEAC bit 25 (the controller may
    deallocate the blocks; they still read as zeros)."""
    return _blocks(IoOpcode.WRITE_ZEROES, "Write Zeroes", nsid, slba, nlb, cdw12=_flag(deac) << 25)


def dataset_management(nsid: int, ranges: int, *, deallocate: bool = False) -> Command:
    """Dataset Management (NVM 3.2.3): CDW10 NR 7:0, 0's based (1..256 ranges); CDW11 AD bit 2
    (deallocate). The range list is data."""
    name = "Dataset Management"
    return Command(IoOpcode.DATASET_MANAGEMENT, nsid=_nsid(name, nsid), cdw10=_zeros_based(name, "NR", ranges, 8),
                   cdw11=_flag(deallocate) << 2)


def flush(nsid: int) -> Command:
    """Flush (NVMe Base 2.0, 7.1): no command dwords."""
    return Command(IoOpcode.FLUSH, nsid=_nsid("Flush", nsid))
