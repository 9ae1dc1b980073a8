/* vdi (VirtualBox) in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md,
 * "The decoders").  Same checks in the same order, same messages byte for byte, same
 * bytes. */
#ifndef AIODD_VDI_GUEST_H
#define AIODD_VDI_GUEST_H

#include "disk.h"

/* open_disk: the header (qemu's checks in qemu's order, then the placement of the block
 * map and the data), and every block map entry the disk reads checked against the file's
 * size.  A VDI names no other file. */
uint32_t vdi_open(struct layer *layer);

/* VdiDisk.read_into, zeros past the virtual size. */
uint32_t vdi_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length);

#endif
