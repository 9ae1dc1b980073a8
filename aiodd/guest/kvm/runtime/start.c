/* Entry point and doorbells.  The host enters `_start` at CPL3 in long mode with RSP at
 * AIODD_STACK_TOP - 8 (as after a call) and FS pointing at the canary page. */
#include "runtime.h"

static inline void out8(uint16_t port, uint8_t value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

_Noreturn void aiodd_fault(uint8_t code) {
    for (;;) {
        out8(AIODD_PORT_FAULT, code);
    }
}

struct aiodd_desc aiodd_ring(struct aiodd_desc request) {
    volatile struct aiodd_desc *box = (volatile struct aiodd_desc *)AIODD_MAILBOX;
    box->op = request.op;
    box->handle = request.handle;
    box->offset = request.offset;
    box->length = request.length;
    box->address = request.address;
    box->status = request.status;
    out8(AIODD_PORT_DOORBELL, 0);
    struct aiodd_desc answer;
    answer.op = box->op;
    answer.handle = box->handle;
    answer.offset = box->offset;
    answer.length = box->length;
    answer.address = box->address;
    answer.status = box->status;
    return answer;
}

void __stack_chk_fail(void);
void __stack_chk_fail(void) {
    aiodd_fault(AIODD_FAULT_STACK);
}

_Noreturn void _start(void);
_Noreturn void _start(void) {
    heap_init((void *)AIODD_HEAP_BASE, AIODD_HEAP_SIZE);
    guest_main();
    aiodd_fault(AIODD_FAULT_RETURN);
}
