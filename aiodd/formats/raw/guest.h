/* raw in the KVM guest: the twin of decode.py (docs/kvm.md, "The decoders"). */
#ifndef AIODD_RAW_GUEST_H
#define AIODD_RAW_GUEST_H

#include "disk.h"

uint32_t raw_open(struct layer *layer);
uint32_t raw_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length);

#endif
