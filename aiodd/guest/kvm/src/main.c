/* The shipped guest, for now: raw images, zlib and zstd; the commands of abi.h served one
 * at a time. */
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "runtime.h"

/* zstd's window is capped: a frame asking more is refused, not allocated. */
#define ZSTD_WINDOW_LOG_MAX 22

static unsigned char *const in_window = (unsigned char *)AIODD_IN_BASE;
static unsigned char *const out_window = (unsigned char *)AIODD_OUT_BASE;

/* The open image: a raw file, the only format this build decodes. */
static struct {
    int open;
    uint64_t size;
} image;

/* Read each segment straight into its destination; `got` comes back in each, checked
 * against what was asked before it is trusted.  Returns the host's status. */
static uint64_t host_readv(struct aiodd_segment *segments, uint32_t count) {
    volatile struct aiodd_segment *req = (volatile struct aiodd_segment *)AIODD_REQ_BASE;
    if (count > AIODD_MAX_SEGMENTS) {
        aiodd_fault(AIODD_FAULT_ABI);
    }
    for (uint32_t i = 0; i < count; i++) {
        req[i].handle = segments[i].handle;
        req[i].reserved = 0;
        req[i].offset = segments[i].offset;
        req[i].length = segments[i].length;
        req[i].dest = segments[i].dest;
        req[i].got = 0;
    }
    struct aiodd_desc request = {AIODD_OP_READV, 0, 0, count, 0, 0};
    struct aiodd_desc answer = aiodd_ring(request);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t got = req[i].got;
        if (got > segments[i].length) {
            aiodd_fault(AIODD_FAULT_ABI);
        }
        segments[i].got = got;
    }
    if (answer.status != AIODD_OK && answer.status != AIODD_E_IO) {
        aiodd_fault(AIODD_FAULT_ABI);
    }
    return answer.status;
}

static int inside(uint64_t address, uint64_t length, uint64_t base, uint64_t size) {
    return base <= address && length <= size && address - base <= size - length;
}

/* A command's output lies in OUT or in one slot: the host chose it, the guest checks. */
static int output_range(uint64_t address, uint64_t length) {
    if (inside(address, length, AIODD_OUT_BASE, AIODD_OUT_SIZE)) {
        return 1;
    }
    if (!inside(address, length, AIODD_SLOT_BASE, AIODD_MAX_SLOTS * AIODD_SLOT_STRIDE)) {
        return 0;
    }
    uint64_t slot = (address - AIODD_SLOT_BASE) / AIODD_SLOT_STRIDE;
    return inside(address, length, AIODD_SLOT_BASE + slot * AIODD_SLOT_STRIDE,
                  AIODD_SLOT_STRIDE);
}

static uint64_t do_open(const struct aiodd_desc *cmd, uint64_t *result) {
    image.open = 0;
    if (cmd->handle != 0 || cmd->offset != AIODD_FMT_RAW || cmd->length > UINT64_MAX - 511) {
        return AIODD_E_REQUEST;
    }
    image.size = cmd->length;
    image.open = 1;
    *result = (cmd->length + 511) & ~(uint64_t)511;  /* the tail reads as zeros */
    return AIODD_OK;
}

static uint64_t do_read(const struct aiodd_desc *cmd, uint64_t *result) {
    uint64_t offset = cmd->offset;
    uint64_t length = cmd->length;
    if (!image.open || !output_range(cmd->address, length) || offset > UINT64_MAX - length) {
        return AIODD_E_REQUEST;
    }
    uint64_t got = 0;
    if (offset < image.size && length > 0) {
        uint64_t left = image.size - offset;
        struct aiodd_segment segment = {0, 0, offset, left < length ? left : length,
                                        cmd->address, 0};
        uint64_t status = host_readv(&segment, 1);
        if (status != AIODD_OK) {
            return status;
        }
        got = segment.got;
    }
    memset((unsigned char *)(uintptr_t)cmd->address + got, 0, (size_t)(length - got));
    *result = length;
    return AIODD_OK;
}

static uint64_t do_zlib(const struct aiodd_desc *cmd, uint64_t *produced) {
    if (cmd->length > AIODD_IN_SIZE) {
        return AIODD_E_REQUEST;
    }
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit(&z) != Z_OK) {
        return AIODD_E_NOMEM;
    }
    z.next_in = in_window;
    z.avail_in = (uInt)cmd->length;
    z.next_out = out_window;
    z.avail_out = (uInt)AIODD_OUT_SIZE;
    int ret = inflate(&z, Z_FINISH);
    uint64_t status;
    if (ret == Z_STREAM_END) {
        status = AIODD_OK;
        *produced = AIODD_OUT_SIZE - z.avail_out;
    } else if (ret == Z_MEM_ERROR) {
        status = AIODD_E_NOMEM;
    } else if (ret == Z_BUF_ERROR && z.avail_out == 0) {
        status = AIODD_E_TOOBIG;
    } else {
        status = AIODD_E_CORRUPT;  /* bad data, or a truncated stream */
    }
    inflateEnd(&z);
    return status;
}

static uint64_t do_zstd(const struct aiodd_desc *cmd, uint64_t *produced) {
    if (cmd->length > AIODD_IN_SIZE) {
        return AIODD_E_REQUEST;
    }
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (dctx == NULL) {
        return AIODD_E_NOMEM;
    }
    uint64_t status = AIODD_OK;
    if (ZSTD_isError(ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, ZSTD_WINDOW_LOG_MAX))) {
        status = AIODD_E_NOMEM;
    }
    ZSTD_inBuffer in = {in_window, (size_t)cmd->length, 0};
    ZSTD_outBuffer out = {out_window, (size_t)AIODD_OUT_SIZE, 0};
    size_t ret = 1;
    while (status == AIODD_OK && ret != 0) {
        size_t before_in = in.pos;
        size_t before_out = out.pos;
        ret = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(ret)) {
            ZSTD_ErrorCode code = ZSTD_getErrorCode(ret);
            status = code == ZSTD_error_memory_allocation ? AIODD_E_NOMEM : AIODD_E_CORRUPT;
        } else if (ret != 0 && in.pos == before_in && out.pos == before_out) {
            /* no progress: the input ended inside a frame, or the output is full */
            status = out.pos == out.size ? AIODD_E_TOOBIG : AIODD_E_CORRUPT;
        } else if (ret == 0 && in.pos < in.size) {
            ret = 1;  /* another frame follows */
        }
    }
    if (status == AIODD_OK) {
        *produced = out.pos;
    }
    ZSTD_freeDCtx(dctx);
    return status;
}

void guest_main(void) {
    const uintptr_t empty = heap_mark();
    struct aiodd_desc ready = {AIODD_OP_READY, 0, 0, 0, 0, AIODD_OK};
    for (;;) {
        struct aiodd_desc cmd = aiodd_ring(ready);
        uint64_t produced = 0;
        uint64_t status;
        switch (cmd.op) {
        case AIODD_CMD_OPEN:
            status = do_open(&cmd, &produced);
            break;
        case AIODD_CMD_READ:
            status = do_read(&cmd, &produced);
            break;
        case AIODD_CMD_ZLIB:
            status = do_zlib(&cmd, &produced);
            break;
        case AIODD_CMD_ZSTD:
            status = do_zstd(&cmd, &produced);
            break;
        default:
            status = AIODD_E_REQUEST;
            break;
        }
        heap_release(empty);
        ready.length = status == AIODD_OK ? produced : 0;
        ready.status = status;
    }
}
