/* vhdx in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md, "The
 * decoders").  Same checks in the same order, same messages byte for byte, same bytes. */
#ifndef AIODD_VHDX_GUEST_H
#define AIODD_VHDX_GUEST_H

#include "disk.h"

/* open_disk: the headers, the log (replayed into an overlay), the region table, the
 * metadata, the BAT and the parent (opened as a further layer, recursively); depth is
 * the layer's place in the chain. */
uint32_t vhdx_open(struct layer *layer, unsigned depth);

/* VhdxDisk.read_into, zeros past the virtual disk's end. */
uint32_t vhdx_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length);

#endif
