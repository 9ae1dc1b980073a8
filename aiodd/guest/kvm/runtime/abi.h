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
#define AIODD_REQ_BASE 0x14000ULL       /* user read-write: a request's body (below) */
#define AIODD_REQ_SIZE 0x4000ULL        /* 16 KiB */
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

/* Output slots: the host's shared buffers (the pipeline's pool), mapped user read-write,
 * no execute, slot i at AIODD_SLOT_BASE + i * AIODD_SLOT_STRIDE, each at most one stride
 * long; past a slot's real end nothing is mapped.  A command's output lands straight in
 * the buffer the encoder reads. */
#define AIODD_SLOT_BASE 0x100000000ULL  /* 4 GiB */
#define AIODD_SLOT_STRIDE 0x40000000ULL /* 1 GiB */
#define AIODD_MAX_SLOTS 4

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
    uint64_t address;
    uint64_t status;
};

/* Guest -> host requests (op of a ring). */
#define AIODD_OP_READY 1  /* the command is done: status; length = its result (below);
                           * an AIODD_E_IMAGE/UNSUPPORTED status carries a struct
                           * aiodd_error in REQ */
#define AIODD_OP_READV 2  /* length = n: REQ holds n struct aiodd_segment (n <= 
                           * AIODD_MAX_SEGMENTS); the host reads each into its `dest`
                           * and writes back `got` (short only at the end of the file);
                           * answer: status */
#define AIODD_OP_OPEN 3   /* REQ holds a struct aiodd_open_req; answer: status OK with
                           * handle = the new file's handle, offset = its size, length =
                           * its format (AIODD_FMT_*; AIODD_FMT_NONE for a data file);
                           * or AIODD_E_REFUSED (the host keeps the reason) */

/* Host -> guest commands (op of the answer to AIODD_OP_READY). */
#define AIODD_CMD_OPEN 0x104  /* open the image in handle (always 0): offset = its format,
                               * length = its file size; READY's length = virtual size */
#define AIODD_CMD_READ 0x105  /* decode the virtual disk's [offset, offset + length) into
                               * memory at address (inside OUT, or inside one slot's
                               * stride); zeros past the disk's end; READY's length =
                               * length */
#define AIODD_CMD_ZLIB 0x102  /* inflate the zlib stream IN[0:length] into OUT */
#define AIODD_CMD_ZSTD 0x103  /* decompress the zstd frames IN[0:length] into OUT */

/* Formats, as the host names them to the guest. */
#define AIODD_FMT_NONE 0   /* a plain file (an external data file) */
#define AIODD_FMT_RAW 1
#define AIODD_FMT_QCOW2 2
#define AIODD_FMT_VMDK 3
#define AIODD_FMT_VPC 4
#define AIODD_FMT_VHDX 5
#define AIODD_FMT_VDI 6
#define AIODD_FMT_PARALLELS 9
#define AIODD_FMT_QCOW 7
#define AIODD_FMT_QED 8

/* Status codes, both directions. */
#define AIODD_OK 0
#define AIODD_E_REQUEST 1      /* a command the guest does not know, or out of range */
#define AIODD_E_CORRUPT 2      /* the data does not decode (ZLIB, ZSTD) */
#define AIODD_E_NOMEM 3        /* the heap is exhausted */
#define AIODD_E_TOOBIG 4       /* the output does not fit in OUT (ZLIB, ZSTD) */
#define AIODD_E_IO 5           /* the host could not read the file */
#define AIODD_E_IMAGE 6        /* the image is invalid: an ImageError (struct aiodd_error) */
#define AIODD_E_UNSUPPORTED 7  /* valid but not read: an UnsupportedImageError (idem) */
#define AIODD_E_REFUSED 8      /* the host refused a file an image names (OP_OPEN); the
                                * guest ends the command with this status */

/* A READV segment: `length` bytes of `handle` at `offset` into `dest`, which must lie in
 * IN or in the running command's output range.  The host writes `got`.  The guest never
 * asks past the size the host gave for the file, and zeroes what a short read left. */
struct aiodd_segment {
    uint32_t handle;
    uint32_t reserved;  /* zero */
    uint64_t offset;
    uint64_t length;
    uint64_t dest;
    uint64_t got;
};
#define AIODD_MAX_SEGMENTS (AIODD_REQ_SIZE / 40)

/* OP_OPEN's body: a file named by layer `referrer` (a handle the host gave), as `kind`;
 * `name` and then `format` (a format the image names for it, or empty) follow. */
struct aiodd_open_req {
    uint32_t referrer;
    uint32_t kind;  /* AIODD_REF_* */
    uint32_t name_length;
    uint32_t format_length;
    /* char name[name_length]; char format[format_length]; */
};
#define AIODD_REF_BACKING 1
#define AIODD_REF_DATA_FILE 2
#define AIODD_REF_EXTENT 3  /* a vmdk descriptor's extent: a plain file (AIODD_FMT_NONE) */
#define AIODD_REF_PARENT 4  /* a differencing disk's parent: vpc (detected by the host),
                            * vmdk (a parentFileNameHint, declared vmdk), vhdx */

/* READY's body with AIODD_E_IMAGE or AIODD_E_UNSUPPORTED: the message (no NUL), about
 * the file of handle `layer`.  The host prefixes the file's name.  The message is UTF-8
 * but for names quoted from the image, passed as the image has them: the host decodes it
 * with surrogateescape, as the Python decoders decode those names. */
struct aiodd_error {
    uint32_t layer;
    uint32_t length;
    /* char message[length]; at most AIODD_REQ_SIZE - 8 */
};

#endif
