/* vpc (VHD) in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md, "The
 * decoders").  Same checks in the same order, same messages byte for byte, same bytes. */
#ifndef AIODD_VPC_GUEST_H
#define AIODD_VPC_GUEST_H

#include "disk.h"

/* open_disk: the footer (at offset 0, or only at the end: a fixed disk), the dynamic
 * header, the BAT, and for a differencing disk the parent its locator names (opened as
 * a further layer, recursively); depth is the layer's place in the chain. */
uint32_t vpc_open(struct layer *layer, unsigned depth);

/* FixedVpcDisk.read_into and DynamicVpcDisk.read_into, zeros past the virtual size. */
uint32_t vpc_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length);

#endif
