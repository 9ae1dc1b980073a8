/* libFuzzer target: the KVM guest's parallels decoder, hosted (tests/fuzz/README.md).
 *
 * The input is an image, opened as parallels; it names no other file, so every open
 * request is refused.  Each input is opened and its virtual disk read in a few commands
 * of uneven lengths inside the disk, each into a buffer of its exact size, then its
 * last MiB. */
#include <stdlib.h>

#include "abi.h"
#include "hosted.h"

#define READ_LIMIT (3u << 20)

static uint32_t opener(uint32_t referrer, uint32_t kind, const char *name, uint64_t name_length,
                       const char *format, uint64_t format_length, uint32_t *handle,
                       uint64_t *size, uint32_t *format_code) {
    (void)referrer;
    (void)kind;
    (void)name;
    (void)name_length;
    (void)format;
    (void)format_length;
    (void)handle;
    (void)size;
    (void)format_code;
    return AIODD_E_REFUSED;
}

static void read_range(uint64_t offset, uint64_t length) {
    unsigned char *buf = malloc(length ? length : 1);
    if (buf == NULL) {
        abort();
    }
    hosted_read(offset, buf, length);
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    hosted_reset();
    hosted_add_file(data, size);
    hosted_set_opener(opener);
    uint64_t virtual_size = 0;
    if (hosted_open(AIODD_FMT_PARALLELS, &virtual_size) != AIODD_OK) {
        return 0;
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
        read_range(virtual_size - tail, tail);
    }
    hosted_reset();
    return 0;
}
