/* The guest's heap: a bump allocator over one region (heap.h). */
#include "heap.h"

static uintptr_t heap_base;
static uintptr_t heap_top;
static uintptr_t heap_end;

void heap_init(void *base, size_t size) {
    heap_base = (uintptr_t)base;
    heap_top = heap_base;
    heap_end = heap_base + size;
}

uintptr_t heap_mark(void) {
    return heap_top;
}

void heap_release(uintptr_t mark) {
    if (mark >= heap_base && mark <= heap_top) {
        heap_top = mark;
    }
}

void *heap_alloc(size_t n) {
    size_t room = (size_t)(heap_end - heap_top);
    if (n > room || room - n < HEAP_HEADER + 15u) {
        return NULL;
    }
    size_t size = (n + 15u) & ~(size_t)15u;
    uintptr_t block = heap_top + HEAP_HEADER;
    *(size_t *)heap_top = size;
    heap_top = block + size;
    return (void *)block;
}

void heap_free(void *p) {
    if (p == NULL) {
        return;
    }
    uintptr_t block = (uintptr_t)p;
    uintptr_t header = block - HEAP_HEADER;
    if (header >= heap_base && block + *(size_t *)header == heap_top) {
        heap_top = header;
    }
}
