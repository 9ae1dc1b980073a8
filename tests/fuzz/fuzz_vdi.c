/* libFuzzer target: the KVM guest's vdi decoder, hosted (tests/fuzz/README.md).
 *
 * The input is the image, opened as vdi; a VDI names no other file, so the opener
 * refuses every request (one would be a decoder bug, and the run would say so).  Each
 * input is opened and its virtual disk read in a few commands of uneven lengths inside
 * the disk, each into a buffer of its exact size. */
#include "bundle.h"

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
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    bundle_one(data, size);
    read_bundle(AIODD_FMT_VDI, opener, 0);
    return 0;
}
