"""NVMe data structures: the 64-byte SQE and 16-byte CQE as numpy dtypes, opcodes and
command names, feature identifiers, and status codes with their specification names.

Identify and log page parsing is :mod:`nvmevfio.nvme.structures`; the typed command builders are
:mod:`nvmevfio.nvme.builders`. Section numbers refer to the NVMe Base Specification 2.0 and NVM
Command Set 1.0.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

import numpy as np

from nvmevfio.errors import CommandError

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
    ZONE_MANAGEMENT_SEND = 0x79  # Zoned Namespace Command Set 1.1, 3.4
    ZONE_MANAGEMENT_RECEIVE = 0x7A
    ZONE_APPEND = 0x7D


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
    0x79: "Zone Management Send", 0x7A: "Zone Management Receive", 0x7D: "Zone Append",
}


def command_name(admin: bool, opcode: int) -> str:
    """The command's name, "Vendor Specific" for C0h-FFh, else "Unknown"."""
    name = (ADMIN_COMMAND_NAMES if admin else IO_COMMAND_NAMES).get(opcode)
    return name or ("Vendor Specific" if opcode >= 0xC0 else "Unknown")


class Cns(enum.IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACE_LIST = 0x02
    NAMESPACE_DESCRIPTORS = 0x03  # Namespace Identification Descriptor list (its CSI among them)
    NAMESPACE_CSI = 0x05  # I/O Command Set specific Identify Namespace (CDW11.CSI)
    CSI_NAMESPACE = NAMESPACE_CSI  # (CSI 00h: the NVM Command Set's; the PI guard format)
    CONTROLLER_CSI = 0x06  # I/O Command Set specific Identify Controller


class Csi(enum.IntEnum):
    """Command Set Identifier (Base 2.0, Figure 286)."""

    NVM = 0x00
    KEY_VALUE = 0x01
    ZONED = 0x02


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
    # Zoned Namespace Command Set 1.1, Figure 26 (the I/O commands' command specific statuses)
    0xB8: "Zone Boundary Error", 0xB9: "Zone Is Full", 0xBA: "Zone Is Read Only", 0xBB: "Zone Is Offline",
    0xBC: "Zone Invalid Write", 0xBD: "Too Many Active Zones", 0xBE: "Too Many Open Zones",
    0xBF: "Invalid Zone State Transition",
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


def command_error(status: int, name: str, **context: Any) -> CommandError:
    """The CommandError for a completion's status field (without the phase tag), named."""
    _, sc, sct, _, more, dnr = split_status(int(status) << 1)
    return CommandError(name, sct, sc, bool(dnr), sct_name=sct_name(sct), sc_name=status_name(sct, sc),
                        more=bool(more), **context)
