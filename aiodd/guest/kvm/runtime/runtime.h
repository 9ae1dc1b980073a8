/* The guest runtime: what a freestanding decoder has instead of a libc. */
#ifndef AIODD_KVM_RUNTIME_H
#define AIODD_KVM_RUNTIME_H

#include <stddef.h>
#include <stdint.h>

#include "abi.h"
#include "heap.h"

void *memcpy(void *restrict dst, const void *restrict src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

void *malloc(size_t n);
void *calloc(size_t count, size_t size);
void free(void *p);

/* Ring the doorbell with `request`; returns the host's answer, copied once. */
struct aiodd_desc aiodd_ring(struct aiodd_desc request);

/* Stop the guest: the host sees fault `code` (one of AIODD_FAULT_*). */
_Noreturn void aiodd_fault(uint8_t code);

/* The program: called once, with an empty heap over the heap region; must not return. */
void guest_main(void);

#endif
