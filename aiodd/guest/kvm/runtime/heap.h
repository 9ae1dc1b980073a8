/* The heap: one bump allocator with a hard cap (docs/kvm.md, "The heap").
 *
 * Blocks are 16-byte aligned and cost a 16-byte header.  heap_free() gives back the
 * topmost block only; anything else waits for heap_release(), which drops every block
 * allocated after a mark.  The guest keeps what an open image needs (its layers, L1
 * tables, the table cache) below a mark taken after CMD_OPEN, and releases the
 * per-command scratch above it after every command.
 *
 * The guest's implementation is heap.c over the heap region; the hosted build
 * (tests/fuzz/) gives every block its own malloc, with the same accounting, so that
 * AddressSanitizer sees each block's bounds. */
#ifndef AIODD_HEAP_H
#define AIODD_HEAP_H

#include <stddef.h>
#include <stdint.h>

/* What one block of n bytes costs of the cap. */
#define HEAP_HEADER 16u
#define HEAP_COST(n) (HEAP_HEADER + (((n) + 15u) & ~(size_t)15u))

void heap_init(void *base, size_t size);
void *heap_alloc(size_t n);  /* NULL when the block would pass the cap */
void heap_free(void *p);
uintptr_t heap_mark(void);
void heap_release(uintptr_t mark);

#endif
