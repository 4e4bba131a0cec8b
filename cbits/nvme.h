/* nvmevfio C shim: the NVMe names the C files use (NVMe Base Specification 2.0, NVM Command Set
 * Specification 1.0). Private to the C files: cffi never sees this header. */
#ifndef NVMEVFIO_NVME_H
#define NVMEVFIO_NVME_H

/* NVM command set opcodes (NVM Command Set 3.3) */
#define NVME_CMD_FLUSH 0x00
#define NVME_CMD_WRITE 0x01
#define NVME_CMD_READ 0x02
#define NVME_CMD_WRITE_ZEROES 0x08
#define NVME_CMD_DSM 0x09               /* Dataset Management (a deallocate: attribute AD) */
#define NVME_CMD_ZONE_APPEND 0x7D       /* Zoned Namespace Command Set 1.1, 3.4.1 */

/* command dwords */
#define NVME_PSDT_SGL 0x40              /* CDW0 bits 15:14 (byte 1 bits 7:6) = 01b: SGLs for the data (4.2) */
#define NVME_RW_FUA (1u << 30)          /* CDW12 bit 30: Force Unit Access */
#define NVME_WZ_DEAC (1u << 25)         /* Write Zeroes CDW12 bit 25: Deallocate */
#define NVME_DSMGMT_AD (1u << 2)        /* Dataset Management CDW11 bit 2: Attribute - Deallocate */
#define NVME_WZ_MAX_NLB 65536u          /* NLB is a 16-bit 0's based field */

/* Identify Controller ONCS: optional NVM commands supported */
#define NVME_CTRL_ONCS_DSM (1u << 2)
#define NVME_CTRL_ONCS_WRITE_ZEROES (1u << 3)

/* Controller Status (CSTS) */
#define NVME_CSTS_CFS (1u << 1)         /* Controller Fatal Status */

#endif
