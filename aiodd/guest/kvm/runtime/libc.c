/* mem* and the heap.  Built with -fno-builtin -fno-tree-loop-distribute-patterns so that
 * gcc does not turn these loops back into calls to themselves. */
#include "runtime.h"

void *memcpy(void *restrict dst, const void *restrict src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
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

/* A bump heap in [AIODD_HEAP_BASE, AIODD_HEAP_BASE + AIODD_HEAP_SIZE).  Each block has a
 * 16-byte header holding its size; free() gives back the topmost block only (zlib and
 * zstd free in reverse order of allocation within a command), and the main loop resets
 * the heap to a mark after every command. */
#define HEADER 16u

static uintptr_t heap_top = AIODD_HEAP_BASE;

uintptr_t heap_mark(void) {
    return heap_top;
}

void heap_release(uintptr_t mark) {
    if (mark >= AIODD_HEAP_BASE && mark <= heap_top) {
        heap_top = mark;
    }
}

void *malloc(size_t n) {
    const uintptr_t end = AIODD_HEAP_BASE + AIODD_HEAP_SIZE;
    size_t room = (size_t)(end - heap_top);
    if (n > room || room - n < HEADER + 15u) {
        return NULL;
    }
    size_t size = (n + 15u) & ~(size_t)15u;
    uintptr_t block = heap_top + HEADER;
    *(size_t *)heap_top = size;
    heap_top = block + size;
    return (void *)block;
}

void *calloc(size_t count, size_t size) {
    if (size != 0 && count > SIZE_MAX / size) {
        return NULL;
    }
    void *p = malloc(count * size);
    if (p != NULL) {
        memset(p, 0, count * size);
    }
    return p;
}

void free(void *p) {
    if (p == NULL) {
        return;
    }
    uintptr_t block = (uintptr_t)p;
    uintptr_t header = block - HEADER;
    if (header >= AIODD_HEAP_BASE && block + *(size_t *)header == heap_top) {
        heap_top = header;
    }
}
