"""The guest's address space and the guest <-> host ABI, in one place.

Mirrors ``runtime/abi.h`` (tests/test_kvm.py checks that the two agree).  Guest-physical
and guest-virtual addresses are the same (identity mapping); the map, one line per
region, every gap unmapped (a fault if touched)::

    0x0000000-0x0000fff  page 0               not present
    0x0001000-0x0001fff  GDT                  supervisor, read-write, no execute
    0x0002000-0x0002fff  TSS + I/O bitmap     supervisor, read-write, no execute
    0x0004000-0x0008fff  page tables          not mapped at all (physical only)
    0x0010000-0x0010fff  FS page (canary)     user, read-only
    0x0012000-0x0012fff  mailbox              user, read-write
    0x01bf000-0x01fefff  stack (256 KiB)      user, read-write; guard pages either side
    0x0200000-0x03fffff  the ELF              user, W^X from its program headers
    0x0800000-0x27fffff  heap (32 MiB)        user, read-write (2 MiB pages)
    0x3000000-0x33fffff  IN window (4 MiB)    user, read-only (the host writes it)
    0x3600000-0x3dfffff  OUT window (8 MiB)   user, read-write (the host reads it)
    0x3e00000-           end of guest RAM (0x3f00000: 3 pages Intel VMX may claim)

Nothing but the mailbox and the two windows is written by the host once the guest runs.
"""

from __future__ import annotations

import struct
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
FS_PAGE: Final = 0x10000
MAILBOX: Final = 0x12000
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

OP_READY: Final = 1
OP_READ: Final = 2

CMD_RAW: Final = 0x101
CMD_ZLIB: Final = 0x102
CMD_ZSTD: Final = 0x103

OK: Final = 0
E_REQUEST: Final = 1
E_CORRUPT: Final = 2
E_NOMEM: Final = 3
E_TOOBIG: Final = 4
E_IO: Final = 5

DESC: Final = struct.Struct("<IIQQQ")
"""``struct aiodd_desc``: op, handle, offset, length, status."""

assert DESC.size == 32
