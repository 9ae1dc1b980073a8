/* libFuzzer target: the KVM guest's vpc decoder, hosted (tests/fuzz/README.md).
 *
 * The input is an image, or a bundle of files as fuzz_qcow2.c reads one: "AIODDFZ1"
 * then, per file, a 32-bit little-endian length and the bytes.  The first file is the
 * image, opened as vpc (a fixed VHD too: the footer only at the end); the n-th file
 * the decoder asks for (a parent) is file n, probed as the host probes it: vpc when it
 * starts with "conectix", qcow2 when it starts like one, raw otherwise.
 *
 * Each input is opened and its virtual disk read in a few commands of uneven lengths
 * inside the disk, each into a buffer of its exact size. */
#include <string.h>

#include "bundle.h"

static uint32_t probe(const uint8_t *data, uint64_t size) {
    if (size >= 8 && memcmp(data, "conectix", 8) == 0) {
        return AIODD_FMT_VPC;
    }
    if (size >= 8 && memcmp(data, "QFI\xfb", 4) == 0 &&
        ((uint32_t)data[4] << 24 | (uint32_t)data[5] << 16 | (uint32_t)data[6] << 8 | data[7]) >= 2) {
        return AIODD_FMT_QCOW2;
    }
    return AIODD_FMT_RAW;
}

static uint32_t opener(uint32_t referrer, uint32_t kind, const char *name, uint64_t name_length,
                       const char *format, uint64_t format_length, uint32_t *handle,
                       uint64_t *size, uint32_t *format_code) {
    (void)referrer;
    (void)name;
    (void)name_length;
    (void)format;
    if (bundle.next >= bundle.count || format_length != 0) {
        return AIODD_E_REFUSED;
    }
    uint32_t n = bundle.next++;
    *format_code = kind == AIODD_REF_DATA_FILE ? AIODD_FMT_NONE : probe(bundle.data[n], bundle.size[n]);
    *handle = n;
    *size = bundle.size[n];
    return AIODD_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    unbundle(data, size);
    read_bundle(AIODD_FMT_VPC, opener, 0);
    return 0;
}
