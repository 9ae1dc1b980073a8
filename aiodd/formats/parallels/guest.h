/* parallels in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md, "The
 * decoders").  Same checks in the same order, same messages byte for byte, same bytes. */
#ifndef AIODD_PARALLELS_GUEST_H
#define AIODD_PARALLELS_GUEST_H

#include "disk.h"

/* open_disk: the header, the BAT's and data area's places; the BAT, held when the
 * budget allows. */
uint32_t parallels_open(struct layer *layer);

/* ParallelsDisk.read_into, zeros past the virtual size; each cluster it reaches checked
 * (layout.cluster_at). */
uint32_t parallels_read(struct reader *r, struct layer *layer, uint64_t offset,
                        unsigned char *dest, uint64_t length);

#endif
