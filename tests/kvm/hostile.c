/* A hostile guest, for tests/test_kvm.py and tests/test_kvm_reader.py only (never
 * shipped): the runtime of the real guest, with commands that misbehave on purpose.  Each
 * command number is a behaviour; RING sends whatever request the host put in IN, and
 * CMD_OPEN runs a script from the image, so the tests can write any request in Python. */
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
    RING,
    EXEC_AT,
};

/* A scripted image starts with this, then a u64 count of requests, each a u64 body
 * length, a struct aiodd_desc and its REQ body. */
static const char script_magic[8] = "AIODDRNG";

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

static uint64_t readv1(uint32_t handle, uint64_t offset, uint64_t length, uint64_t dest,
                       uint64_t *got) {
    volatile struct aiodd_segment *req = (volatile struct aiodd_segment *)AIODD_REQ_BASE;
    req->handle = handle;
    req->reserved = 0;
    req->offset = offset;
    req->length = length;
    req->dest = dest;
    req->got = 0;
    struct aiodd_desc request = {AIODD_OP_READV, 0, 0, 1, 0, 0};
    uint64_t status = aiodd_ring(request).status;
    *got = req->got;
    return status;
}

static uint64_t read_request(uint32_t handle, uint64_t length) {
    uint64_t got;
    return readv1(handle, 0, length, AIODD_IN_BASE, &got);
}

/* CMD_OPEN: run the image's script if it has one, else answer with the format and size
 * the host gave (virtual size = format << 40 | file size), so tests can see them. */
static void scripted_open(const struct aiodd_desc *cmd, struct aiodd_desc *ready) {
    const unsigned char *in = (const unsigned char *)AIODD_IN_BASE;
    uint64_t want = cmd->length < AIODD_IN_SIZE ? cmd->length : AIODD_IN_SIZE;
    uint64_t got = 0;
    if (readv1(0, 0, want, AIODD_IN_BASE, &got) != AIODD_OK) {
        ready->status = AIODD_E_IO;
        return;
    }
    if (got < 16 || memcmp(in, script_magic, sizeof script_magic) != 0) {
        ready->length = cmd->offset << 40 | cmd->length;
        return;
    }
    uint64_t count;
    memcpy(&count, in + 8, 8);
    uint64_t at = 16;
    struct aiodd_desc answer = {0, 0, 0, 0, 0, 0};
    for (uint64_t i = 0; i < count; i++) {
        uint64_t body;
        struct aiodd_desc request;
        memcpy(&body, in + at, 8);
        memcpy(&request, in + at + 8, sizeof request);
        memcpy((void *)AIODD_REQ_BASE, in + at + 8 + sizeof request, (size_t)body);
        at += 8 + sizeof request + body;
        if (request.op == AIODD_OP_READY) {
            *ready = request;
            return;
        }
        answer = aiodd_ring(request);
        if (answer.status != AIODD_OK) {
            ready->status = answer.status;
            return;
        }
    }
    ready->length = (uint64_t)answer.handle << 48 | answer.length << 40 | answer.offset;
}

void guest_main(void) {
    struct aiodd_desc ready = {AIODD_OP_READY, 0, 0, 0, 0, AIODD_OK};
    const uintptr_t empty = heap_mark();
    for (;;) {
        struct aiodd_desc cmd = aiodd_ring(ready);
        ready.op = AIODD_OP_READY;
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
        case RING: {
            /* IN: a struct aiodd_desc, then cmd.length bytes for REQ.  A READY ends the
             * command with it; any other request is rung, and OUT gets the answer and
             * REQ as the host left it. */
            struct aiodd_desc request;
            unsigned char *out = (unsigned char *)AIODD_OUT_BASE;
            uint64_t body = cmd.length < AIODD_REQ_SIZE ? cmd.length : AIODD_REQ_SIZE;
            memcpy(&request, (const void *)AIODD_IN_BASE, sizeof request);
            memcpy((void *)AIODD_REQ_BASE, (const unsigned char *)AIODD_IN_BASE + sizeof request,
                   (size_t)body);
            if (request.op == AIODD_OP_READY) {
                ready = request;
                break;
            }
            struct aiodd_desc answer = aiodd_ring(request);
            memcpy(out, &answer, sizeof answer);
            memcpy(out + sizeof answer, (const void *)AIODD_REQ_BASE, AIODD_REQ_SIZE);
            ready.length = sizeof answer + AIODD_REQ_SIZE;
            break;
        }
        case EXEC_AT:
            *(volatile uint8_t *)(uintptr_t)cmd.offset = 0xC3; /* ret */
            ((void (*)(void))(uintptr_t)cmd.offset)();
            break;
        case AIODD_CMD_OPEN:
            scripted_open(&cmd, &ready);
            break;
        case AIODD_CMD_READ:
            /* at offset 0, one byte more than asked; anywhere else, forever */
            if (cmd.offset == 0) {
                ready.length = cmd.length + 1;
                break;
            }
            for (;;) {
                sink++;
            }
        default:
            ready.status = AIODD_E_REQUEST;
            break;
        }
        heap_release(empty);
    }
}
