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

/* The codecs of compressed clusters, shared with qcow (version 1), whose clusters are
 * qcow2's zlib ones (aiodd/formats/qcow/guest.c). */
struct zlib_state;
enum inflated { INFLATED, CORRUPT, NO_MEMORY };

/* The command's cluster buffer and the codecs the open layers noted, made once. */
uint32_t prepare_codecs(struct reader *r);

/* zlib.decompressobj(-12).decompress(data, out_size) as CPython runs it; with `extra`,
 * one more byte there (it only tells "more than out_size"). */
enum inflated zlib_cluster(struct zlib_state *z, const unsigned char *data, uint64_t got,
                           unsigned char *out, uint64_t out_size, unsigned char *extra,
                           uint64_t *produced);

#endif
