/* vhdx in the KVM guest: the twin of decode.py and layout.py, which say what each step
 * means.  Every check runs in the Python decoder's order with its message byte for byte;
 * a change there is a change here (tests/test_kvm_decoder_vhdx.py holds the two
 * together).
 *
 * A dirty log is replayed as Python replays it: into an overlay of the file held in
 * memory, through which every later structure and every payload byte is read.  The log
 * is held whole, so a log larger than LOG_HELD_MAX is left to the Python decoder
 * (AIODD_E_NOMEM).  The BAT is held whole when the table budget allows, else read
 * through the table cache a slot at a time. */
#include "vhdx/guest.h"

#define KIB 1024ULL
#define MIB (1024ULL * 1024ULL)
#define HEADER_1 (64 * KIB)
#define HEADER_2 (128 * KIB)
#define HEADER_SIZE (4 * KIB)
#define HEADER_KEPT 80u /* layout._HEADER.size: what choose_header compares */
#define REGION_TABLE_OFFSET (192 * KIB)
#define REGION_TABLE_SIZE (64 * KIB)
#define METADATA_TABLE_SIZE (64 * KIB)
#define MAX_METADATA_ITEM (1024 * KIB)
#define LOG_SECTOR 4096ULL
#define MAX_SECTORS_PER_BLOCK (1ULL << 23)
#define MIN_BLOCK_SIZE MIB
#define MAX_BLOCK_SIZE (256 * MIB)
#define SECTOR_BITMAP_BLOCK MIB
#define MAX_VIRTUAL_SIZE (64ULL << 40)
#define MAX_LOG_SIZE (256 * MIB)
#define MAX_FILE_OFFSET (1ULL << 48)
#define MAX_PARENT_PATH 4095u /* layout.MAX_PARENT_PATH */
#define MAX_TABLE_ENTRIES 2047u

/* What the guest holds of a log: qemu writes 1 MiB logs.  A larger one would crowd
 * the heap a command needs. */
#define LOG_HELD_MAX (8 * MIB)
/* A slot of the table cache holds this much of a BAT too large to hold whole. */
#define BAT_CHUNK (64 * KIB)

#define PAYLOAD_NOT_PRESENT 0u
#define PAYLOAD_UNDEFINED 1u
#define PAYLOAD_ZERO 2u
#define PAYLOAD_UNMAPPED 3u
#define PAYLOAD_UNMAPPED_V095 5u
#define PAYLOAD_FULLY_PRESENT 6u
#define PAYLOAD_PARTIALLY_PRESENT 7u
#define SB_BLOCK_PRESENT 6u
#define STATE_MASK 7u
#define OFFSET_MASK 0xFFFFFFFFFFF00000ULL
#define LEAVE_BLOCKS_ALLOCATED 1u
#define HAS_PARENT 2u

typedef unsigned __int128 u128;

/* The GUIDs as stored (Microsoft's mixed-endian form: uuid.UUID(...).bytes_le). */
static const unsigned char BAT_GUID[16] = {0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42,
                                           0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08};
static const unsigned char METADATA_GUID[16] = {0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B,
                                                0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E};
static const unsigned char LOCATOR_TYPE_VHDX[16] = {0xB7, 0xEF, 0x4A, 0xB0, 0x9E, 0xD1,
                                                    0x81, 0x4A, 0xB7, 0x89, 0x25, 0xB8,
                                                    0xE9, 0x44, 0x59, 0x13};

/* The known metadata items, in _REQUIRED_ITEMS's order, the parent locator last. */
enum { FILE_PARAMETERS, VIRTUAL_DISK_SIZE, PAGE83, LOGICAL_SECTOR, PHYSICAL_SECTOR,
       PARENT_LOCATOR, ITEM_KINDS };
static const unsigned char ITEM_GUIDS[ITEM_KINDS][16] = {
    {0x37, 0x67, 0xA1, 0xCA, 0x36, 0xFA, 0x43, 0x4D, 0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7,
     0x6B},
    {0x24, 0x42, 0xA5, 0x2F, 0x1B, 0xCD, 0x76, 0x48, 0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4,
     0xB8},
    {0xAB, 0x12, 0xCA, 0xBE, 0xE6, 0xB2, 0x23, 0x45, 0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7,
     0x46},
    {0x1D, 0xBF, 0x41, 0x81, 0x6F, 0xA9, 0x09, 0x47, 0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB,
     0x5F},
    {0xC7, 0x48, 0xA3, 0xCD, 0x5D, 0x44, 0x71, 0x44, 0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5,
     0x56},
    {0x2D, 0x5F, 0xD3, 0xA8, 0x0B, 0xB3, 0x4D, 0x45, 0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB,
     0x0C},
};
static const char *const ITEM_NAMES[ITEM_KINDS] = {
    "file parameters",     "virtual disk size",    "page 83 data",
    "logical sector size", "physical sector size", "parent locator",
};

/* A write the log makes: `length` zeros, or one sector whose bytes are lead, the log's
 * sector at `sector` (its bytes 8..4092), trail. */
struct log_write {
    uint64_t offset;
    uint64_t length;
    uint32_t sector;
    int zero;
    unsigned char lead[8];
    unsigned char trail[4];
};

/* A stretch of the file the newest covering write decides (layout.Overlay). */
struct piece {
    uint64_t start;
    uint64_t end;
    uint32_t write;
};

struct vhdx {
    struct layer *layer;
    struct layer *parent;
    uint64_t size; /* the file as the log leaves it (LoggedFile.size) */
    uint64_t block_size;
    uint64_t chunk_ratio;
    uint64_t sector;
    uint64_t bat_offset;
    uint64_t bat_entries;
    uint64_t *bat; /* NULL: too large to hold, read through the cache */
    /* the log's overlay: pieces sorted by start, disjoint */
    const unsigned char *log;
    const struct log_write *writes;
    const struct piece *pieces;
    uint64_t piece_count;
    unsigned char *bitmap; /* a block's sector bitmap bytes, when the disk has a parent */
};

/* -- bytes ---------------------------------------------------------------------------- */

static uint16_t le16(const unsigned char *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* crc32c.py: CRC-32C (Castagnoli), reflected, as a running state. */
static uint32_t crc_table[256];

static uint32_t crc_update(uint32_t state, const unsigned char *data, uint64_t n) {
    if (crc_table[1] == 0) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) {
                c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            }
            crc_table[i] = c;
        }
    }
    for (uint64_t i = 0; i < n; i++) {
        state = crc_table[(state ^ data[i]) & 0xFF] ^ (state >> 8);
    }
    return state;
}

/* layout._crc_ok over one buffer: the CRC with the field at 4 zeroed matches it. */
static int crc_ok(const unsigned char *raw, uint64_t length) {
    static const unsigned char zeros[4] = {0};
    uint32_t state = crc_update(0xFFFFFFFFu, raw, 4);
    state = crc_update(state, zeros, 4);
    state = crc_update(state, raw + 8, length - 8);
    return (state ^ 0xFFFFFFFFu) == le32(raw + 4);
}

static uint32_t image_error(uint32_t handle, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
static uint32_t image_error(uint32_t handle, const char *format, ...) {
    va_list args;
    va_start(args, format);
    host_verror(AIODD_E_IMAGE, handle, format, args);
    va_end(args);
    return AIODD_E_IMAGE;
}

/* -- the overlay (layout.Overlay, decode.LoggedFile) ---------------------------------- */

/* The first piece that ends after `offset`. */
static uint64_t first_piece(const struct vhdx *x, uint64_t offset) {
    uint64_t lo = 0, hi = x->piece_count;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (x->pieces[mid].end <= offset) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* The bytes [from, from + n) of the file as piece p leaves them, into dest. */
static void piece_bytes(const struct vhdx *x, const struct piece *p, uint64_t from,
                        unsigned char *dest, uint64_t n) {
    const struct log_write *w = &x->writes[p->write];
    if (w->zero) {
        memset(dest, 0, (size_t)n);
        return;
    }
    for (uint64_t k = from - w->offset, i = 0; i < n; i++, k++) {
        dest[i] = k < 8 ? w->lead[k] : k >= 4092 ? w->trail[k - 4092] : x->log[w->sector + k];
    }
}

/* Overlay.apply: patch buf, the file's bytes at `offset`. */
static void overlay_patch(const struct vhdx *x, uint64_t offset, unsigned char *buf,
                          uint64_t length) {
    const uint64_t end = offset + length;
    for (uint64_t i = first_piece(x, offset); i < x->piece_count; i++) {
        const struct piece *p = &x->pieces[i];
        if (p->start >= end) {
            break;
        }
        uint64_t lo = p->start > offset ? p->start : offset;
        uint64_t hi = p->end < end ? p->end : end;
        piece_bytes(x, p, lo, buf + (lo - offset), hi - lo);
    }
}

/* LoggedFile.readinto at opening, into memory of the decoder's: the caller checked
 * that the range lies inside the file (x->size). */
static uint32_t view_read(const struct vhdx *x, uint64_t offset, uint64_t length,
                          unsigned char *dest) {
    const struct layer *layer = x->layer;
    for (uint64_t done = 0; done < length;) {
        uint64_t n = min_u64(length - done, AIODD_IN_SIZE);
        uint64_t got = 0;
        if (offset + done < layer->file_size) {
            uint32_t status = disk_read_in(layer->handle, offset + done, n, &got);
            if (status != AIODD_OK) {
                return status;
            }
        }
        memcpy(dest + done, host_in(), (size_t)got);
        memset(dest + done + got, 0, (size_t)(n - got));
        done += n;
    }
    overlay_patch(x, offset, dest, length);
    return AIODD_OK;
}

/* The file's [offset, offset + length) into a command's dest, through the overlay: the
 * pieces copied now, the rest queued. */
static uint32_t queue_file(struct reader *r, const struct vhdx *x, uint64_t offset,
                           unsigned char *dest, uint64_t length) {
    const struct layer *layer = x->layer;
    uint64_t cur = offset;
    const uint64_t end = offset + length;
    uint64_t i = x->piece_count ? first_piece(x, offset) : 0;
    while (cur < end) {
        uint64_t stop = end;
        if (i < x->piece_count && x->pieces[i].start < end) {
            stop = x->pieces[i].start > cur ? x->pieces[i].start : cur;
        }
        if (stop > cur) {
            uint32_t status =
                reader_data(r, layer->handle, layer->file_size, cur, dest + (cur - offset),
                            stop - cur);
            if (status != AIODD_OK) {
                return status;
            }
            cur = stop;
        }
        if (cur < end) {
            const struct piece *p = &x->pieces[i++];
            uint64_t hi = p->end < end ? p->end : end;
            piece_bytes(x, p, cur, dest + (cur - offset), hi - cur);
            cur = hi;
        }
    }
    return AIODD_OK;
}

/* -- the headers (layout.parse_header, choose_header) --------------------------------- */

struct header {
    int valid;
    uint64_t sequence;
    unsigned char log_guid[16];
    uint32_t log_version;
    uint32_t log_length;
    uint64_t log_offset;
    unsigned char raw[HEADER_KEPT];
};

static uint32_t read_header(uint32_t handle, uint64_t at, struct header *h) {
    uint64_t got;
    memset(h, 0, sizeof *h);
    uint32_t status = disk_read_in(handle, at, HEADER_SIZE, &got);
    if (status != AIODD_OK) {
        return status;
    }
    const unsigned char *raw = host_in();
    if (got < HEADER_SIZE || !crc_ok(raw, HEADER_SIZE)) {
        return AIODD_OK;
    }
    if (memcmp(raw, "head", 4) != 0 || le16(raw + 66) != 1) {
        return AIODD_OK;
    }
    h->valid = 1;
    h->sequence = le64(raw + 8);
    memcpy(h->log_guid, raw + 48, 16);
    h->log_version = le16(raw + 64);
    h->log_length = le32(raw + 68);
    h->log_offset = le64(raw + 72);
    memcpy(h->raw, raw, HEADER_KEPT);
    return AIODD_OK;
}

static uint32_t choose_header(uint32_t handle, const struct header *first,
                              const struct header *second, const struct header **chosen) {
    if (!first->valid && !second->valid) {
        return image_error(handle, "vhdx has no valid header (both header checksums mismatch)");
    }
    if (!first->valid || !second->valid) {
        *chosen = first->valid ? first : second;
    } else if (first->sequence > second->sequence) {
        *chosen = first;
    } else if (second->sequence > first->sequence) {
        *chosen = second;
    } else if (memcmp(first->raw, second->raw, HEADER_KEPT) == 0) {
        *chosen = first;
    } else {
        return image_error(handle, "vhdx headers differ but have the same sequence number");
    }
    return AIODD_OK;
}

/* decode._read_exact's check; the bytes are read by the caller. */
static uint32_t check_exact(const struct vhdx *x, uint64_t offset, uint64_t length,
                            const char *what) {
    if ((u128)offset + length > x->size) {
        return image_error(x->layer->handle, "vhdx %s at %#lx lies past the end of the file",
                           what, (unsigned long)offset);
    }
    return AIODD_OK;
}

/* -- the log (layout.parse_log_entry, find_active_sequence; decode._replay_log) ------- */

struct log {
    const unsigned char *bytes;
    uint64_t size;
    const unsigned char *guid;
};

struct entry {
    uint64_t sequence;
    uint64_t length;
    uint64_t flushed;
    uint64_t last;
    uint64_t writes;
};

static const unsigned char *log_at(const struct log *log, uint64_t position) {
    return log->bytes + position % log->size;
}

/* parse_log_entry: 1 and *e if the entry at `position` is valid; its writes go to
 * `out` when given. */
static int parse_entry(const struct log *log, uint64_t position, struct entry *e,
                       struct log_write *out) {
    const unsigned char *head = log_at(log, position);
    const uint64_t size = log->size;
    const uint64_t length = le32(head + 8);
    const uint64_t seq = le64(head + 16);
    const uint64_t count = le32(head + 24);
    if (memcmp(head, "loge", 4) != 0 || memcmp(head + 32, log->guid, 16) != 0 || seq == 0) {
        return 0;
    }
    if (length == 0 || length % LOG_SECTOR || length > size) {
        return 0;
    }
    const uint64_t desc_sectors = (count + 2 + 127) / 128;
    if (desc_sectors * LOG_SECTOR > length) {
        return 0;
    }
    static const unsigned char zeros[4] = {0};
    const uint64_t first = min_u64(length, size - position);
    uint32_t state = crc_update(0xFFFFFFFFu, head, 4);
    state = crc_update(state, zeros, 4);
    state = crc_update(state, head + 8, first - 8);
    state = crc_update(state, log->bytes, length - first);
    if ((state ^ 0xFFFFFFFFu) != le32(head + 4)) {
        return 0;
    }
    uint64_t data_at = desc_sectors * LOG_SECTOR;
    for (uint64_t i = 0; i < count; i++) {
        const unsigned char *d = log_at(log, position + 64 + 32 * i);
        const uint64_t file_offset = le64(d + 16);
        if (le64(d + 24) != seq || file_offset % LOG_SECTOR) {
            return 0;
        }
        struct log_write w;
        memset(&w, 0, sizeof w);
        w.offset = file_offset;
        if (memcmp(d, "zero", 4) == 0) {
            w.length = le64(d + 8);
            if (w.length % LOG_SECTOR) {
                return 0;
            }
            w.zero = 1;
        } else if (memcmp(d, "desc", 4) == 0) {
            if (data_at + LOG_SECTOR > length) {
                return 0;
            }
            const uint64_t at = (position + data_at) % size;
            const unsigned char *sector = log->bytes + at;
            data_at += LOG_SECTOR;
            uint64_t stamp = (uint64_t)le32(sector + 4) << 32 | le32(sector + 4092);
            if (memcmp(sector, "data", 4) != 0 || stamp != seq) {
                return 0;
            }
            w.length = LOG_SECTOR;
            w.sector = (uint32_t)at;
            memcpy(w.lead, d + 8, 8);
            memcpy(w.trail, d + 4, 4);
        } else {
            return 0;
        }
        if (out != NULL) {
            out[i] = w;
        }
    }
    *e = (struct entry){seq, length, le64(head + 48), le64(head + 56), count};
    return 1;
}

/* find_active_sequence: the chain's first entry and its length (0: no entry). */
static uint32_t active_sequence(const struct log *log, uint64_t *start, uint64_t *chain) {
    const uint64_t slots = log->size / LOG_SECTOR;
    uint64_t *seq = heap_alloc((size_t)slots * 8);
    uint64_t *last = heap_alloc((size_t)slots * 8);
    uint32_t *length = heap_alloc((size_t)slots * 4);
    int64_t *next = heap_alloc((size_t)slots * 8);
    int64_t *stack = heap_alloc((size_t)slots * 8);
    if (seq == NULL || last == NULL || length == NULL || next == NULL || stack == NULL) {
        return AIODD_E_NOMEM;
    }
    for (uint64_t s = 0; s < slots; s++) {
        struct entry e;
        seq[s] = 0; /* 0: not a valid entry (a valid one's sequence is not 0) */
        length[s] = 0;
        if (memcmp(log->bytes + s * LOG_SECTOR, "loge", 4) == 0 &&
            parse_entry(log, s * LOG_SECTOR, &e, NULL)) {
            seq[s] = e.sequence;
            length[s] = (uint32_t)e.length;
        }
    }
    for (uint64_t s = 0; s < slots; s++) {
        next[s] = -1;
        if (seq[s] != 0) {
            uint64_t f = (s * LOG_SECTOR + length[s]) % log->size / LOG_SECTOR;
            if (seq[f] != 0 && seq[f] == seq[s] + 1) {
                next[s] = (int64_t)f;
            }
        }
    }
    /* Each chain's end and length: `last` 0 marks "not yet", `length` is reused. */
    for (uint64_t s = 0; s < slots; s++) {
        last[s] = 0;
    }
    uint32_t *reach = (uint32_t *)length;
    for (uint64_t s = 0; s < slots; s++) {
        if (seq[s] == 0 || last[s] != 0) {
            continue;
        }
        uint64_t depth = 0;
        int64_t at = (int64_t)s;
        while (at >= 0 && last[at] == 0) {
            stack[depth++] = at;
            at = next[at];
        }
        while (depth > 0) {
            int64_t t = stack[--depth];
            if (next[t] < 0) {
                last[t] = seq[t];
                reach[t] = 1;
            } else {
                last[t] = last[next[t]];
                reach[t] = reach[next[t]] + 1;
            }
        }
    }
    *chain = 0;
    uint64_t best_last = 0, best_length = 0;
    for (uint64_t s = 0; s < slots; s++) {
        if (seq[s] != 0 &&
            (last[s] > best_last || (last[s] == best_last && reach[s] > best_length))) {
            best_last = last[s];
            best_length = reach[s];
            *start = s * LOG_SECTOR;
            *chain = best_length;
        }
    }
    heap_free(stack);
    heap_free(next);
    heap_free(length);
    heap_free(last);
    heap_free(seq);
    return AIODD_OK;
}

struct event {
    uint64_t offset;
    uint32_t starting;
    uint32_t age;
};

static int event_before(const struct event *a, const struct event *b) {
    if (a->offset != b->offset) {
        return a->offset < b->offset;
    }
    if (a->starting != b->starting) {
        return a->starting < b->starting;
    }
    return a->age < b->age;
}

static void sift_events(struct event *e, uint64_t root, uint64_t n) {
    for (;;) {
        uint64_t child = 2 * root + 1;
        if (child >= n) {
            return;
        }
        if (child + 1 < n && event_before(&e[child], &e[child + 1])) {
            child++;
        }
        if (!event_before(&e[root], &e[child])) {
            return;
        }
        struct event t = e[root];
        e[root] = e[child];
        e[child] = t;
        root = child;
    }
}

static void sort_events(struct event *e, uint64_t n) {
    for (uint64_t i = n / 2; i-- > 0;) {
        sift_events(e, i, n);
    }
    for (uint64_t end = n; end-- > 1;) {
        struct event t = e[0];
        e[0] = e[end];
        e[end] = t;
        sift_events(e, 0, end);
    }
}

/* A max-heap of ages (Python's min-heap of negated ages). */
static void ages_push(uint32_t *h, uint64_t *n, uint32_t age) {
    uint64_t i = (*n)++;
    h[i] = age;
    while (i > 0 && h[(i - 1) / 2] < h[i]) {
        uint32_t t = h[i];
        h[i] = h[(i - 1) / 2];
        h[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
}

static void ages_pop(uint32_t *h, uint64_t *n) {
    h[0] = h[--*n];
    for (uint64_t i = 0;;) {
        uint64_t c = 2 * i + 1;
        if (c >= *n) {
            return;
        }
        if (c + 1 < *n && h[c + 1] > h[c]) {
            c++;
        }
        if (h[i] >= h[c]) {
            return;
        }
        uint32_t t = h[i];
        h[i] = h[c];
        h[c] = t;
        i = c;
    }
}

/* Overlay.__init__: the sweep over the writes' edges, newest covering write wins. */
static uint32_t build_overlay(struct vhdx *x, const struct log_write *writes, uint64_t count) {
    struct piece *pieces = disk_alloc((size_t)(2 * count + 1) * sizeof *pieces);
    struct event *events = heap_alloc((size_t)(2 * count + 1) * sizeof *events);
    uint32_t *ages = heap_alloc((size_t)(count + 1) * 4);
    unsigned char *active = heap_alloc((size_t)count + 1);
    if (pieces == NULL || events == NULL || ages == NULL || active == NULL) {
        return AIODD_E_NOMEM;
    }
    uint64_t n = 0;
    for (uint64_t age = 0; age < count; age++) {
        if (writes[age].length > 0) {
            events[n++] = (struct event){writes[age].offset, 1, (uint32_t)age};
            events[n++] = (struct event){writes[age].offset + writes[age].length, 0,
                                         (uint32_t)age};
        }
        active[age] = 0;
    }
    sort_events(events, n);
    uint64_t covering = 0, made = 0;
    for (uint64_t i = 0; i < n;) {
        const uint64_t at = events[i].offset;
        while (i < n && events[i].offset == at) {
            active[events[i].age] = (unsigned char)events[i].starting;
            if (events[i].starting) {
                ages_push(ages, &covering, events[i].age);
            }
            i++;
        }
        while (covering > 0 && !active[ages[0]]) {
            ages_pop(ages, &covering);
        }
        if (covering == 0 || i == n) {
            continue;
        }
        pieces[made++] = (struct piece){at, events[i].offset, ages[0]};
    }
    heap_free(active);
    heap_free(ages);
    heap_free(events);
    x->pieces = pieces;
    x->piece_count = made;
    x->writes = writes;
    return AIODD_OK;
}

/* _replay_log: sets the overlay and x->size. */
static uint32_t replay_log(struct vhdx *x, const struct header *h) {
    static const unsigned char zero_guid[16] = {0};
    const uint32_t handle = x->layer->handle;
    const uint64_t file_size = x->layer->file_size;
    if (memcmp(h->log_guid, zero_guid, 16) == 0 || h->log_length == 0) {
        return AIODD_OK;
    }
    if (h->log_version != 0) {
        return image_error(handle, "vhdx log version %u is not supported", h->log_version);
    }
    if (h->log_offset < MIB || h->log_offset % MIB || h->log_length % MIB) {
        return image_error(handle, "vhdx log at %#lx is misaligned", (unsigned long)h->log_offset);
    }
    if (h->log_length > MAX_LOG_SIZE) {
        return image_error(handle, "vhdx log of %u bytes is larger than 256 MiB", h->log_length);
    }
    uint32_t status = check_exact(x, h->log_offset, h->log_length, "log");
    if (status != AIODD_OK) {
        return status;
    }
    if (h->log_length > LOG_HELD_MAX) {
        return AIODD_E_NOMEM;
    }
    unsigned char *bytes = disk_alloc(h->log_length);
    if (bytes == NULL) {
        return AIODD_E_NOMEM;
    }
    if ((status = view_read(x, h->log_offset, h->log_length, bytes)) != AIODD_OK) {
        return status;
    }
    const struct log log = {bytes, h->log_length, h->log_guid};
    uint64_t start = 0, chain = 0;
    if ((status = active_sequence(&log, &start, &chain)) != AIODD_OK) {
        return status;
    }
    if (chain == 0) {
        return AIODD_OK;
    }
    uint64_t count = 0;
    struct entry e;
    for (uint64_t k = 0, at = start; k < chain; k++, at = (at + e.length) % log.size) {
        parse_entry(&log, at, &e, NULL);
        count += e.writes;
    }
    struct log_write *writes = disk_alloc((size_t)(count + 1) * sizeof *writes);
    if (writes == NULL) {
        return AIODD_E_NOMEM;
    }
    uint64_t made = 0;
    for (uint64_t k = 0, at = start; k < chain; k++, at = (at + e.length) % log.size) {
        parse_entry(&log, at, &e, writes + made);
        if (e.flushed > file_size) {
            return image_error(handle,
                               "vhdx log entry %lu expects a file of %lu bytes, the file has %lu:"
                               " it was truncated",
                               (unsigned long)e.sequence, (unsigned long)e.flushed,
                               (unsigned long)file_size);
        }
        if (e.last > MAX_FILE_OFFSET) {
            return image_error(handle, "vhdx log entry %lu has an absurd file size",
                               (unsigned long)e.sequence);
        }
        const uint64_t limit = file_size > e.last ? file_size : e.last;
        for (uint64_t i = 0; i < e.writes; i++) {
            const struct log_write *w = &writes[made + i];
            if ((u128)w->offset + w->length > limit) {
                return image_error(handle,
                                   "vhdx log entry %lu writes at %#lx past the end of the file",
                                   (unsigned long)e.sequence, (unsigned long)w->offset);
            }
        }
        made += e.writes;
    }
    x->log = bytes;
    if ((status = build_overlay(x, writes, made)) != AIODD_OK) {
        return status;
    }
    if (x->piece_count > 0 && x->pieces[x->piece_count - 1].end > x->size) {
        x->size = x->pieces[x->piece_count - 1].end;
    }
    return AIODD_OK;
}

/* -- the region table and the metadata ------------------------------------------------ */

struct region {
    uint64_t offset;
    uint64_t length;
};

static int overlaps(uint64_t a, uint64_t a_length, uint64_t b, uint64_t b_length) {
    return (u128)a < (u128)b + b_length && (u128)b < (u128)a + a_length;
}

/* parse_region_table over raw (64 KiB). */
static uint32_t parse_region_table(uint32_t handle, const unsigned char *raw, struct region *bat,
                                   struct region *metadata) {
    if (!crc_ok(raw, REGION_TABLE_SIZE)) {
        return image_error(handle, "vhdx region table checksum mismatch");
    }
    if (memcmp(raw, "regi", 4) != 0) {
        return image_error(handle, "vhdx region table signature is not 'regi'");
    }
    const uint32_t count = le32(raw + 8);
    if (count > MAX_TABLE_ENTRIES) {
        return image_error(handle, "vhdx region table has too many entries (%u)", count);
    }
    int found_bat = 0, found_metadata = 0;
    for (uint32_t i = 0; i < count; i++) {
        const unsigned char *e = raw + 16 + 32 * i;
        const uint64_t offset = le64(e + 16);
        const uint64_t length = le32(e + 24);
        if (offset < MIB) {
            return image_error(handle, "vhdx region %u at %#lx overlaps the file header", i,
                               (unsigned long)offset);
        }
        for (uint32_t j = 0; j < i; j++) {
            const unsigned char *o = raw + 16 + 32 * j;
            if (overlaps(offset, length, le64(o + 16), le32(o + 24))) {
                return image_error(handle, "vhdx region %u at %#lx overlaps another region", i,
                                   (unsigned long)offset);
            }
        }
        const int is_bat = memcmp(e, BAT_GUID, 16) == 0;
        if (is_bat || memcmp(e, METADATA_GUID, 16) == 0) {
            int *found = is_bat ? &found_bat : &found_metadata;
            if (*found) {
                return image_error(handle, "vhdx region table lists the same region twice");
            }
            *found = 1;
            *(is_bat ? bat : metadata) = (struct region){offset, length};
        } else if (le32(e + 28) & 1) {
            return image_error(handle, "vhdx region table entry %u is required but unknown", i);
        }
    }
    if (!found_bat) {
        return image_error(handle, "vhdx region table has no BAT region");
    }
    if (!found_metadata) {
        return image_error(handle, "vhdx region table has no metadata region");
    }
    return AIODD_OK;
}

struct item {
    int present;
    uint32_t offset;
    uint32_t length;
};

/* parse_metadata_table over raw (64 KiB); order[] gets the items in the table's order. */
static uint32_t parse_metadata_table(uint32_t handle, const unsigned char *raw,
                                     uint64_t region_length, struct item *items, int *order,
                                     int *known) {
    if (memcmp(raw, "metadata", 8) != 0) {
        return image_error(handle, "vhdx metadata table signature is not 'metadata'");
    }
    const uint32_t count = le16(raw + 10);
    if (count > MAX_TABLE_ENTRIES) {
        return image_error(handle, "vhdx metadata table has too many entries (%u)", count);
    }
    *known = 0;
    for (uint32_t i = 0; i < count; i++) {
        const unsigned char *e = raw + 32 + 32 * i;
        int kind = 0;
        while (kind < ITEM_KINDS && memcmp(e, ITEM_GUIDS[kind], 16) != 0) {
            kind++;
        }
        const uint32_t offset = le32(e + 16);
        const uint32_t length = le32(e + 20);
        if (kind == ITEM_KINDS) {
            if (le32(e + 24) & 4) {
                return image_error(handle, "vhdx metadata item %u is required but unknown", i);
            }
            continue;
        }
        const char *name = ITEM_NAMES[kind];
        if (items[kind].present) {
            return image_error(handle, "vhdx metadata lists the %s item twice", name);
        }
        if (length > MAX_METADATA_ITEM) {
            return image_error(handle, "vhdx metadata %s item is larger than 1 MiB", name);
        }
        if (length && (offset < METADATA_TABLE_SIZE || (uint64_t)offset + length > region_length)) {
            return image_error(handle, "vhdx metadata %s item lies outside the metadata region",
                               name);
        }
        items[kind] = (struct item){1, offset, length};
        order[(*known)++] = kind;
    }
    for (int kind = 0; kind < PARENT_LOCATOR; kind++) {
        if (!items[kind].present) {
            return image_error(handle, "vhdx metadata has no %s item", ITEM_NAMES[kind]);
        }
    }
    return AIODD_OK;
}

/* An item's first `size` bytes (layout._item). */
static uint32_t item_value(const struct vhdx *x, uint64_t metadata_offset, const struct item *items,
                           int kind, unsigned size, unsigned char *value) {
    if (items[kind].length < size) {
        return image_error(x->layer->handle, "vhdx metadata %s item is too short",
                           ITEM_NAMES[kind]);
    }
    return view_read(x, metadata_offset + items[kind].offset, size, value);
}

struct parameters {
    uint64_t block_size;
    int has_parent;
    uint64_t virtual_size;
    uint64_t logical;
};

/* parse_parameters */
static uint32_t parse_parameters(const struct vhdx *x, uint64_t metadata_offset,
                                 const struct item *items, struct parameters *p) {
    const uint32_t handle = x->layer->handle;
    unsigned char fp[8], vs[8], ls[4], ps[4];
    uint32_t status;
    if ((status = item_value(x, metadata_offset, items, FILE_PARAMETERS, 8, fp)) ||
        (status = item_value(x, metadata_offset, items, VIRTUAL_DISK_SIZE, 8, vs)) ||
        (status = item_value(x, metadata_offset, items, LOGICAL_SECTOR, 4, ls)) ||
        (status = item_value(x, metadata_offset, items, PHYSICAL_SECTOR, 4, ps))) {
        return status;
    }
    const uint32_t block_size = le32(fp);
    const uint32_t bits = le32(fp + 4);
    const uint64_t virtual_size = le64(vs);
    const uint32_t logical = le32(ls);
    const uint32_t physical = le32(ps);
    if (block_size < MIN_BLOCK_SIZE || block_size > MAX_BLOCK_SIZE ||
        (block_size & (block_size - 1))) {
        return image_error(handle, "vhdx block size %u is not a power of two in 1M..256M",
                           block_size);
    }
    if (logical != 512 && logical != 4096) {
        return image_error(handle, "vhdx logical sector size %u is neither 512 nor 4096",
                           logical);
    }
    if (physical != 512 && physical != 4096) {
        return image_error(handle, "vhdx physical sector size %u is neither 512 nor 4096",
                           physical);
    }
    if (virtual_size > MAX_VIRTUAL_SIZE) {
        return image_error(handle, "vhdx virtual size %lu is larger than 64 TiB",
                           (unsigned long)virtual_size);
    }
    if (virtual_size % logical) {
        return image_error(handle,
                           "vhdx virtual size %lu is not a multiple of the sector size %u",
                           (unsigned long)virtual_size, logical);
    }
    p->has_parent = (bits & HAS_PARENT) != 0;
    if (p->has_parent && !items[PARENT_LOCATOR].present) {
        return image_error(handle, "vhdx differencing disk has no parent locator item");
    }
    p->block_size = block_size;
    p->virtual_size = virtual_size;
    p->logical = logical;
    return AIODD_OK;
}

/* -- the parent locator (parse_parent_locator, parent_path) --------------------------- */

/* Whether raw[at, at + length) is valid UTF-16LE, as Python's strict decoder sees it. */
static int utf16_ok(const unsigned char *raw, uint64_t at, uint64_t length) {
    if (length % 2) {
        return 0;
    }
    for (uint64_t i = 0; i < length; i += 2) {
        uint16_t u = le16(raw + at + i);
        if (u >= 0xD800 && u <= 0xDBFF) {
            if (i + 2 >= length) {
                return 0;
            }
            uint16_t v = le16(raw + at + i + 2);
            if (v < 0xDC00 || v > 0xDFFF) {
                return 0;
            }
            i += 2;
        } else if (u >= 0xDC00 && u <= 0xDFFF) {
            return 0;
        }
    }
    return 1;
}

static int utf16_is(const unsigned char *raw, uint64_t at, uint64_t length, const char *ascii) {
    uint64_t n = 0;
    while (ascii[n] != '\0') {
        n++;
    }
    if (length != 2 * n) {
        return 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        if (le16(raw + at + 2 * i) != (unsigned char)ascii[i]) {
            return 0;
        }
    }
    return 1;
}

/* The path in raw[at, at + length) (valid UTF-16LE) as parent_path makes it, in UTF-8:
 * '\' turned to '/', leading "./" dropped.  Returns its UTF-8 length; writes at most
 * `capacity` bytes. */
static uint64_t utf8_path(const unsigned char *raw, uint64_t at, uint64_t length, char *out,
                          uint64_t capacity) {
    uint64_t i = 0;
    while (i + 4 <= length && le16(raw + at + i) == '.' &&
           (le16(raw + at + i + 2) == '/' || le16(raw + at + i + 2) == '\\')) {
        i += 4;
    }
    uint64_t n = 0;
    unsigned char buf[4];
    while (i < length) {
        uint32_t c = le16(raw + at + i);
        i += 2;
        if (c >= 0xD800 && c <= 0xDBFF) {
            c = 0x10000 + ((c - 0xD800) << 10) + (le16(raw + at + i) - 0xDC00u);
            i += 2;
        }
        if (c == '\\') {
            c = '/';
        }
        unsigned k;
        if (c < 0x80) {
            buf[0] = (unsigned char)c;
            k = 1;
        } else if (c < 0x800) {
            buf[0] = (unsigned char)(0xC0 | c >> 6);
            buf[1] = (unsigned char)(0x80 | (c & 0x3F));
            k = 2;
        } else if (c < 0x10000) {
            buf[0] = (unsigned char)(0xE0 | c >> 12);
            buf[1] = (unsigned char)(0x80 | (c >> 6 & 0x3F));
            buf[2] = (unsigned char)(0x80 | (c & 0x3F));
            k = 3;
        } else {
            buf[0] = (unsigned char)(0xF0 | c >> 18);
            buf[1] = (unsigned char)(0x80 | (c >> 12 & 0x3F));
            buf[2] = (unsigned char)(0x80 | (c >> 6 & 0x3F));
            buf[3] = (unsigned char)(0x80 | (c & 0x3F));
            k = 4;
        }
        for (unsigned j = 0; j < k; j++, n++) {
            if (n < capacity) {
                out[n] = (char)buf[j];
            }
        }
    }
    return n;
}

/* The parent's name from the locator item raw[0:length), into name (MAX_PARENT_PATH). */
static uint32_t parent_name(uint32_t handle, const unsigned char *raw, uint64_t length, char *name,
                            uint64_t *name_length) {
    if (length < 20) {
        return image_error(handle, "vhdx structure is truncated");
    }
    if (memcmp(raw, LOCATOR_TYPE_VHDX, 16) != 0) {
        return image_error(handle, "vhdx parent locator is not of the VHDX type");
    }
    const uint32_t count = le16(raw + 18);
    /* the last entry of each key wins, as a dict keeps it */
    int64_t relative = -1, absolute = -1;
    for (uint32_t i = 0; i < count; i++) {
        const uint64_t at = 20 + 12 * (uint64_t)i;
        if (at + 12 > length) {
            return image_error(handle, "vhdx structure is truncated");
        }
        const uint64_t k_off = le32(raw + at), v_off = le32(raw + at + 4);
        const uint64_t k_len = le16(raw + at + 8), v_len = le16(raw + at + 10);
        if (k_off + k_len > length || v_off + v_len > length) {
            return image_error(handle, "vhdx parent locator entry %u lies outside the item", i);
        }
        if (!utf16_ok(raw, k_off, k_len) || !utf16_ok(raw, v_off, v_len)) {
            return image_error(handle, "vhdx parent locator entry %u is not valid UTF-16", i);
        }
        if (utf16_is(raw, k_off, k_len, "relative_path")) {
            relative = (int64_t)at;
        } else if (utf16_is(raw, k_off, k_len, "absolute_win32_path")) {
            absolute = (int64_t)at;
        }
    }
    const int64_t keys[2] = {relative, absolute};
    for (int k = 0; k < 2; k++) {
        if (keys[k] < 0) {
            continue;
        }
        const unsigned char *e = raw + keys[k];
        uint64_t n = utf8_path(raw, le32(e + 4), le16(e + 10), name, MAX_PARENT_PATH);
        if (n > MAX_PARENT_PATH) {
            return image_error(handle, "vhdx parent path is too long (%lu bytes)",
                               (unsigned long)n);
        }
        if (n > 0) {
            *name_length = n;
            return AIODD_OK;
        }
    }
    return image_error(handle, "vhdx parent locator has no relative_path or absolute_win32_path");
}

/* -- the BAT (decode._check_bat) ------------------------------------------------------ */

static uint64_t bswap64(uint64_t v) {
    return __builtin_bswap64(v);
}

/* BAT entry `index`, through the overlay. */
static uint32_t bat_entry(struct reader *r, const struct vhdx *x, uint64_t index, uint64_t *entry) {
    if (x->bat != NULL) {
        *entry = x->bat[index];
        return AIODD_OK;
    }
    const uint64_t per_chunk = disk_cluster_max() / 8;
    const uint64_t chunk = index / per_chunk;
    const uint64_t first = chunk * per_chunk;
    const uint64_t count = min_u64(per_chunk, x->bat_entries - first);
    const struct layer *layer = x->layer;
    const uint64_t *table;
    uint32_t status = disk_table(r, layer, chunk, layer->handle, layer->file_size,
                                 x->bat_offset + first * 8, count * 8, &table);
    if (status != AIODD_OK) {
        return status;
    }
    /* the cache reads big-endian entries: swapped back, the entry is little-endian */
    uint64_t value = bswap64(table[index - first]);
    if (x->piece_count > 0) {
        unsigned char raw[8];
        for (int i = 0; i < 8; i++) {
            raw[i] = (unsigned char)(value >> (8 * i));
        }
        overlay_patch(x, x->bat_offset + index * 8, raw, 8);
        value = le64(raw);
    }
    *entry = value;
    return AIODD_OK;
}

struct structure {
    const char *name;
    uint64_t offset;
    uint64_t length;
};

static uint32_t check_entry(const struct vhdx *x, const struct parameters *p, uint64_t index,
                            uint64_t entry, const struct structure *structures, int count) {
    const uint32_t handle = x->layer->handle;
    const uint32_t state = (uint32_t)(entry & STATE_MASK);
    if (state != PAYLOAD_FULLY_PRESENT && state != PAYLOAD_PARTIALLY_PRESENT) {
        return AIODD_OK;
    }
    const uint64_t offset = entry & OFFSET_MASK;
    const char *kind;
    uint64_t length;
    if ((index + 1) % (x->chunk_ratio + 1) == 0) {
        kind = "sector bitmap";
        length = SECTOR_BITMAP_BLOCK;
        if (state != SB_BLOCK_PRESENT || !p->has_parent) {
            return image_error(handle,
                               "vhdx BAT entry %lu (sector bitmap at %#lx) has state %u in a disk"
                               " without a parent",
                               (unsigned long)index, (unsigned long)offset, state);
        }
    } else {
        const uint64_t block = index - index / (x->chunk_ratio + 1);
        kind = "block";
        if ((u128)block * p->block_size >= p->virtual_size) {
            return AIODD_OK;
        }
        length = min_u64(p->block_size, p->virtual_size - block * p->block_size);
        if (state == PAYLOAD_PARTIALLY_PRESENT && !p->has_parent) {
            return image_error(handle,
                               "vhdx BAT entry %lu (block at %#lx) is partially present in a disk"
                               " without a parent",
                               (unsigned long)index, (unsigned long)offset);
        }
    }
    if ((u128)offset + length > x->size) {
        return image_error(handle, "vhdx BAT entry %lu (%s at %#lx) lies past the end of the file",
                           (unsigned long)index, kind, (unsigned long)offset);
    }
    for (int i = 0; i < count; i++) {
        if (overlaps(offset, length, structures[i].offset, structures[i].length)) {
            return image_error(handle, "vhdx BAT entry %lu (%s at %#lx) overlaps the %s",
                               (unsigned long)index, kind, (unsigned long)offset,
                               structures[i].name);
        }
    }
    return AIODD_OK;
}

/* Reads the BAT (whole when the budget allows) and checks every entry in order. */
static uint32_t load_bat(struct vhdx *x, const struct parameters *p,
                         const struct structure *structures, int count) {
    const uint64_t bytes = x->bat_entries * 8;
    const int held = bytes == 0 || disk_take_table_budget(bytes);
    unsigned char *chunk = NULL;
    uint32_t status;
    if (held) {
        x->bat = disk_alloc((size_t)bytes + 8);
        if (x->bat == NULL) {
            return AIODD_E_NOMEM;
        }
    } else {
        disk_note_tables(BAT_CHUNK);
        chunk = heap_alloc(BAT_CHUNK);
        if (chunk == NULL) {
            return AIODD_E_NOMEM;
        }
    }
    for (uint64_t done = 0; done < bytes;) {
        const uint64_t n = min_u64(bytes - done, held ? AIODD_IN_SIZE : BAT_CHUNK);
        unsigned char *dest = held ? (unsigned char *)(x->bat + done / 8) : chunk;
        if ((status = view_read(x, x->bat_offset + done, n, dest)) != AIODD_OK) {
            return status;
        }
        for (uint64_t i = 0; i < n / 8; i++) {
            const uint64_t entry = le64(dest + 8 * i);
            if (held) {
                x->bat[done / 8 + i] = entry;
            }
            if ((status = check_entry(x, p, done / 8 + i, entry, structures, count))) {
                return status;
            }
        }
        done += n;
    }
    if (chunk != NULL) {
        heap_free(chunk);
    }
    return AIODD_OK;
}

/* -- opening (decode.open_disk) ------------------------------------------------------- */

uint32_t vhdx_open(struct layer *layer, unsigned depth) {
    const uint32_t handle = layer->handle;
    uint64_t got;
    uint32_t status = disk_read_in(handle, 0, 8, &got);
    if (status != AIODD_OK) {
        return status;
    }
    if (got < 8 || memcmp(host_in(), "vhdxfile", 8) != 0) {
        return image_error(handle, "not in vhdx format: no 'vhdxfile' signature");
    }
    struct header first, second;
    const struct header *h = NULL;
    if ((status = read_header(handle, HEADER_1, &first)) ||
        (status = read_header(handle, HEADER_2, &second)) ||
        (status = choose_header(handle, &first, &second, &h))) {
        return status;
    }
    struct vhdx *x = disk_alloc(sizeof *x);
    if (x == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(x, 0, sizeof *x);
    x->layer = layer;
    x->size = layer->file_size;
    layer->vhdx = x;
    if ((status = replay_log(x, h)) != AIODD_OK) {
        return status;
    }

    unsigned char *table = heap_alloc(REGION_TABLE_SIZE);
    if (table == NULL) {
        return AIODD_E_NOMEM;
    }
    struct region bat, metadata;
    if ((status = check_exact(x, REGION_TABLE_OFFSET, REGION_TABLE_SIZE, "region table")) ||
        (status = view_read(x, REGION_TABLE_OFFSET, REGION_TABLE_SIZE, table)) ||
        (status = parse_region_table(handle, table, &bat, &metadata))) {
        return status;
    }
    struct item items[ITEM_KINDS];
    int order[ITEM_KINDS];
    int known;
    memset(items, 0, sizeof items);
    if ((status = check_exact(x, metadata.offset, METADATA_TABLE_SIZE, "metadata table")) ||
        (status = view_read(x, metadata.offset, METADATA_TABLE_SIZE, table)) ||
        (status = parse_metadata_table(handle, table, metadata.length, items, order, &known))) {
        return status;
    }
    heap_free(table);
    for (int i = 0; i < known; i++) {
        const struct item *it = &items[order[i]];
        if ((status = check_exact(x, metadata.offset + it->offset, it->length, "metadata item"))) {
            return status;
        }
    }
    struct parameters p = {0, 0, 0, 0};
    if ((status = parse_parameters(x, metadata.offset, items, &p)) != AIODD_OK) {
        return status;
    }
    x->block_size = p.block_size;
    x->sector = p.logical;
    x->chunk_ratio = MAX_SECTORS_PER_BLOCK * p.logical / p.block_size;
    layer->virtual_size = p.virtual_size;

    char *name = NULL;
    uint64_t name_length = 0;
    if (p.has_parent) {
        const struct item *it = &items[PARENT_LOCATOR];
        name = disk_alloc(MAX_PARENT_PATH + 1);
        x->bitmap = disk_alloc((size_t)(p.block_size / p.logical / 8 + 2));
        unsigned char *raw = heap_alloc((size_t)it->length + 1);
        if (name == NULL || x->bitmap == NULL || raw == NULL) {
            return AIODD_E_NOMEM;
        }
        if ((status = view_read(x, metadata.offset + it->offset, it->length, raw)) ||
            (status = parent_name(handle, raw, it->length, name, &name_length))) {
            return status;
        }
        heap_free(raw);
    }

    const uint64_t ratio = x->chunk_ratio;
    const uint64_t blocks = p.virtual_size / p.block_size + (p.virtual_size % p.block_size != 0);
    uint64_t entries = 0;
    if (blocks > 0) {
        entries = p.has_parent ? (blocks + ratio - 1) / ratio * (ratio + 1)
                               : blocks + (blocks - 1) / ratio;
    }
    if (entries * 8 > bat.length) {
        return image_error(handle, "vhdx BAT region (%lu bytes) is too small for %lu entries",
                           (unsigned long)bat.length, (unsigned long)entries);
    }
    if ((status = check_exact(x, bat.offset, entries * 8, "BAT"))) {
        return status;
    }
    x->bat_offset = bat.offset;
    x->bat_entries = entries;
    struct structure structures[4] = {
        {"file header", 0, MIB},
        {"BAT region", bat.offset, bat.length},
        {"metadata region", metadata.offset, metadata.length},
        {"log", h->log_offset, h->log_length},
    };
    if ((status = load_bat(x, &p, structures, h->log_length ? 4 : 3)) != AIODD_OK) {
        return status;
    }

    if (name != NULL) {
        status = disk_open_named(handle, AIODD_REF_PARENT, name, (size_t)name_length, "", 0,
                                 AIODD_FMT_NONE, depth + 1, &x->parent);
        if (status != AIODD_OK) {
            return status;
        }
    }
    return AIODD_OK;
}

/* -- reading (VhdxDisk.read_into) ----------------------------------------------------- */

struct walk {
    struct reader *r;
    const struct vhdx *x;
    uint64_t base; /* the virtual offset of dest[0] */
    unsigned char *dest;
};

/* An error of this layer: what was queued before it in Python's order runs first, and
 * may fail first. */
static uint32_t fail(struct walk *w, const char *format, ...) __attribute__((format(printf, 2, 3)));
static uint32_t fail(struct walk *w, const char *format, ...) {
    uint32_t status = reader_settle(w->r);
    if (status != AIODD_OK) {
        return status;
    }
    va_list args;
    va_start(args, format);
    host_verror(AIODD_E_IMAGE, w->x->layer->handle, format, args);
    va_end(args);
    return AIODD_E_IMAGE;
}

/* _read_file */
static uint32_t read_file(struct walk *w, uint64_t offset, uint64_t pos, uint64_t length) {
    if ((u128)offset + length > w->x->size) {
        return fail(w, "vhdx payload at %#lx is truncated", (unsigned long)offset);
    }
    return queue_file(w->r, w->x, offset, w->dest + pos, length);
}

/* _read_partial and common.read_by_bitmap: `n` bytes at dest[pos], virtual offset
 * base + pos, in block `block` of BAT entry `entry`. */
static uint32_t read_partial(struct walk *w, uint64_t block, uint64_t entry, uint64_t within,
                             uint64_t pos, uint64_t n) {
    const struct vhdx *x = w->x;
    const uint64_t ratio = x->chunk_ratio;
    const uint64_t chunk = block / ratio;
    uint64_t bitmap_entry;
    uint32_t status = bat_entry(w->r, x, chunk * (ratio + 1) + ratio, &bitmap_entry);
    if (status != AIODD_OK) {
        return status;
    }
    if ((bitmap_entry & STATE_MASK) != SB_BLOCK_PRESENT) {
        return fail(w, "vhdx block %lu is partially present but has no sector bitmap",
                    (unsigned long)block);
    }
    const uint64_t sector = x->sector;
    const uint64_t start = w->base + pos;
    const uint64_t origin = chunk * MAX_SECTORS_PER_BLOCK;
    const uint64_t first = start / sector;
    const uint64_t last = (start + n - 1) / sector;
    const uint64_t byte0 = (first - origin) / 8;
    const uint64_t count = (last - origin) / 8 - byte0 + 1;
    const uint64_t at = (bitmap_entry & OFFSET_MASK) + byte0;
    if (at >= x->size || x->size - at < count) {
        return fail(w, "vhdx sector bitmap of block %lu is truncated", (unsigned long)block);
    }
    /* the bitmap's bytes are needed now: the batch goes first (and its jobs run) */
    if ((status = reader_flush(w->r)) != AIODD_OK ||
        (status = view_read(x, at, count, x->bitmap)) != AIODD_OK) {
        return status;
    }
    const unsigned char *bits = x->bitmap;
    const uint64_t data = (entry & OFFSET_MASK) + within - pos; /* + pos: the file offset */
    const uint64_t base = origin + byte0 * 8;
    const uint64_t end = start + n;
    uint64_t run = first;
    for (uint64_t s = first; s <= last + 1; s++) {
        int bit = 0, current = (bits[(run - base) >> 3] >> ((run - base) & 7)) & 1;
        if (s <= last) {
            bit = (bits[(s - base) >> 3] >> ((s - base) & 7)) & 1;
            if (bit == current) {
                continue;
            }
        }
        const uint64_t lo = (run * sector > start ? run * sector : start) - w->base;
        const uint64_t hi = (s * sector < end ? s * sector : end) - w->base;
        status = current ? read_file(w, data + lo, lo, hi - lo)
                         : disk_read_parent(w->r, x->parent, w->base + lo, w->dest + lo, hi - lo);
        if (status != AIODD_OK) {
            return status;
        }
        run = s;
    }
    return AIODD_OK;
}

uint32_t vhdx_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length) {
    const uint64_t size = layer->virtual_size;
    const uint64_t total = offset < size ? min_u64(length, size - offset) : 0;
    if (total < length) {
        memset(dest + total, 0, (size_t)(length - total));
    }
    const struct vhdx *x = layer->vhdx;
    struct walk w = {r, x, offset, dest};
    const uint64_t bs = x->block_size;
    uint64_t pos = 0;
    uint64_t run_pos = 0, run_file = 0, run_length = 0;
    uint32_t status;
    while (pos < total) {
        const uint64_t block = (offset + pos) / bs;
        const uint64_t within = (offset + pos) % bs;
        const uint64_t n = min_u64(bs - within, total - pos);
        uint64_t entry;
        if ((status = bat_entry(r, x, block + block / x->chunk_ratio, &entry)) != AIODD_OK) {
            return status;
        }
        const uint32_t state = (uint32_t)(entry & STATE_MASK);
        if (state == PAYLOAD_FULLY_PRESENT) {
            const uint64_t at = (entry & OFFSET_MASK) + within;
            if (run_length && run_file + run_length == at) {
                run_length += n;
            } else {
                if (run_length && (status = read_file(&w, run_file, run_pos, run_length))) {
                    return status;
                }
                run_pos = pos;
                run_file = at;
                run_length = n;
            }
            pos += n;
            continue;
        }
        if (run_length) {
            if ((status = read_file(&w, run_file, run_pos, run_length)) != AIODD_OK) {
                return status;
            }
            run_length = 0;
        }
        if (state == PAYLOAD_NOT_PRESENT) {
            status = disk_read_parent(r, x->parent, offset + pos, dest + pos, n);
        } else if (state == PAYLOAD_UNDEFINED || state == PAYLOAD_ZERO ||
                   state == PAYLOAD_UNMAPPED || state == PAYLOAD_UNMAPPED_V095) {
            memset(dest + pos, 0, (size_t)n);
            status = AIODD_OK;
        } else if (state == PAYLOAD_PARTIALLY_PRESENT && x->parent != NULL) {
            status = read_partial(&w, block, entry, within, pos, n);
        } else {
            status = fail(&w, "vhdx BAT entry for block %lu has state %u", (unsigned long)block,
                          state);
        }
        if (status != AIODD_OK) {
            return status;
        }
        pos += n;
    }
    if (run_length) {
        return read_file(&w, run_file, run_pos, run_length);
    }
    return AIODD_OK;
}
