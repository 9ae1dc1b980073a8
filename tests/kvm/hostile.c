/* A hostile guest, for tests/test_kvm.py only (never shipped): the runtime of the real
 * guest, with commands that misbehave on purpose.  Each command number is a behaviour. */
#include "runtime.h"

enum {
    NULL_WRITE = 0x201,
    WRITE_TEXT,
    SPIN,
    HEAP_COUNT,
    HEAP_NOMEM,
    READ_TOO_LONG,
    READ_BAD_HANDLE,
    READY_TOO_LONG,
    UNKNOWN_PORT,
    STACK_SMASH,
    WRITE_IN_WINDOW,
    WRITE_GDT,
    READ_PAGE_TABLES,
    STACK_OVERFLOW,
    HALT,
    UNKNOWN_REQUEST,
    EXEC_HEAP,
    WRITE_PAST_OUT,
};

static volatile uint64_t sink;

static __attribute__((noinline)) void smash(volatile size_t n) {
    char buffer[16];
    volatile char *p = buffer;
    for (size_t i = 0; i < n; i++) {
        p[i] = 'A';
    }
    sink = (uint64_t)buffer[0];
}

static __attribute__((noinline)) uint64_t recurse(uint64_t depth) {
    volatile char frame[512];
    frame[0] = (char)depth;
    if (depth == UINT64_MAX) { /* never: only there so gcc does not see the recursion */
        return 0;
    }
    return recurse(depth + 1) + frame[0];
}

/* One READV segment of `length` bytes of `handle` into IN. */
static uint64_t read_request(uint32_t handle, uint64_t length) {
    volatile struct aiodd_segment *segment = (volatile struct aiodd_segment *)AIODD_REQ_BASE;
    segment->handle = handle;
    segment->reserved = 0;
    segment->offset = 0;
    segment->length = length;
    segment->dest = AIODD_IN_BASE;
    segment->got = 0;
    struct aiodd_desc request = {AIODD_OP_READV, 0, 0, 1, 0, 0};
    return aiodd_ring(request).status;
}

void guest_main(void) {
    struct aiodd_desc ready = {AIODD_OP_READY, 0, 0, 0, 0, AIODD_OK};
    const uintptr_t empty = heap_mark();
    for (;;) {
        struct aiodd_desc cmd = aiodd_ring(ready);
        ready.length = 0;
        ready.status = AIODD_OK;
        switch (cmd.op) {
        case NULL_WRITE:
            *(volatile uint64_t *)(uintptr_t)cmd.offset = 1;
            break;
        case WRITE_TEXT:
            *(volatile uint8_t *)(uintptr_t)&guest_main = 0xC3;
            break;
        case SPIN:
            for (;;) {
                sink++;
            }
        case HEAP_COUNT: {
            uint64_t total = 0;
            while (malloc(cmd.length) != NULL) {
                total += cmd.length;
            }
            *(volatile uint64_t *)AIODD_OUT_BASE = total;
            ready.length = 8;
            break;
        }
        case HEAP_NOMEM:
            while (malloc(1 << 20) != NULL) {
            }
            ready.status = AIODD_E_NOMEM;
            break;
        case READ_TOO_LONG:
            sink = read_request(0, AIODD_IN_SIZE + 1);
            break;
        case READ_BAD_HANDLE:
            sink = read_request(cmd.handle, 16);
            break;
        case READY_TOO_LONG:
            ready.length = AIODD_OUT_SIZE + 1;
            break;
        case UNKNOWN_PORT:
            __asm__ volatile("outb %0, %1" : : "a"((uint8_t)0), "Nd"((uint16_t)cmd.offset));
            break;
        case STACK_SMASH:
            smash(64);
            break;
        case WRITE_IN_WINDOW:
            *(volatile uint8_t *)AIODD_IN_BASE = 1;
            break;
        case WRITE_GDT:
            *(volatile uint64_t *)0x1000 = 0;
            break;
        case READ_PAGE_TABLES:
            sink = *(volatile uint64_t *)0x4000;
            break;
        case STACK_OVERFLOW:
            sink = recurse(0);
            break;
        case HALT:
            __asm__ volatile("hlt");
            break;
        case UNKNOWN_REQUEST: {
            struct aiodd_desc request = {99, 0, 0, 0, 0, 0};
            sink = aiodd_ring(request).status;
            break;
        }
        case EXEC_HEAP: {
            volatile uint8_t *code = malloc(16);
            code[0] = 0xC3; /* ret */
            ((void (*)(void))(uintptr_t)code)();
            break;
        }
        case WRITE_PAST_OUT:
            *(volatile uint8_t *)(AIODD_OUT_BASE + AIODD_OUT_SIZE) = 1;
            break;
        default:
            ready.status = AIODD_E_REQUEST;
            break;
        }
        heap_release(empty);
    }
}
