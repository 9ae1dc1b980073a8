/* libFuzzer target: the KVM guest's decoders, hosted (tests/fuzz/README.md).
 *
 * The input is an image, or a bundle of files: "AIODDFZ1" then, per file, a 32-bit
 * little-endian length and the bytes.  The first file is the image; the n-th file the
 * decoder asks for (a backing file, a data file, a vhdx parent) is file n.  A backing
 * file declared raw, qcow2, qcow or qed is that; undeclared (a parent always), it is
 * qcow2, vhdx, qcow or qed when it starts like one (the probe), raw otherwise; declared
 * as anything else it is refused, as the host would.  The image itself is probed too.
 *
 * Each input is opened and its virtual disk read in a few commands: the start in
 * uneven chunks, then the end, each into a buffer of its exact size. */
#include <stdlib.h>
#include <string.h>

#include "hosted.h"
#include "abi.h"

#define BUNDLE "AIODDFZ1"
#define MAX_BUNDLED 16
#define READ_LIMIT (3u << 20)

static struct {
    const uint8_t *data[MAX_BUNDLED];
    uint64_t size[MAX_BUNDLED];
    uint32_t count;
    uint32_t next;
} bundle;

static uint32_t probe(const uint8_t *data, uint64_t size) {
    if (size >= 8 && memcmp(data, "vhdxfile", 8) == 0) {
        return AIODD_FMT_VHDX;
    }
    if (size >= 8 && memcmp(data, "QFI\xfb", 4) == 0) {
        uint32_t version = (uint32_t)data[4] << 24 | (uint32_t)data[5] << 16 |
                           (uint32_t)data[6] << 8 | data[7];
        if (version >= 2) {
            return AIODD_FMT_QCOW2;
        }
        if (version == 1 && size >= 48) {
            return AIODD_FMT_QCOW;
        }
    }
    if (size >= 64 && memcmp(data, "QED\0", 4) == 0) {
        return AIODD_FMT_QED;
    }
    return AIODD_FMT_RAW;
}

static int named(const char *format, uint64_t length, const char *name) {
    return strlen(name) == length && memcmp(format, name, length) == 0;
}

static uint32_t opener(uint32_t referrer, uint32_t kind, const char *name, uint64_t name_length,
                       const char *format, uint64_t format_length, uint32_t *handle,
                       uint64_t *size, uint32_t *format_code) {
    (void)referrer;
    (void)name;
    (void)name_length;
    if (bundle.next >= bundle.count) {
        return AIODD_E_REFUSED;
    }
    uint32_t n = bundle.next++;
    if (kind == AIODD_REF_DATA_FILE) {
        *format_code = AIODD_FMT_NONE;
    } else if (format_length == 0) {
        *format_code = probe(bundle.data[n], bundle.size[n]);
    } else if (named(format, format_length, "raw")) {
        *format_code = AIODD_FMT_RAW;
    } else if (named(format, format_length, "qcow2")) {
        *format_code = AIODD_FMT_QCOW2;
    } else if (named(format, format_length, "qcow")) {
        *format_code = AIODD_FMT_QCOW;
    } else if (named(format, format_length, "qed")) {
        *format_code = AIODD_FMT_QED;
    } else {
        return AIODD_E_REFUSED;
    }
    *handle = n;
    *size = bundle.size[n];
    return AIODD_OK;
}

static void unbundle(const uint8_t *data, size_t size) {
    bundle.count = 0;
    bundle.next = 1;
    if (size < 8 || memcmp(data, BUNDLE, 8) != 0) {
        bundle.data[0] = data;
        bundle.size[0] = size;
        bundle.count = 1;
        return;
    }
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
        bundle.data[0] = data;
        bundle.size[0] = 0;
        bundle.count = 1;
    }
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
    unbundle(data, size);
    hosted_reset();
    for (uint32_t i = 0; i < bundle.count; i++) {
        hosted_add_file(bundle.data[i], bundle.size[i]);
    }
    hosted_set_opener(opener);
    uint64_t virtual_size = 0;
    if (hosted_open(probe(bundle.data[0], bundle.size[0]), &virtual_size) != AIODD_OK) {
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
        read_range(virtual_size - tail, tail + 100);  /* and a little past the end */
    }
    hosted_reset();
    return 0;
}
