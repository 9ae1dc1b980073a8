/* QED in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md,
 * "The decoders").  Same checks in the same order, same messages byte for byte, same
 * bytes. */
#ifndef AIODD_QED_GUEST_H
#define AIODD_QED_GUEST_H

#include "disk.h"

/* open_disk: the header, the L1 table and the backing file (a further layer). */
uint32_t qed_open(struct layer *layer, unsigned depth);

/* QedDisk.read_into. */
uint32_t qed_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length);

#endif
