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
#include <string.h>

#include "bundle.h"

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unbundle(data, size);
    read_bundle(probe(bundle.data[0], bundle.size[0]), opener, 100 /* a little past the end */);
    return 0;
}
