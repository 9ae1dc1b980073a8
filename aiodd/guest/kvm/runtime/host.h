/* The services a decoder asks of the host: reading files, opening the files an image
 * names, and reporting why an image is refused (docs/kvm.md, "The decoders").
 *
 * Two implementations: host.c rings the doorbell (the guest), tests/fuzz/hosted.c
 * serves files from memory (the native build the fuzzer and the differential tests
 * use).  The decoders see nothing else of either, so the same sources build for both.
 * Every answer is checked before it is used: an answer that breaks the contract is the
 * host's fault (host_fault), never trusted. */
#ifndef AIODD_HOST_H
#define AIODD_HOST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "abi.h"

#ifdef AIODD_HOSTED
#include <string.h>
#else
void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
#endif

/* One read: `length` bytes of file `handle` at `offset` into `dest`.  host_readv sets
 * `got`, less than `length` only where the file ends. */
struct host_segment {
    uint32_t handle;
    uint64_t offset;
    uint64_t length;
    unsigned char *dest;
    uint64_t got;
};

/* Read `count` segments (any number: more than AIODD_MAX_SEGMENTS go in several
 * doorbells).  Each `dest` lies in the IN window (host_in) or in the running command's
 * output.  Returns AIODD_OK, or AIODD_E_IO when the host could not read a file. */
uint32_t host_readv(struct host_segment *segments, size_t count);

/* The IN window: AIODD_IN_SIZE bytes the host writes and the decoder only reads. */
unsigned char *host_in(void);

/* A file the host opened for the decoder. */
struct host_file {
    uint32_t handle;
    uint32_t format;  /* AIODD_FMT_*: NONE for a data file, a layer format (disk.h) */
    uint64_t size;    /* at most INT64_MAX */
};

/* Open the file `name` that layer `referrer` names as `kind` (AIODD_REF_*), `format`
 * the format the image declares for it (empty: none).  Returns AIODD_OK, or
 * AIODD_E_REFUSED when the host will not (its reason stays on the host; the decoder
 * ends the command with this status). */
uint32_t host_open(uint32_t referrer, uint32_t kind, const char *name, size_t name_length,
                   const char *format, size_t format_length, struct host_file *file);

/* The host broke the contract: the guest stops (AIODD_FAULT_ABI), the hosted build
 * aborts. */
_Noreturn void host_fault(void);

/* Record why the image is refused: `status` AIODD_E_IMAGE (an ImageError) or
 * AIODD_E_UNSUPPORTED (an UnsupportedImageError) about the file of handle `layer`,
 * the message formatted from `format` (report.c says which conversions it knows).
 * Returns `status`, for `return host_error(...)`.  A later error replaces it. */
uint32_t host_error(uint32_t status, uint32_t layer, const char *format, ...)
    __attribute__((format(printf, 3, 4)));
uint32_t host_verror(uint32_t status, uint32_t layer, const char *format, va_list args)
    __attribute__((format(printf, 3, 0)));

/* The error last recorded: its message (not NUL-terminated), length and layer. */
const char *host_error_message(size_t *length, uint32_t *layer);

/* The formatter behind host_error, into buf[0:capacity); returns the length written
 * (the text is cut at capacity).  Python's formats, not C's: '#' always prefixes "0x",
 * zero too, and the width counts it, as f"{x:#018x}" does. */
size_t aiodd_vformat(char *buf, size_t capacity, const char *format, va_list args)
    __attribute__((format(printf, 3, 0)));

#endif
