/* zlib's memory from a fixed pool (docs/kvm.md, "The heap").
 *
 * An inflater asks zlib for its state and window once, at inflateInit; a bump pool the
 * size of those blocks serves them, and nothing is given back: the pool goes with what
 * holds it (a command's scratch).  Set a stream's zalloc, zfree and opaque with
 * zpool_attach. */
#ifndef AIODD_ZPOOL_H
#define AIODD_ZPOOL_H

#include <stddef.h>
#include <zlib.h>

struct zpool {
    unsigned char *base;
    size_t size;
    size_t used;
};

static inline voidpf zpool_alloc(voidpf opaque, uInt items, uInt size) {
    struct zpool *pool = opaque;
    size_t n = ((size_t)items * size + 15u) & ~(size_t)15u;
    if (n > pool->size - pool->used) {
        return Z_NULL;
    }
    void *p = pool->base + pool->used;
    pool->used += n;
    return p;
}

static inline void zpool_free(voidpf opaque, voidpf address) {
    (void)opaque;
    (void)address;
}

/* A stream drawing on the `size` bytes at base. */
static inline void zpool_attach(z_stream *stream, struct zpool *pool, unsigned char *base,
                                size_t size) {
    *pool = (struct zpool){base, size, 0};
    stream->zalloc = zpool_alloc;
    stream->zfree = zpool_free;
    stream->opaque = pool;
}

#endif
