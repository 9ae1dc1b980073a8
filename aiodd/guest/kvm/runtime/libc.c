/* mem* and malloc.  Built with -fno-builtin -fno-tree-loop-distribute-patterns so that
 * gcc does not turn these loops back into calls to themselves. */
#include "runtime.h"

/* Past a few dozen bytes `rep movsb` and `rep stosb` are the fastest copy and fill on
 * every CPU with ERMS, which is every one KVM runs on; they move whole cache lines. */
#define REP_THRESHOLD 64u

void *memcpy(void *restrict dst, const void *restrict src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (n >= REP_THRESHOLD) {
        __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
        return dst;
    }
    while (n >= 8) {
        uint64_t w;
        __builtin_memcpy(&w, s, 8);  /* one unaligned 8-byte move, inlined */
        __builtin_memcpy(d, &w, 8);
        d += 8;
        s += 8;
        n -= 8;
    }
    while (n--) {
        *d++ = *s++;
    }
    return dst;
}

void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d == s || n == 0) {
        return dst;
    }
    if ((uintptr_t)d < (uintptr_t)s || (uintptr_t)d >= (uintptr_t)s + n) {
        while (n--) {
            *d++ = *s++;
        }
    } else {
        while (n--) {
            d[n] = s[n];
        }
    }
    return dst;
}

void *memset(void *dst, int c, size_t n) {
    unsigned char *d = dst;
    if (n >= REP_THRESHOLD) {
        __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"((unsigned char)c) : "memory");
        return dst;
    }
    while (n--) {
        *d++ = (unsigned char)c;
    }
    return dst;
}

int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = a;
    const unsigned char *y = b;
    for (size_t i = 0; i < n; i++) {
        if (x[i] != y[i]) {
            return x[i] < y[i] ? -1 : 1;
        }
    }
    return 0;
}

/* zlib's and zstd's own allocations, for the CMD_ZLIB and CMD_ZSTD smoke commands; the
 * decoders pass their allocators explicitly. */
void *malloc(size_t n) {
    return heap_alloc(n);
}

void *calloc(size_t count, size_t size) {
    if (size != 0 && count > SIZE_MAX / size) {
        return NULL;
    }
    void *p = heap_alloc(count * size);
    if (p != NULL) {
        memset(p, 0, count * size);
    }
    return p;
}

void free(void *p) {
    heap_free(p);
}
