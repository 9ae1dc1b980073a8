/* vmdk in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md, "The
 * decoders").  Same checks in the same order, same messages byte for byte, same bytes. */
#ifndef AIODD_VMDK_GUEST_H
#define AIODD_VMDK_GUEST_H

#include "disk.h"

/* open_disk: a sparse file, or a descriptor and the extents it names (opened by the
 * host as plain files), and the parent (a further vmdk layer, recursively); depth is
 * the layer's place in the chain. */
uint32_t vmdk_open(struct layer *layer, unsigned depth);

/* VmdkDisk.read_into. */
uint32_t vmdk_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length);

#endif
