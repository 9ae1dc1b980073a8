/* The KVM guest's decoders, built natively (docs/kvm.md, "Testing the decoders"): host.h
 * served from memory, heap.h with one malloc per block (so AddressSanitizer knows every
 * block's bounds) under the guest's cap and accounting.
 *
 * The host side checks what the VMM checks: known handles, each destination inside IN
 * or inside the running command's output, offsets and lengths below 2^63.  A decoder
 * that breaks one aborts, which the fuzzer reports as a crash.
 *
 * A read into the command's output is put off to the command's end, as the VMM puts it
 * off (docs/kvm.md, "Reads the host finishes"): its bytes are filled with a pattern
 * meanwhile, and a decoder that wrote over them after asking for the read aborts too.
 * One that read them back reads the pattern, and its output differs from Python's.
 *
 * Used by the libFuzzer harnesses (fuzz_qcow2.c, fuzz_vmdk.c) and, as a shared library, by
 * tests/test_kvm_decoder*.py through ctypes (the hosted_* functions). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "disk.h"
#include "heap.h"
#include "host.h"
#include "hosted.h"

/* -- the heap ------------------------------------------------------------------------- */

static struct {
    void **blocks;
    size_t *costs;
    size_t depth;
    size_t capacity;
    size_t used;
    size_t limit;
    size_t peak;
} heap;

void heap_init(void *base, size_t size) {
    (void)base;
    heap_release(0);
    heap.limit = size;
}

void *heap_alloc(size_t n) {
    size_t room = heap.limit - heap.used;
    if (n > room || room - n < HEAP_HEADER + 15u) {
        return NULL;
    }
    if (heap.depth == heap.capacity) {
        size_t capacity = heap.capacity ? 2 * heap.capacity : 256;
        void **blocks = realloc(heap.blocks, capacity * sizeof *blocks);
        size_t *costs = realloc(heap.costs, capacity * sizeof *costs);
        if (blocks == NULL || costs == NULL) {
            abort();
        }
        heap.blocks = blocks;
        heap.costs = costs;
        heap.capacity = capacity;
    }
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        abort();
    }
    heap.blocks[heap.depth] = p;
    heap.costs[heap.depth] = HEAP_COST(n);
    heap.depth++;
    heap.used += HEAP_COST(n);
    if (heap.used > heap.peak) {
        heap.peak = heap.used;
    }
    return p;
}

static void pop(void) {
    heap.depth--;
    heap.used -= heap.costs[heap.depth];
    free(heap.blocks[heap.depth]);
}

void heap_free(void *p) {
    if (p != NULL && heap.depth > 0 && heap.blocks[heap.depth - 1] == p) {
        pop();
    }
}

uintptr_t heap_mark(void) {
    return heap.used;
}

void heap_release(uintptr_t mark) {
    while (heap.depth > 0 && heap.used > mark) {
        pop();
    }
}

/* -- the files ------------------------------------------------------------------------ */

#define MAX_FILES 8192  /* a vmdk descriptor names up to 4096 extents */

static struct {
    const unsigned char *data[MAX_FILES];
    uint64_t size[MAX_FILES];
    uint32_t count;
    unsigned char *in;
    const unsigned char *out;  /* the running command's output */
    uint64_t out_length;
    hosted_opener opener;
    uint64_t doorbells;
    uintptr_t opened;
    struct host_segment *deferred;  /* the output's reads, put off to the command's end */
    size_t deferred_count;
    size_t deferred_capacity;
} host;

static void check(int ok, const char *what) {
    if (!ok) {
        fprintf(stderr, "hosted: the decoder broke the host contract: %s\n", what);
        abort();
    }
}

unsigned char *host_in(void) {
    if (host.in == NULL) {
        host.in = malloc(AIODD_IN_SIZE);
        check(host.in != NULL, "no memory for IN");
    }
    return host.in;
}

_Noreturn void host_fault(void) {
    fprintf(stderr, "hosted: host_fault\n");
    abort();
}

static int inside(const unsigned char *p, uint64_t length, const unsigned char *base,
                  uint64_t size) {
    return p >= base && (uint64_t)(p - base) <= size && length <= size - (uint64_t)(p - base);
}

/* The pattern a put-off read's bytes hold until the command ends: position-dependent, so
 * that no decoder writes it by chance (zeros, a copy of other bytes). */
static unsigned char pattern(const unsigned char *p) {
    uintptr_t x = (uintptr_t)p;
    x ^= x >> 7;
    x *= 0x9E3779B97F4A7C15ULL;
    return (unsigned char)((x >> 56) | 1u);
}

static void defer(const struct host_segment *s) {
    if (host.deferred_count == host.deferred_capacity) {
        size_t capacity = host.deferred_capacity ? 2 * host.deferred_capacity : 64;
        struct host_segment *grown = realloc(host.deferred, capacity * sizeof *grown);
        check(grown != NULL, "no memory for the put-off reads");
        host.deferred = grown;
        host.deferred_capacity = capacity;
    }
    host.deferred[host.deferred_count++] = *s;
    for (uint64_t i = 0; i < s->got; i++) {
        s->dest[i] = pattern(s->dest + i);
    }
}

/* The command ended: every put-off read's bytes still hold the pattern (the decoder kept
 * off them), then the reads are made, in the order asked. */
static void finish_deferred(void) {
    for (size_t k = 0; k < host.deferred_count; k++) {
        const struct host_segment *s = &host.deferred[k];
        for (uint64_t i = 0; i < s->got; i++) {
            /* A later read over the same bytes (a parent's, then its child's) wrote the
             * same pattern: only the decoder's own writes show. */
            check(s->dest[i] == pattern(s->dest + i),
                  "a write into the output's bytes a read was put off for");
        }
    }
    for (size_t k = 0; k < host.deferred_count; k++) {
        const struct host_segment *s = &host.deferred[k];
        memcpy(s->dest, host.data[s->handle] + s->offset, (size_t)s->got);
    }
    host.deferred_count = 0;
}

uint32_t host_readv(struct host_segment *segments, size_t count) {
    host.doorbells += (count + AIODD_MAX_SEGMENTS - 1) / AIODD_MAX_SEGMENTS;
    for (size_t i = 0; i < count; i++) {
        struct host_segment *s = &segments[i];
        check(s->handle < host.count, "a read from a handle the host did not give");
        check(s->offset <= INT64_MAX_U && s->length <= INT64_MAX_U - s->offset,
              "a read past 2^63");
        check(inside(s->dest, s->length, host_in(), AIODD_IN_SIZE) ||
                  (host.out != NULL && inside(s->dest, s->length, host.out, host.out_length)),
              "a read into memory outside IN and the command's output");
        uint64_t size = host.size[s->handle];
        uint64_t got = s->offset < size ? size - s->offset : 0;
        got = got < s->length ? got : s->length;
        s->got = got;
        if (got > 0 && host.out != NULL && inside(s->dest, s->length, host.out, host.out_length)) {
            defer(s);
        } else if (got > 0) {
            memcpy(s->dest, host.data[s->handle] + s->offset, (size_t)got);
        }
    }
    return AIODD_OK;
}

uint32_t host_open(uint32_t referrer, uint32_t kind, const char *name, size_t name_length,
                   const char *format, size_t format_length, struct host_file *file) {
    host.doorbells++;
    check(referrer < host.count, "an open for a handle the host did not give");
    check(kind == AIODD_REF_BACKING || kind == AIODD_REF_DATA_FILE || kind == AIODD_REF_EXTENT ||
              kind == AIODD_REF_PARENT,
          "an unknown reference kind");
    check(name_length + format_length + sizeof(struct aiodd_open_req) <= AIODD_REQ_SIZE,
          "an open request larger than REQ");
    if (host.opener == NULL) {
        return AIODD_E_REFUSED;
    }
    uint32_t handle = 0;
    uint64_t size = 0;
    uint32_t fmt = 0;
    uint32_t status =
        host.opener(referrer, kind, name, name_length, format, format_length, &handle, &size, &fmt);
    if (status != AIODD_OK) {
        return AIODD_E_REFUSED;
    }
    check(handle < host.count && size == host.size[handle], "the opener gave an unknown file");
    file->handle = handle;
    file->size = size;
    file->format = fmt;
    return AIODD_OK;
}

/* -- the harness's API ---------------------------------------------------------------- */

void hosted_reset(void) {
    disk_close();
    heap_init(NULL, AIODD_HEAP_SIZE);
    heap.peak = 0;
    host.count = 0;
    host.opener = NULL;
    host.out = NULL;
    host.doorbells = 0;
    host.opened = heap_mark();
}

uint32_t hosted_add_file(const unsigned char *data, uint64_t size) {
    check(host.count < MAX_FILES, "too many files");
    host.data[host.count] = data;
    host.size[host.count] = size;
    return host.count++;
}

void hosted_set_opener(hosted_opener opener) {
    host.opener = opener;
}

uint32_t hosted_open(uint32_t format, uint64_t *virtual_size) {
    heap_release(0);
    check(host.count > 0, "no file 0");
    uint32_t status = disk_open(format, host.size[0], virtual_size);
    host.opened = status == AIODD_OK ? heap_mark() : 0;
    heap_release(host.opened);
    return status;
}

uint32_t hosted_read(uint64_t offset, unsigned char *dest, uint64_t length) {
    if (!disk_is_open() || offset > UINT64_MAX - length) {
        return AIODD_E_REQUEST;
    }
    host.out = dest;
    host.out_length = length;
    host.deferred_count = 0;
    uint32_t status = disk_read(offset, dest, length);
    finish_deferred();
    host.out = NULL;
    heap_release(host.opened);
    return status;
}

uint32_t hosted_write_after_read(unsigned char *dest, int overwrite, unsigned char *seen) {
    check(host.count > 0 && host.size[0] > 0, "no byte in file 0");
    host.out = dest;
    host.out_length = 1;
    host.deferred_count = 0;
    struct host_segment segment = {0, 0, 1, dest, 0};
    uint32_t status = host_readv(&segment, 1);
    *seen = dest[0];
    if (overwrite) {
        dest[0] = 0;
    }
    finish_deferred();
    host.out = NULL;
    return status;
}

const char *hosted_error(uint64_t *length, uint32_t *layer) {
    size_t n;
    const char *message = host_error_message(&n, layer);
    *length = n;
    return message;
}

uint64_t hosted_doorbells(void) {
    return host.doorbells;
}

uint64_t hosted_heap_peak(void) {
    return heap.peak;
}
