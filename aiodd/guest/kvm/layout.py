"""The guest's address space and the guest <-> host ABI, in one place.

Mirrors ``runtime/abi.h`` (tests/test_kvm.py checks that the two agree).  Guest-physical
and guest-virtual addresses are the same (identity mapping); the map, one line per
region, every gap unmapped (a fault if touched)::

    0x000000000-0x000000fff  page 0               not present
    0x000001000-0x000001fff  GDT                  supervisor, read-write, no execute
    0x000002000-0x000002fff  TSS + I/O bitmap     supervisor, read-write, no execute
    0x000004000-0x000008fff  page tables          not mapped at all (physical only)
    0x000010000-0x000010fff  FS page (canary)     user, read-only
    0x000012000-0x000012fff  mailbox              user, read-write
    0x000014000-0x000017fff  REQ (16 KiB)         user, read-write: a request's body
    0x000020000-0x000027fff  slots' page tables   not mapped at all (physical only)
    0x0001bf000-0x0001fefff  stack (256 KiB)      user, read-write; guard pages either side
    0x000200000-0x0003fffff  the ELF              user, W^X from its program headers
    0x000800000-0x0027fffff  heap (32 MiB)        user, read-write (2 MiB pages)
    0x003000000-0x0033fffff  IN window (4 MiB)    user, read-only (the host writes it)
    0x003600000-0x003dfffff  OUT window (8 MiB)   user, read-write (the host reads it)
    0x003e00000-             end of guest RAM (0x3f00000: 3 pages Intel VMX may claim)
    0x100000000-             slot i at SLOT_BASE + i * SLOT_STRIDE, as long as its buffer
                             (rounded up to 4 KiB), user, read-write

Everything but page 0 and the tables is mapped no-execute except the ELF's text.  Nothing
but the mailbox, REQ, the windows and the slots is written by the host once the guest
runs.
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # typing, not imported: the guest's process imports this module
if TYPE_CHECKING:
    from typing import Final

PAGE: Final = 0x1000
LARGE_PAGE: Final = 0x200000

GDT: Final = 0x1000
TSS: Final = 0x2000
PML4: Final = 0x4000
PDPT: Final = 0x5000
PD: Final = 0x6000
PT_LOW: Final = 0x7000  # 4 KiB pages of 0x000000-0x1fffff
PT_IMAGE: Final = 0x8000  # 4 KiB pages of 0x200000-0x3fffff
SLOT_TABLES: Final = 0x20000  # per slot: its page directory, then the table of its tail
FS_PAGE: Final = 0x10000
MAILBOX: Final = 0x12000
REQ_BASE: Final = 0x14000
REQ_SIZE: Final = 0x4000
STACK_BASE: Final = 0x1BF000
STACK_TOP: Final = 0x1FF000
IMAGE_BASE: Final = 0x200000
IMAGE_END: Final = 0x400000
HEAP_BASE: Final = 0x800000
HEAP_SIZE: Final = 0x2000000
IN_BASE: Final = 0x3000000
IN_SIZE: Final = 0x400000
OUT_BASE: Final = 0x3600000
OUT_SIZE: Final = 0x800000
RAM_SIZE: Final = 0x3E00000
VMX_TSS: Final = 0x3F00000  # 3 pages outside RAM that Intel VMX may want for itself

SLOT_BASE: Final = 0x100000000
SLOT_STRIDE: Final = 0x40000000
MAX_SLOTS: Final = 4

CANARY_OFFSET: Final = 0x28  # fs:0x28, where gcc's stack protector looks

# GDT selectors (index << 3 | RPL).
USER_CODE: Final = 0x18 | 3
USER_DATA: Final = 0x20 | 3
TSS_SELECTOR: Final = 0x28

PORT_DOORBELL: Final = 0xE0
PORT_FAULT: Final = 0xE1

FAULT_STACK: Final = 1
FAULT_ABI: Final = 2
FAULT_RETURN: Final = 3

# Guest -> host requests.
OP_READY: Final = 1
OP_READV: Final = 2
OP_OPEN: Final = 3

# Host -> guest commands.
CMD_ZLIB: Final = 0x102
CMD_ZSTD: Final = 0x103
CMD_OPEN: Final = 0x104
CMD_READ: Final = 0x105

FMT_NONE: Final = 0
FMT_RAW: Final = 1
FMT_QCOW2: Final = 2
FMT_VMDK: Final = 3
FMT_VPC: Final = 4
FMT_VHDX: Final = 5
FMT_VDI: Final = 6
FMT_PARALLELS: Final = 9
FMT_QCOW: Final = 7
FMT_QED: Final = 8

OK: Final = 0
E_REQUEST: Final = 1
E_CORRUPT: Final = 2
E_NOMEM: Final = 3
E_TOOBIG: Final = 4
E_IO: Final = 5
E_IMAGE: Final = 6
E_UNSUPPORTED: Final = 7
E_REFUSED: Final = 8

REF_BACKING: Final = 1
REF_DATA_FILE: Final = 2
REF_EXTENT: Final = 3
REF_PARENT: Final = 4

DESC: Final = struct.Struct("<IIQQQQ")
"""``struct aiodd_desc``: op, handle, offset, length, address, status."""

SEGMENT: Final = struct.Struct("<IIQQQQ")
"""``struct aiodd_segment``: handle, reserved, offset, length, dest, got."""

SEGMENT_GOT: Final = 32  # where ``got`` lies in a segment

MAX_SEGMENTS: Final = REQ_SIZE // SEGMENT.size

OPEN_REQ: Final = struct.Struct("<IIII")
"""``struct aiodd_open_req``: referrer, kind, name_length, format_length; then the bytes."""

ERROR: Final = struct.Struct("<II")
"""``struct aiodd_error``: layer, length; then the message."""

assert DESC.size == 40 and SEGMENT.size == 40 and MAX_SEGMENTS == 409
