/* The guest <-> host ABI of the KVM guest reader (docs/kvm.md, "The ABI").
 *
 * Mirrored in Python by aiodd/guest/kvm/layout.py; tests/test_kvm.py checks that the two
 * agree.  Every address is guest-physical and guest-virtual at once (identity mapping). */
#ifndef AIODD_KVM_ABI_H
#define AIODD_KVM_ABI_H

#include <stdint.h>

#define AIODD_PAGE 0x1000ULL

/* The guest's view of memory; everything else is unmapped (a fault). */
#define AIODD_FS_PAGE 0x10000ULL        /* user read-only: the canary at fs:0x28 */
#define AIODD_MAILBOX 0x12000ULL        /* user read-write: one struct aiodd_desc */
#define AIODD_STACK_BASE 0x1BF000ULL    /* user read-write, guard pages either side */
#define AIODD_STACK_TOP 0x1FF000ULL
#define AIODD_IMAGE_BASE 0x200000ULL    /* the ELF, W^X from its program headers */
#define AIODD_IMAGE_END 0x400000ULL
#define AIODD_HEAP_BASE 0x800000ULL     /* user read-write, no execute */
#define AIODD_HEAP_SIZE 0x2000000ULL    /* 32 MiB: malloc returns NULL past it */
#define AIODD_IN_BASE 0x3000000ULL      /* user read-only: the host writes, the guest reads */
#define AIODD_IN_SIZE 0x400000ULL       /* 4 MiB */
#define AIODD_OUT_BASE 0x3600000ULL     /* user read-write: the guest writes, the host reads */
#define AIODD_OUT_SIZE 0x800000ULL      /* 8 MiB */

/* I/O ports, the only ones the TSS bitmap opens; always one byte, `out`. */
#define AIODD_PORT_DOORBELL 0xE0
#define AIODD_PORT_FAULT 0xE1

/* Fault codes, the byte written to AIODD_PORT_FAULT. */
#define AIODD_FAULT_STACK 1   /* __stack_chk_fail */
#define AIODD_FAULT_ABI 2     /* the host's answer failed the guest's checks */
#define AIODD_FAULT_RETURN 3  /* guest_main returned */

/* The descriptor in the mailbox page.  The guest fills it and rings the doorbell; the
 * host answers in the same struct and resumes the guest.  Each side copies it out once
 * and checks the copy, never the shared page. */
struct aiodd_desc {
    uint32_t op;
    uint32_t handle;
    uint64_t offset;
    uint64_t length;
    uint64_t status;
};

/* Guest -> host requests (op of a ring). */
#define AIODD_OP_READY 1  /* the last command is done: status, length (bytes in OUT) */
#define AIODD_OP_READ 2   /* read (handle, offset, length) into IN at 0; answer: length read */

/* Host -> guest commands (op of the answer to AIODD_OP_READY). */
#define AIODD_CMD_RAW 0x101   /* copy (handle, offset, length) to OUT, short at end of file */
#define AIODD_CMD_ZLIB 0x102  /* inflate the zlib stream IN[0:length] into OUT */
#define AIODD_CMD_ZSTD 0x103  /* decompress the zstd frames IN[0:length] into OUT */

/* Status codes, both directions. */
#define AIODD_OK 0
#define AIODD_E_REQUEST 1   /* a command the guest does not know, or out of range */
#define AIODD_E_CORRUPT 2   /* the data does not decode */
#define AIODD_E_NOMEM 3     /* the heap is exhausted */
#define AIODD_E_TOOBIG 4    /* the output does not fit in OUT */
#define AIODD_E_IO 5        /* the host could not read the file */

#endif
