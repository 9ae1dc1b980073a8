/* What the libFuzzer targets (fuzz_*.c) share: an input's files, and the reads that
 * open and read its image (README.md, "An input").
 *
 * An input is an image, or, for the targets of formats that name other files, a bundle:
 * "AIODDFZ1" then, per file, a 32-bit little-endian length and the bytes.  The first
 * file is the image; the n-th file the decoder asks for is file n (bundle.next). */
#ifndef AIODD_FUZZ_BUNDLE_H
#define AIODD_FUZZ_BUNDLE_H

#include <stdlib.h>
#include <string.h>

#include "abi.h"
#include "hosted.h"

#define BUNDLE "AIODDFZ1"
#define MAX_BUNDLED 16
#define READ_LIMIT (3u << 20)

static struct {
    const uint8_t *data[MAX_BUNDLED];
    uint64_t size[MAX_BUNDLED];
    uint32_t count;
    uint32_t next;
} bundle;

/* The input as the one file of an image that names none. */
static inline void bundle_one(const uint8_t *data, size_t size) {
    bundle.data[0] = data;
    bundle.size[0] = size;
    bundle.count = 1;
    bundle.next = 1;
}

/* The input's files: a bundle's, cut at the input's end, or the input itself. */
static inline void unbundle(const uint8_t *data, size_t size) {
    if (size < 8 || memcmp(data, BUNDLE, 8) != 0) {
        bundle_one(data, size);
        return;
    }
    bundle.count = 0;
    bundle.next = 1;
    size_t pos = 8;
    while (bundle.count < MAX_BUNDLED && size - pos >= 4) {
        uint32_t n = (uint32_t)data[pos] | (uint32_t)data[pos + 1] << 8 |
                     (uint32_t)data[pos + 2] << 16 | (uint32_t)data[pos + 3] << 24;
        pos += 4;
        n = n < size - pos ? n : (uint32_t)(size - pos);
        bundle.data[bundle.count] = data + pos;
        bundle.size[bundle.count] = n;
        bundle.count++;
        pos += n;
    }
    if (bundle.count == 0) {
        bundle_one(data, 0);
    }
}

/* Each read into a buffer of its exact size, so that the sanitizers see any overrun. */
static inline void read_range(uint64_t offset, uint64_t length) {
    unsigned char *buf = malloc(length ? length : 1);
    if (buf == NULL) {
        abort();
    }
    hosted_read(offset, buf, length);
    free(buf);
}

/* The bundle's files opened through ``opener``, file 0 as ``format``, and its virtual
 * disk read: the first READ_LIMIT bytes in uneven chunks, then the last MiB and
 * ``past_end`` bytes more. */
static inline void read_bundle(uint32_t format, hosted_opener opener, uint64_t past_end) {
    hosted_reset();
    for (uint32_t i = 0; i < bundle.count; i++) {
        hosted_add_file(bundle.data[i], bundle.size[i]);
    }
    hosted_set_opener(opener);
    uint64_t virtual_size = 0;
    if (hosted_open(format, &virtual_size) != AIODD_OK) {
        return;
    }
    uint64_t limit = virtual_size < READ_LIMIT ? virtual_size : READ_LIMIT;
    static const uint64_t chunks[] = {1, 4095, 65536 + 7, 1u << 20};
    uint64_t offset = 0;
    for (unsigned i = 0; offset < limit; i = (i + 1) % 4) {
        uint64_t n = chunks[i] < limit - offset ? chunks[i] : limit - offset;
        read_range(offset, n);
        offset += n;
    }
    if (virtual_size > limit) {
        uint64_t tail = virtual_size - limit < (1u << 20) ? virtual_size - limit : (1u << 20);
        read_range(virtual_size - tail, tail + past_end);
    }
    hosted_reset();
}

#endif
