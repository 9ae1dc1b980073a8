/* raw in the KVM guest: the file is the disk (decode.py, layout.py). */
#include "raw/guest.h"

uint32_t raw_open(struct layer *layer) {
    /* layout.virtual_size: the file rounded up to a sector, the tail reads as zeros */
    layer->virtual_size = (layer->file_size + 511u) & ~(uint64_t)511u;
    return AIODD_OK;
}

uint32_t raw_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length) {
    return reader_data(r, layer->handle, layer->file_size, offset, dest, length);
}
