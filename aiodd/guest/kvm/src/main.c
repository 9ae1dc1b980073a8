/* The shipped guest: the commands of abi.h, served one at a time (docs/kvm.md). */
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "disk.h"
#include "runtime.h"

/* zstd's window is capped: a frame asking more is refused, not allocated. */
#define ZSTD_WINDOW_LOG_MAX 22

static unsigned char *const in_window = (unsigned char *)AIODD_IN_BASE;
static unsigned char *const out_window = (unsigned char *)AIODD_OUT_BASE;

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

/* CMD_READ writes to OUT or to one slot, never across a slot's end (past a slot's real
 * size nothing is mapped; the host checks the exact sizes). */
static int output_range(uint64_t address, uint64_t length) {
    if (address >= AIODD_OUT_BASE && address - AIODD_OUT_BASE <= AIODD_OUT_SIZE) {
        return length <= AIODD_OUT_SIZE - (address - AIODD_OUT_BASE);
    }
    if (address >= AIODD_SLOT_BASE && address - AIODD_SLOT_BASE < AIODD_MAX_SLOTS * AIODD_SLOT_STRIDE) {
        uint64_t in_slot = (address - AIODD_SLOT_BASE) % AIODD_SLOT_STRIDE;
        return length <= AIODD_SLOT_STRIDE - in_slot;
    }
    return 0;
}

static uint64_t do_open(const struct aiodd_desc *cmd, uint64_t *virtual_size) {
    if (cmd->handle != 0 || cmd->offset > UINT32_MAX) {
        return AIODD_E_REQUEST;
    }
    return disk_open((uint32_t)cmd->offset, cmd->length, virtual_size);
}

static uint64_t do_read(const struct aiodd_desc *cmd) {
    if (!disk_is_open() || cmd->offset > UINT64_MAX - cmd->length ||
        !output_range(cmd->address, cmd->length)) {
        return AIODD_E_REQUEST;
    }
    return disk_read(cmd->offset, (unsigned char *)(uintptr_t)cmd->address, cmd->length);
}

/* READY's body for an image error: the struct aiodd_error and the message, in REQ. */
static void put_error(void) {
    size_t length;
    uint32_t layer;
    const char *message = host_error_message(&length, &layer);
    volatile struct aiodd_error *record = (volatile struct aiodd_error *)AIODD_REQ_BASE;
    record->layer = layer;
    record->length = (uint32_t)length;
    memcpy((unsigned char *)AIODD_REQ_BASE + sizeof(struct aiodd_error), message, length);
}

void guest_main(void) {
    const uintptr_t empty = heap_mark();
    uintptr_t opened = empty;  /* the open image's memory ends here */
    struct aiodd_desc ready = {AIODD_OP_READY, 0, 0, 0, 0, AIODD_OK};
    for (;;) {
        struct aiodd_desc cmd = aiodd_ring(ready);
        uint64_t produced = 0;
        uint64_t status;
        switch (cmd.op) {
        case AIODD_CMD_OPEN:
            heap_release(empty);
            disk_close();
            status = do_open(&cmd, &produced);
            opened = status == AIODD_OK ? heap_mark() : empty;
            if (status != AIODD_OK) {
                disk_close();
            }
            break;
        case AIODD_CMD_READ:
            status = do_read(&cmd);
            produced = cmd.length;
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
        heap_release(opened);
        if (status == AIODD_E_IMAGE || status == AIODD_E_UNSUPPORTED) {
            put_error();
        }
        ready.length = status == AIODD_OK ? produced : 0;
        ready.status = status;
    }
}
