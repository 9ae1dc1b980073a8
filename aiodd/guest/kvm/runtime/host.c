/* host.h in the guest: each service is a request in REQ and a ring of the doorbell. */
#include "host.h"
#include "runtime.h"

#define INT64_MAX_U 0x7fffffffffffffffULL

unsigned char *host_in(void) {
    return (unsigned char *)AIODD_IN_BASE;
}

_Noreturn void host_fault(void) {
    aiodd_fault(AIODD_FAULT_ABI);
}

static uint32_t readv_once(struct host_segment *segments, size_t count) {
    volatile struct aiodd_segment *req = (volatile struct aiodd_segment *)AIODD_REQ_BASE;
    for (size_t i = 0; i < count; i++) {
        req[i].handle = segments[i].handle;
        req[i].reserved = 0;
        req[i].offset = segments[i].offset;
        req[i].length = segments[i].length;
        req[i].dest = (uint64_t)(uintptr_t)segments[i].dest;
        req[i].got = 0;
    }
    struct aiodd_desc request = {AIODD_OP_READV, 0, 0, count, 0, 0};
    struct aiodd_desc answer = aiodd_ring(request);
    if (answer.status == AIODD_E_IO) {
        return AIODD_E_IO;
    }
    if (answer.status != AIODD_OK) {
        host_fault();
    }
    for (size_t i = 0; i < count; i++) {
        uint64_t got = req[i].got;  /* read once, then checked */
        if (got > segments[i].length) {
            host_fault();
        }
        segments[i].got = got;
    }
    return AIODD_OK;
}

uint32_t host_readv(struct host_segment *segments, size_t count) {
    while (count > 0) {
        size_t n = count < AIODD_MAX_SEGMENTS ? count : AIODD_MAX_SEGMENTS;
        uint32_t status = readv_once(segments, n);
        if (status != AIODD_OK) {
            return status;
        }
        segments += n;
        count -= n;
    }
    return AIODD_OK;
}

uint32_t host_open(uint32_t referrer, uint32_t kind, const char *name, size_t name_length,
                   const char *format, size_t format_length, struct host_file *file) {
    const size_t head = sizeof(struct aiodd_open_req);
    if (name_length > AIODD_REQ_SIZE - head || format_length > AIODD_REQ_SIZE - head - name_length) {
        return AIODD_E_REQUEST;  /* the decoders bound names far below this */
    }
    volatile struct aiodd_open_req *req = (volatile struct aiodd_open_req *)AIODD_REQ_BASE;
    req->referrer = referrer;
    req->kind = kind;
    req->name_length = (uint32_t)name_length;
    req->format_length = (uint32_t)format_length;
    unsigned char *body = (unsigned char *)AIODD_REQ_BASE + head;
    memcpy(body, name, name_length);
    memcpy(body + name_length, format, format_length);
    struct aiodd_desc request = {AIODD_OP_OPEN, 0, 0, 0, 0, 0};
    struct aiodd_desc answer = aiodd_ring(request);
    if (answer.status == AIODD_E_REFUSED) {
        return AIODD_E_REFUSED;
    }
    /* The format is checked by the decoder that asked, against what it asked for (a
     * data file, or a layer in a format disk_layer_format knows). */
    if (answer.status != AIODD_OK || answer.offset > INT64_MAX_U || answer.length > UINT32_MAX) {
        host_fault();
    }
    file->handle = answer.handle;
    file->size = answer.offset;
    file->format = (uint32_t)answer.length;
    return AIODD_OK;
}
