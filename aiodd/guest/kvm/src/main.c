/* The shipped guest: the commands of abi.h, served one at a time. */
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "runtime.h"

/* zstd's window is capped: a frame asking more is refused, not allocated. */
#define ZSTD_WINDOW_LOG_MAX 22

static unsigned char *const in_window = (unsigned char *)AIODD_IN_BASE;
static unsigned char *const out_window = (unsigned char *)AIODD_OUT_BASE;

/* Read `length` bytes of `handle` at `offset` into IN; returns the count the host read,
 * which the guest checks again before it trusts it. */
static uint64_t host_read(uint32_t handle, uint64_t offset, uint64_t length, uint64_t *status) {
    struct aiodd_desc request = {AIODD_OP_READ, handle, offset, length, 0};
    struct aiodd_desc answer = aiodd_ring(request);
    if (answer.length > length) {
        aiodd_fault(AIODD_FAULT_ABI);
    }
    *status = answer.status;
    return answer.length;
}

static uint64_t do_raw(const struct aiodd_desc *cmd, uint64_t *produced) {
    if (cmd->length > AIODD_OUT_SIZE || cmd->offset > UINT64_MAX - cmd->length) {
        return AIODD_E_REQUEST;
    }
    uint64_t done = 0;
    while (done < cmd->length) {
        uint64_t chunk = cmd->length - done;
        if (chunk > AIODD_IN_SIZE) {
            chunk = AIODD_IN_SIZE;
        }
        uint64_t status = 0;
        uint64_t got = host_read(cmd->handle, cmd->offset + done, chunk, &status);
        if (status != AIODD_OK) {
            return status == AIODD_E_IO ? AIODD_E_IO : AIODD_E_REQUEST;
        }
        memcpy(out_window + done, in_window, (size_t)got);
        done += got;
        if (got < chunk) {
            break;
        }
    }
    *produced = done;
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
    struct aiodd_desc ready = {AIODD_OP_READY, 0, 0, 0, AIODD_OK};
    for (;;) {
        struct aiodd_desc cmd = aiodd_ring(ready);
        uint64_t produced = 0;
        uint64_t status;
        switch (cmd.op) {
        case AIODD_CMD_RAW:
            status = do_raw(&cmd, &produced);
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
