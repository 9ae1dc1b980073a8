/* libFuzzer target: the KVM guest's vmdk decoder, hosted (tests/fuzz/README.md).
 *
 * The input is an image, or a bundle of files: "AIODDFZ1" then, per file, a 32-bit
 * little-endian length and the bytes.  The first file is the image, read as vmdk; the
 * n-th file the decoder asks for (an extent, a parent) is file n.  An extent is a plain
 * file, a parent is vmdk (as the image declares it).
 *
 * Each input is opened and its virtual disk read in a few commands: the start in
 * uneven chunks, then the end, each into a buffer of its exact size. */
#include "bundle.h"

static uint32_t opener(uint32_t referrer, uint32_t kind, const char *name, uint64_t name_length,
                       const char *format, uint64_t format_length, uint32_t *handle,
                       uint64_t *size, uint32_t *format_code) {
    (void)referrer;
    (void)name;
    (void)name_length;
    (void)format;
    (void)format_length;
    if (bundle.next >= bundle.count) {
        return AIODD_E_REFUSED;
    }
    uint32_t n = bundle.next++;
    if (kind == AIODD_REF_EXTENT) {
        *format_code = AIODD_FMT_NONE;
    } else if (kind == AIODD_REF_PARENT) {
        *format_code = AIODD_FMT_VMDK;
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
    read_bundle(AIODD_FMT_VMDK, opener, 100 /* a little past the end */);
    return 0;
}
