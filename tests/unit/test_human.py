"""-H's text (nvmevfio/cli/human.py, human_regs.py) for hand-built values: the exact lines nvme-cli
2.3 prints (nvme-print.c at v2.3), its quirks included. The guest's compat test compares the same
functions' text with the real nvme-cli on QEMU's controller; these cover the bits QEMU leaves clear."""

from __future__ import annotations

import pytest

from nvmevfio.cli import human, human_regs
from nvmevfio.nvme import structures

N = "Not Supported"


@pytest.mark.parametrize(("field", "value", "lines"), [
    ("cmic", 0x0B, ["  [3:3] : 0x1\tANA supported", "  [2:2] : 0\tPCI", "  [1:1] : 0x1\tMulti Controller",
                    "  [0:0] : 0x1\tMulti Port", ""]),
    ("cmic", 0x10, ["  [7:4] : 0x1\tReserved", "  [3:3] : 0\tANA not supported", "  [2:2] : 0\tPCI",
                    "  [1:1] : 0\tSingle Controller", "  [0:0] : 0\tSingle Port", ""]),
    ("oacs", 0x810A, [" [15:11] : 0x10\tReserved", f"  [10:10] : 0\tLockdown Command and Feature {N}",
                      f"  [9:9] : 0\tGet LBA Status Capability {N}", "  [8:8] : 0x1\tDoorbell Buffer Config Supported",
                      f"  [7:7] : 0\tVirtualization Management {N}", f"  [6:6] : 0\tNVMe-MI Send and Receive {N}",
                      f"  [5:5] : 0\tDirectives {N}", f"  [4:4] : 0\tDevice Self-test {N}",
                      "  [3:3] : 0x1\tNS Management and Attachment Supported",
                      f"  [2:2] : 0\tFW Commit and Download {N}", "  [1:1] : 0x1\tFormat NVM Supported",
                      f"  [0:0] : 0\tSecurity Send and Receive {N}", ""]),
    ("frmw", 0x03, [f"  [5:5] : 0\tMultiple FW or Boot Update Detection {N}",
                    f"  [4:4] : 0\tFirmware Activate Without Reset {N}", "  [3:1] : 0x1\tNumber of Firmware Slots",
                    "  [0:0] : 0x1\tFirmware Slot 1 Read-Only", ""]),
    ("lpa", 0x0A, [f"  [6:6] : 0\tTelemetry Log Data Area 4 {N}",
                   f"  [5:5] : 0\tLID 0x0, Scope of each command in LID 0x5, 0x12, 0x13 {N}",
                   f"  [4:4] : 0\tPersistent Event log {N}",
                   "  [3:3] : 0x1\tTelemetry host/controller initiated log page Supported",
                   f"  [2:2] : 0\tExtended data for Get Log Page {N}",
                   "  [1:1] : 0x1\tCommand Effects Log Page Supported",
                   f"  [0:0] : 0\tSMART/Health Log Page per NS {N}", ""]),
    ("elpe", 3, ["  [7:0] : 3 (0's based)\tError Log Page Entries (ELPE)", ""]),
    ("npss", 0, ["  [7:0] : 0 (0's based)\tNumber of Power States Support (NPSS)", ""]),
    ("avscc", 1, ["  [0:0] : 0x1\tAdmin Vendor Specific Commands uses NVMe Format", ""]),
    ("apsta", 0, [f"  [0:0] : 0\tAutonomous Power State Transitions {N}", ""]),
    ("wctemp", 343, [" [15:0] : 70°C (343 Kelvin)\tWarning Composite Temperature Threshold (WCTEMP)", ""]),
    ("cctemp", 0, [" [15:0] : -273°C (0 Kelvin)\tCritical Composite Temperature Threshold (CCTEMP)", ""]),
    ("tnvmcap", 1 << 40, ["[127:0] : 1099511627776", "\tTotal NVM Capacity (TNVMCAP)", ""]),
    ("unvmcap", 0, ["[127:0] : 0", "\tUnallocated NVM Capacity (UNVMCAP)", ""]),
    ("rpmbs", 0x01020009, [" [31:24]: 0x1\tAccess Size", " [23:16]: 0x2\tTotal Size",
                           "  [5:3] : 0x1\tAuthentication Method", "  [2:0] : 0x1\tNumber of RPMB Units", ""]),
    ("hctma", 1, ["  [0:0] : 0x1\tHost Controlled Thermal Management Supported", ""]),
    ("sanicap", 0x20000003, [
        "  [31:30] : 0\tAdditional media modification after sanitize operation completes successfully is not defined",
        f"  [29:29] : 0x1\tNo-Deallocate After Sanitize bit in Sanitize command {N}",  # nvme-cli's inversion
        f"    [2:2] : 0\tOverwrite Sanitize Operation {N}", "    [1:1] : 0x1\tBlock Erase Sanitize Operation Supported",
        "    [0:0] : 0x1\tCrypto Erase Sanitize Operation Supported", ""]),
    ("anacap", 0x47, [f"  [7:7] : 0\tNon-zero group ID {N}", "  [6:6] : 0x1\tGroup ID does not change",
                      f"  [4:4] : 0\tANA Change state {N}", f"  [3:3] : 0\tANA Persistent Loss state {N}",
                      "  [2:2] : 0x1\tANA Inaccessible state Supported",
                      "  [1:1] : 0x1\tANA Non-optimized state Supported",
                      "  [0:0] : 0x1\tANA Optimized state Supported", ""]),
    ("sqes", 0x66, ["  [7:4] : 0x6\tMax SQ Entry Size (64)", "  [3:0] : 0x6\tMin SQ Entry Size (64)", ""]),
    ("cqes", 0x44, ["  [7:4] : 0x4\tMax CQ Entry Size (16)", "  [3:0] : 0x4\tMin CQ Entry Size (16)", ""]),
    ("fuses", 0, [f"  [0:0] : 0\tFused Compare and Write {N}", ""]),
    ("fna", 0x08, ["  [3:3] : 0x1\tFormat NVM Broadcast NSID (FFFFFFFFh) Not Supported",  # nvme-cli's inversion
                   "  [2:2] : 0\tCrypto Erase Not Supported as part of Secure Erase",
                   "  [1:1] : 0\tCrypto Erase Applies to Single Namespace(s)",
                   "  [0:0] : 0\tFormat Applies to Single Namespace(s)", ""]),
    ("vwc", 0x07, ["  [2:1] : 0x3\tThe Flush command supports NSID set to FFFFFFFFh",
                   "  [0:0] : 0x1\tVolatile Write Cache Present", ""]),
    ("vwc", 0x00, ["  [2:1] : 0\tSupport for the NSID field set to FFFFFFFFh is not indicated",
                   "  [0:0] : 0\tVolatile Write Cache Not Present", ""]),
    ("icsvscc", 0, ["  [0:0] : 0\tNVM Vendor Specific Commands uses Vendor Specific Format", ""]),
    ("nwpc", 0, [f"  [2:2] : 0\tPermanent Write Protect {N}", f"  [1:1] : 0\tWrite Protect Until Power Supply {N}",
                 f"  [0:0] : 0\tNo Write Protect and Write Protect Namespace {N}", ""]),
    ("ocfs", 0x1, [f"  [1:1] : 0\tController Copy Format 1h {N}", "  [0:0] : 0x1\tController Copy Format 0h Supported",
                   ""]),
    ("sgls", 0, [" [15:8] : 0\tSGL Descriptor Threshold", " [1:0]  : 0\tScatter-Gather Lists Not Supported", ""]),
    ("sgls", 0x00100001, [
        f" [21:21]: 0\tTransport SGL Data Block Descriptor {N}", " [20:20]: 0x1\tAddress Offsets Supported",
        f" [19:19]: 0\tMetadata Pointer Containing SGL Descriptor is {N}",
        f" [18:18]: 0\tSGL Length Larger than Buffer {N}", f" [17:17]: 0\tByte-Aligned Contig. MD Buffer {N}",
        f" [16:16]: 0\tSGL Bit-Bucket {N}", " [15:8] : 0\tSGL Descriptor Threshold",
        f"  [2:2] : 0\tKeyed SGL Data Block descriptor {N}",
        "  [1:0] : 0x1\tScatter-Gather Lists Supported. No Dword alignment required.", ""]),
    ("fcatt", 0, ["  [0:0] : 0\tDynamic Controller Model", ""]),
    ("ofcs", 1, ["  [0:0] : 0x1\tDisconnect command  Supported", ""]),  # nvme-cli's two spaces
    ("ofcs", 0, ["  [0:0] : 0\tDisconnect command Not Supported", ""]),
    ("cntrltype", 1, ["  [7:2] : 0\tReserved", "  [1:0] : 0x1\tI/O Controller"]),  # no blank line, as nvme-cli
    ("nvmsr", 0, ["  [1:1] : 0\tNVM subsystem Not part of an Enclosure",
                  "  [0:0] : 0\tNVM subsystem Not part of an Storage Device", ""]),
    ("vwci", 0, ["  [7:7] : 0\tVPD Write Cycles Remaining field is Not valid.",
                 "  [6:0] : 0\tVPD Write Cycles Remaining ", ""]),
    ("mec", 2, ["  [1:1] : 0x1\tNVM subsystem contains a Management Endpoint on a PCIe port",
                "  [0:0] : 0\tNVM subsystem Not contains a Management Endpoint on an SMBus/I2C port", ""]),
    ("mdts", 7, []),  # printed, not decoded
])
def test_id_ctrl_field(field, value, lines):
    assert human.id_ctrl_field(field, value) == lines


def test_id_ctrl_fields_and_order():
    """Every decoded field is one Identify Controller has, and their order is nvme-cli's."""
    names = [name for name, *_ in structures.ID_CTRL]
    assert set(human.ID_CTRL) <= set(names)
    assert [n for n in names if n in human.ID_CTRL] == list(human.ID_CTRL)
    assert len(human.ID_CTRL) == 36


def test_oaes_and_ctratt_with_reserved_bits():
    assert human.id_ctrl_field("oaes", 0x8000_0100 | 0x7 << 28 | 1 << 20 | 0x5) == [
        "  [31:31] : 0x1\tDiscovery Log Change Notice Supported", "  [30:28] : 0x7\tReserved",
        f"  [27:27] : 0\tZone Descriptor Changed Notices {N}", "  [26:16] : 0x10\tReserved",
        f"  [15:15] : 0\tNormal NSS Shutdown Event {N}",
        f"  [14:14] : 0\tEndurance Group Event Aggregate Log Page Change Notice {N}",
        f"  [13:13] : 0\tLBA Status Information Notices {N}",
        f"  [12:12] : 0\tPredictable Latency Event Aggregate Log Change Notices {N}",
        f"  [11:11] : 0\tAsymmetric Namespace Access Change Notices {N}",
        f"  [9:9] : 0\tFirmware Activation Notices {N}", "  [8:8] : 0x1\tNamespace Attribute Changed Event Supported",
        "  [7:0] : 0x5\tReserved", ""]
    lines = human.id_ctrl_field("ctratt", 1 << 20 | 1 << 9 | 1)
    assert lines[:2] == [" [31:20] : 0x1\tReserved", f"  [19:19] : 0\tFlexible Data Placement {N}"]
    assert lines[-4:] == [f"  [2:2] : 0\tNVM Sets {N}", f"  [1:1] : 0\tNon-Operational Power State Permissive {N}",
                          "  [0:0] : 0x1\t128-bit Host Identifier Supported", ""]
    assert "  [9:9] : 0x1\tUUID List Supported" in lines and len(lines) == 19


def test_power_states():
    base = {"max_power": 2500, "flags": 0, "entry_lat": 16, "exit_lat": 4, "read_tput": 0, "read_lat": 0,
            "write_tput": 0, "write_lat": 0, "idle_power": 0, "idle_scale": 0, "active_power": 0,
            "active_power_work": 0, "active_scale": 0}
    other = {**base, "max_power": 35000, "flags": 3, "entry_lat": 0, "exit_lat": 0, "read_tput": 1, "read_lat": 1,
             "write_tput": 1, "write_lat": 1, "idle_power": 500, "idle_scale": 2, "active_power": 1234,
             "active_scale": 1, "active_power_work": 2}
    assert human.power_states([base, other]) == [
        "ps      0 : mp:25.00W operational enlat:16 exlat:4 rrt:0 rrl:0",
        "            rwt:0 rwl:0 idle_power:- active_power:-",
        "            active_power_workload:-",
        "ps      1 : mp:3.5000W non-operational enlat:0 exlat:0 rrt:1 rrl:1",  # MXPS: 0.0001 W units; NOPS
        "            rwt:1 rwl:1 idle_power:5.00W active_power:0.1234W",
        "            active_power_workload:80K 128KiB SW"]


@pytest.mark.parametrize(("field", "value", "lines"), [
    ("nsfeat", 0x14, ["  [4:4] : 0x1\tNPWG, NPWA, NPDG, NPDA, and NOWS are Supported",
                      "  [3:3] : 0\tNGUID and EUI64 fields if non-zero, Reused",
                      "  [2:2] : 0x1\tDeallocated or Unwritten Logical Block error Supported",
                      "  [1:1] : 0\tNamespace uses AWUN, AWUPF, and ACWU", f"  [0:0] : 0\tThin Provisioning {N}", ""]),
    ("flbas", 0x14, ["  [6:5] : 0\tMost significant 2 bits of Current LBA Format Selected",
                     "  [4:4] : 0x1\tMetadata Transferred at End of Data LBA",
                     "  [3:0] : 0x4\tLeast significant 4 bits of Current LBA Format Selected", ""]),
    ("mc", 0, [f"  [1:1] : 0\tMetadata Pointer {N}", f"  [0:0] : 0\tMetadata as Part of Extended Data LBA {N}", ""]),
    ("dpc", 0x21, ["  [7:5] : 0x1\tReserved",
                   f"  [4:4] : 0\tProtection Information Transferred as Last 8 Bytes of Metadata {N}",
                   f"  [3:3] : 0\tProtection Information Transferred as First 8 Bytes of Metadata {N}",
                   f"  [2:2] : 0\tProtection Information Type 3 {N}", f"  [1:1] : 0\tProtection Information Type 2 {N}",
                   "  [0:0] : 0x1\tProtection Information Type 1 Supported", ""]),
    ("dps", 0x09, ["  [3:3] : 0x1\tProtection Information is Transferred as First 8 Bytes of Metadata",
                   "  [2:0] : 0x1\tProtection Information Type 1 Enabled", ""]),
    ("dps", 0x00, ["  [3:3] : 0\tProtection Information is Transferred as Last 8 Bytes of Metadata",
                   "  [2:0] : 0\tProtection Information Disabled", ""]),
    ("nmic", 1, ["  [0:0] : 0x1\tNamespace Multipath Capable", ""]),
    ("rescap", 0x81, ["  [7:7] : 0x1\tIgnore Existing Key - Used as defined in revision 1.3 or later",
                      f"  [6:6] : 0\tExclusive Access - All Registrants {N}",
                      f"  [5:5] : 0\tWrite Exclusive - All Registrants {N}",
                      f"  [4:4] : 0\tExclusive Access - Registrants Only {N}",
                      f"  [3:3] : 0\tWrite Exclusive - Registrants Only {N}", f"  [2:2] : 0\tExclusive Access {N}",
                      f"  [1:1] : 0\tWrite Exclusive {N}", "  [0:0] : 0x1\tPersist Through Power Loss Supported", ""]),
    ("fpi", 0, [f"  [7:7] : 0\tFormat Progress Indicator {N}", ""]),
    ("fpi", 0x80 | 40, ["  [7:7] : 0x1\tFormat Progress Indicator Supported",
                        "  [6:0] : 0x28\tFormat Progress Indicator (Remaining 40%)", ""]),
    ("dlfeat", 0x09, ["  [4:4] : 0\tGuard Field of Deallocated Logical Blocks is set to 0xFFFF",
                      "  [3:3] : 0x1\tDeallocate Bit in the Write Zeroes Command is Supported",
                      "  [2:0] : 0x1\tBytes Read From a Deallocated Logical Block and its Metadata are 0x00", ""]),
    ("dlfeat", 0x06, ["  [4:4] : 0\tGuard Field of Deallocated Logical Blocks is set to 0xFFFF",
                      f"  [3:3] : 0\tDeallocate Bit in the Write Zeroes Command is {N}",
                      "  [2:0] : 0x6\tBytes Read From a Deallocated Logical Block and its Metadata are Reserved Value",
                      ""]),
    ("nsze", 5, []),
])
def test_id_ns_field(field, value, lines):
    assert human.id_ns_field(field, value) == lines


def test_lba_format_lines():
    assert human.lba_format(0, {"ms": 0, "ds": 9, "rp": 0}, True) == (
        "LBA Format  0 : Metadata Size: 0   bytes - Data Size: 512 bytes - Relative Performance: 0 Best (in use)")
    assert human.lba_format(11, {"ms": 64, "ds": 12, "rp": 2}, False) == (
        "LBA Format 11 : Metadata Size: 64  bytes - Data Size: 4096 bytes - Relative Performance: 0x2 Good ")
    assert human.lbaf_in_use(0x14) == 4 and human.lbaf_in_use(0x61) == 0x31


# QEMU 7.2's registers, roughly, with the kernel's queues: every line nvme-cli 2.3's show-regs -H prints
QEMU = {"cap": 0x004000200F0107FF, "vs": 0x10400, "cc": 0x460001, "csts": 1, "aqa": 0x1F001F, "asq": 0x1000,
        "acq": 0x2000, "intms": 0, "intmc": 0, "nssr": 0, "cmbloc": 0, "cmbsz": 0, "bpinfo": 0, "bprsel": 0,
        "bpmbl": 0, "cmbmsc": 0, "cmbsts": 0, "crto": 0, "pmrcap": 0, "pmrctl": 0, "pmrsts": 0, "pmrebs": 0,
        "pmrswtp": 0, "pmrmscl": 0, "pmrmscu": 0}
QEMU_TEXT = [
    "cap     : 4000200f0107ff",
    "\tController Ready With Media Support (CRWMS): Not Supported",
    "\tController Ready Independent of Media Support (CRIMS): Not Supported",
    "\tController Memory Buffer Supported (CMBS): The Controller Memory Buffer is Not Supported",
    "\tPersistent Memory Region Supported (PMRS): The Persistent Memory Region is Not Supported",
    "\tMemory Page Size Maximum         (MPSMAX): 65536 bytes",
    "\tMemory Page Size Minimum         (MPSMIN): 4096 bytes",
    "\tBoot Partition Support              (BPS): No",
    "\tCommand Sets Supported              (CSS): NVM command set is Supported",
    "\t                                           One or more I/O Command Sets are Not Supported",
    "\t                                           I/O Command Set is Supported",
    "\tNVM Subsystem Reset Supported     (NSSRS): No",
    "\tDoorbell Stride                   (DSTRD): 4 bytes",
    "\tTimeout                              (TO): 7500 ms",
    "\tArbitration Mechanism Supported     (AMS): Weighted Round Robin with Urgent Priority Class is not supported",
    "\tContiguous Queues Required          (CQR): Yes",
    "\tMaximum Queue Entries Supported    (MQES): 2048",
    "",
    "version : 10400",
    "\tNVMe specification 1.4",
    "",
    "cc      : 460001",
    "\tController Ready Independent of Media Enable (CRIME): Disabled",
    "\tI/O Completion Queue Entry Size (IOCQES): 16 bytes",
    "\tI/O Submission Queue Entry Size (IOSQES): 64 bytes",
    "\tShutdown Notification              (SHN): No notification; no effect",
    "\tArbitration Mechanism Selected     (AMS): Round Robin",
    "\tMemory Page Size                   (MPS): 4096 bytes",
    "\tI/O Command Set Selected           (CSS): NVM Command Set",
    "\tEnable                              (EN): Yes",
    "",
    "csts    : 1",
    "\tProcessing Paused               (PP): No",
    "\tNVM Subsystem Reset Occurred (NSSRO): No",
    "\tShutdown Status               (SHST): Normal operation (no shutdown has been requested)",
    "\tController Fatal Status        (CFS): False",
    "\tReady                          (RDY): Yes",
    "",
    "nssr    : 0",
    "\tNVM Subsystem Reset Control (NSSRC): 0",
    "",
    "crto    : 0",
    "\tCRIMT                               : 0 secs",
    "\tCRWMT                               : 0 secs",
    "intms   : 0",
    "\tInterrupt Vector Mask Set (IVMS): 0",
    "",
    "intmc   : 0",
    "\tInterrupt Vector Mask Clear (IVMC): 0",
    "",
    "aqa     : 1f001f",
    "\tAdmin Completion Queue Size (ACQS): 32",
    "\tAdmin Submission Queue Size (ASQS): 32",
    "",
    "asq     : 1000",
    "\tAdmin Submission Queue Base (ASQB): 1000",
    "",
    "acq     : 2000",
    "\tAdmin Completion Queue Base (ACQB): 2000",
    "",
    "cmbloc  : 0",
    "\tController Memory Buffer feature is not supported",
    "",
    "cmbsz   : 0",
    "\tController Memory Buffer feature is not supported",
    "",
    "bpinfo  : 0",
    "\tActive Boot Partition ID      (ABPID): 0",
    "\tBoot Read Status                (BRS): No Boot Partition read operation requested",
    "\tBoot Partition Size            (BPSZ): 0",
    "bprsel  : 0",
    "\tBoot Partition Identifier      (BPID): 0",
    "\tBoot Partition Read Offset    (BPROF): 0",
    "\tBoot Partition Read Size      (BPRSZ): 0",
    "bpmbl   : 0",
    "\tBoot Partition Memory Buffer Base Address (BMBBA): 0",
    "cmbmsc\t: 0",
    "\tController Base Address         (CBA): 0",
    "\tController Memory Space Enable (CMSE): 0",
    "\tCapabilities Registers Enabled  (CRE): CMBLOC and CMBSZ registers are NOT enabled",
    "",
    "cmbsts\t: 0",
    "\tController Base Address Invalid (CBAI): 0",
    "",
    "pmrcap  : 0",
    "\tController Memory Space Supported                   (CMSS): Referencing PMR with host supplied addresses is "
    "Not Supported",
    "\tPersistent Memory Region Timeout                   (PMRTO): 0",
    "\tPersistent Memory Region Write Barrier Mechanisms (PMRWBM): 0",
    "\tPersistent Memory Region Time Units                (PMRTU): PMR time unit is 500 milliseconds",
    "\tBase Indicator Register                              (BIR): 0",
    "\tWrite Data Support                                   (WDS): Write data to the PMR is not supported",
    "\tRead Data Support                                    (RDS): Read data from the PMR is not supported",
    "pmrctl  : 0",
    "\tEnable (EN): PMR is Disabled",
    "pmrsts  : 0",
    "\tController Base Address Invalid (CBAI): 0",
    "\tHealth Status                   (HSTS): Normal Operation",
    "\tNot Ready                       (NRDY): The Persistent Memory Region is Not Ready to process PCI Express "
    "memory read and write requests",
    "\tError                            (ERR): 0",
    "pmrebs  : 0",
    "\tPMR Elasticity Buffer Size Base  (PMRWBZ): 0",
    "\tRead Bypass Behavior                     : memory reads not conflicting with memory writes in the PMR "
    "Elasticity Buffer MAY bypass those memory writes",
    "\tPMR Elasticity Buffer Size Units (PMRSZU): Bytes",
    "pmrswtp : 0",
    "\tPMR Sustained Write Throughput       (PMRSWTV): 0",
    "\tPMR Sustained Write Throughput Units (PMRSWTU): Bytes/second",
    "pmrmscl\t: 0",
    "\tController Base Address         (CBA): 0",
    "\tController Memory Space Enable (CMSE): 0",
    "",
    "pmrmscu\t: 0",
    "\tController Base Address         (CBA): 0",
]


def test_show_regs_every_register():
    assert human_regs.registers(QEMU) == QEMU_TEXT


def test_show_regs_cmb_withheld_and_missing():
    r = {**QEMU, "cmbloc": 0x1F2, "cmbsz": 0x00010105, "asq": None, "acq": None, "crto": 0xFFFFFFFF}
    for name in ("pmrcap", "pmrctl", "pmrsts", "pmrebs", "pmrswtp", "pmrmscl", "pmrmscu"):
        del r[name]  # beyond a small BAR0
    text = human_regs.registers(r)
    at = text.index("cmbloc  : 1f2")
    assert text[at : at + 21] == [
        "cmbloc  : 1f2",
        "\tOffset                                                        (OFST): 0x0 (See cmbsz.szu for granularity)",
        "\tCMB Queue Dword Alignment                                     (CQDA): 1",
        "\tCMB Data Metadata Mixed Memory Support                      (CDMMMS): Not Enforced",
        "\tCMB Data Pointer and Command Independent Locations Support (CDPCILS): Not Enforced",
        "\tCMB Data Pointer Mixed Locations Support                    (CDPMLS): Not Enforced",
        "\tCMB Queue Physically Discontiguous Support                   (CQPDS): Not Enforced",
        "\tCMB Queue Mixed Memory Support                               (CQMMS): Enforced",
        "\tBase Indicator Register                                        (BIR): 0x2",
        "",
        "cmbsz   : 10105",
        "\tSize                      (SZ): 16",
        "\tSize Units               (SZU): 64 KB",
        "\tWrite Data Support       (WDS): Write Data and metadata transfer in Controller Memory Buffer is "
        "Not supported",
        "\tRead Data Support        (RDS): Read Data and metadata transfer in Controller Memory Buffer is "
        "Not supported",
        "\tPRP SGL List Support   (LISTS): PRP/SG Lists in Controller Memory Buffer is Supported",
        "\tCompletion Queue Support (CQS): Admin and I/O Completion Queues in Controller Memory Buffer is "
        "Not supported",
        "\tSubmission Queue Support (SQS): Admin and I/O Submission Queues in Controller Memory Buffer is Supported",
        "",
        "bpinfo  : 0",
        "\tActive Boot Partition ID      (ABPID): 0",
    ]
    assert "crto    : ffffffff" not in text and not any(line.startswith("pmr") for line in text)  # all ones: skipped
    assert text[text.index("asq     : " + human_regs.WITHHELD) + 1] == ""
    assert text[-3:] == ["cmbsts\t: 0", "\tController Base Address Invalid (CBAI): 0", ""]


def test_the_registers_show_regs_reads():
    """registers(every=True) reads nvme-cli's set; a register beyond BAR0 is left out; the no-IOMMU
    lane's snapshot withholds BPMBL with ASQ and ACQ."""
    from nvmevfio.mmio import ArrayMmio
    from nvmevfio.nvme import regs
    from nvmevfio.nvme.controller import Controller

    mmio = ArrayMmio(0x100)
    mmio.poke32(regs.INTMS, 0x3)
    mmio.poke32(0x48, 0x1000)  # BPMBL
    ctrl = Controller(mmio)
    assert ctrl.registers().others == {}
    snap = ctrl.registers(every=True)
    assert list(snap.others) == [name for name, offset, _ in regs.SHOWN if offset < 0x100]
    assert snap.others["intms"] == 3 and snap.others["bpmbl"] == 0x1000
    assert snap.withheld().others["bpmbl"] is None and snap.withheld().others["intms"] == 3
    assert len(Controller(ArrayMmio(0x1000)).registers(every=True).others) == len(regs.SHOWN)


class _FakeSession:
    """What identify.py's commands use of a session, from hand-built structures."""

    address, bar0_size, pci_command = "0000:00:04.0", 0x4000, 0x0406

    class iommu:
        backend, iova_pgsizes, ranges = "type1", 0x1000, [(0, 0xFEDFFFFF)]

    def __init__(self, ctrl: bytes = b"", ns: bytes = b"") -> None:
        self.ctrl, self.ns = ctrl, ns

    def identify_controller(self):
        return structures.parse_identify_controller(self.ctrl)

    def identify_namespace(self, nsid):
        class Ns:
            identify = structures.parse_identify_namespace(self.ns)
        return Ns()

    def registers(self, every=False):
        from nvmevfio.nvme.controller import Registers

        others = {k: v for k, v in QEMU.items() if k not in ("cap", "vs", "cc", "csts", "aqa", "asq", "acq")}
        return Registers(QEMU["cap"], QEMU["vs"], QEMU["cc"], QEMU["csts"], QEMU["aqa"], QEMU["asq"], QEMU["acq"],
                         others if every else {})


def _run(monkeypatch, session, argv):
    import contextlib

    from click.testing import CliRunner

    from nvmevfio.cli import identify, main

    monkeypatch.setattr(identify, "controller", lambda *a, **k: contextlib.nullcontext(session))
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, (r.output, r.exception)
    return r


def test_id_ctrl_h_prints_each_block_under_its_field(monkeypatch):
    raw = bytearray(4096)
    raw[0:2] = (0x1B36).to_bytes(2, "little")
    raw[111] = 1  # CNTRLTYPE
    raw[266:268] = (343).to_bytes(2, "little")  # WCTEMP
    raw[512], raw[513] = 0x66, 0x44
    raw[520:522] = (0x15D).to_bytes(2, "little")  # ONCS
    lines = _run(monkeypatch, _FakeSession(ctrl=bytes(raw)), ["id-ctrl", "00:04.0", "-H"]).stdout_bytes.decode()
    lines = lines.splitlines()
    at = lines.index("cntrltype : 1")
    assert lines[at : at + 4] == ["cntrltype : 1", "  [7:2] : 0\tReserved", "  [1:0] : 0x1\tI/O Controller",
                                  "fguid     : 00000000-0000-0000-0000-000000000000"]
    at = lines.index("sqes      : 0x66")
    assert lines[at : at + 8] == ["sqes      : 0x66", *human.id_ctrl_field("sqes", 0x66), "cqes      : 0x44",
                                  *human.id_ctrl_field("cqes", 0x44)]
    at = lines.index("wctemp    : 343")
    assert lines[at + 1] == " [15:0] : 70°C (343 Kelvin)\tWarning Composite Temperature Threshold (WCTEMP)"
    at = lines.index("oncs      : 0x15d")
    assert lines[at + 1 : at + 11] == human.id_ctrl_field("oncs", 0x15D)
    assert sum(line.startswith("  [") or line.startswith(" [") for line in lines) > 100
    plain = _run(monkeypatch, _FakeSession(ctrl=bytes(raw)), ["id-ctrl", "00:04.0"]).stdout_bytes.decode()
    assert "[" not in plain and "sqes      : 0x66" in plain


def test_id_ns_h_decodes_and_names_lba_formats(monkeypatch):
    raw = bytearray(4096)
    raw[0:8] = raw[8:16] = (0x40000).to_bytes(8, "little")
    raw[24], raw[25], raw[26], raw[33] = 0x14, 1, 0x01, 0x09  # NSFEAT, NLBAF, FLBAS, DLFEAT
    raw[128:132] = (9 << 16).to_bytes(4, "little")
    raw[132:136] = (12 << 16 | 8).to_bytes(4, "little")
    out = _run(monkeypatch, _FakeSession(ns=bytes(raw)), ["id-ns", "00:04.0", "-H"]).stdout.splitlines()
    at = out.index("nsfeat  : 0x14")
    assert out[at + 1 : at + 7] == human.id_ns_field("nsfeat", 0x14) and out[at + 7] == "nlbaf   : 1"
    at = out.index("dlfeat  : 9")
    assert out[at + 1 : at + 5] == human.id_ns_field("dlfeat", 9)
    assert out[-2:] == [
        "LBA Format  0 : Metadata Size: 0   bytes - Data Size: 512 bytes - Relative Performance: 0 Best ",
        "LBA Format  1 : Metadata Size: 8   bytes - Data Size: 4096 bytes - Relative Performance: 0 Best (in use)"]


def test_show_regs_h_is_nvme_cli_s_text_on_stdout(monkeypatch):
    r = _run(monkeypatch, _FakeSession(), ["show-regs", "00:04.0", "-H"])
    assert r.stdout_bytes.decode().splitlines() == QEMU_TEXT
    assert "iommu: type1" in r.stderr and "NVMe 1.4.0" in r.stderr
    plain = _run(monkeypatch, _FakeSession(), ["show-regs", "00:04.0"])
    assert "iommu: type1" in plain.stdout and "Timeout" not in plain.stdout
