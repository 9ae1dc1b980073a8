/* qcow2 in the KVM guest: the twin of decode.py and layout.py (docs/kvm.md, "The
 * decoders").  Same checks in the same order, same messages byte for byte, same bytes. */
#ifndef AIODD_QCOW2_GUEST_H
#define AIODD_QCOW2_GUEST_H

#include "disk.h"

/* open_disk: the header, the L1 table, the data file and the backing file (opened as a
 * further layer, recursively); depth is the layer's place in the chain. */
uint32_t qcow2_open(struct layer *layer, unsigned depth);

/* Qcow2Disk.read_into. */
uint32_t qcow2_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                    uint64_t length);

#endif
