/* vhdx in the KVM guest: the twin of decode.py and layout.py, which say what each step
 * means.  Every check runs in the Python decoder's order with its message byte for byte;
 * a change there is a change here (tests/test_kvm_decoder_vhdx.py holds the two
 * together).
 *
 * A dirty log is replayed as Python replays it: into an overlay of the file, through
 * which every later structure and every payload byte is read.  Neither the log nor the
 * overlay is held whole, so that any log the format allows (256 MiB) replays in bounded
 * memory: the log streams through IN, and the overlay is built a window of the file at a
 * time from the log's descriptors, its data sectors read from the file where they lie.
 * The BAT is held whole when the table budget allows, else read through the table
 * cache a slot at a time. */
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

/* The log is never held: it is read through IN a window at a time, each cursor keeping
 * its own window, so that the scan, an entry's descriptors, its data sectors and its
 * checksum each move forward through the log without evicting one another. */
enum { CURSOR_SCAN, CURSOR_DESC, CURSOR_DATA, CURSOR_CRC, CURSORS };
#ifndef LOG_WINDOW /* the tests cut it down (tests/fuzz/build.py), so small logs span windows */
#define LOG_WINDOW (AIODD_IN_SIZE / CURSORS)
#endif

struct log {
    uint32_t handle;
    uint64_t offset; /* in the file */
    uint64_t size;
    unsigned char guid[16];
    uint64_t base[CURSORS];  /* the window each cursor holds; UINT64_MAX: none */
    unsigned owner[CURSORS]; /* whose part of IN holds it: cursors share a window */
};

/* A write the log makes: `length` zeros, or one sector whose bytes are lead, the log's
 * sector at `sector` (its bytes 8..4092), trail. */
struct log_write {
    uint64_t offset;
    uint64_t length;
    uint64_t sector;
    int zero;
    unsigned char lead[8];
    unsigned char trail[4];
};

/* What a data sector's write puts in the file, for an interval it owns. */
struct data_write {
    uint32_t sector; /* UINT32_MAX: the owner writes zeros */
    unsigned char lead[8];
    unsigned char trail[4];
};

/* layout.Overlay, a window of it at a time: the log's writes cut the file's offsets
 * [lo, hi) into intervals [edges[i], edges[i + 1]), i < count, each owned by the newest
 * write covering it (owner: its age + 1, 0 for none), nothing written past
 * edges[count].  A window holds at most `capacity` edges, so its memory is bounded
 * whatever the log holds; a read outside it builds the window there, again from the log.
 * The chain's writes are numbered by age (their place in the replay), oldest first. */
struct overlay {
    struct log log;
    uint64_t start; /* the chain: its first entry's position, and how many entries */
    uint64_t chain;
    uint64_t capacity;
    uint64_t *edges; /* 2 * capacity + 1: the edges are gathered here */
    uint64_t *owner; /* a segment tree over the intervals; its leaves, from `leaves` */
    uint64_t leaves;
    struct data_write *data; /* per interval */
    uint64_t count;
    uint64_t lo, hi; /* hi UINT64_MAX: nothing past the window; lo > hi: none built */
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
    struct overlay *overlay; /* NULL: no log to replay, or one that writes nothing */
    unsigned char *bitmap; /* a block's sector bitmap bytes, when the disk has a parent */
};

/* -- bytes ---------------------------------------------------------------------------- */

static uint16_t le16(const unsigned char *p) {
    return (uint16_t)(p[0] | p[1] << 8);
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

/* The log's bytes at `position` (below its size) through cursor `c`: *p, and how many
 * of them the window holds from there.  A window another cursor holds is shared, not
 * read again; one read into a cursor's part of IN takes it from those sharing it. */
static uint32_t log_bytes(struct log *log, unsigned c, uint64_t position,
                          const unsigned char **p, uint64_t *avail) {
    const uint64_t base = position / LOG_WINDOW * LOG_WINDOW;
    const uint64_t n = min_u64(LOG_WINDOW, log->size - base);
    if (log->base[c] != base) {
        unsigned holder = CURSORS;
        for (unsigned k = 0; k < CURSORS; k++) {
            if (log->base[k] == base) {
                holder = log->owner[k];
            }
        }
        if (holder == CURSORS) {
            for (unsigned k = 0; k < CURSORS; k++) {
                if (k != c && log->owner[k] == c) {
                    log->base[k] = UINT64_MAX;
                }
            }
            struct host_segment s = {log->handle, log->offset + base, n,
                                     host_in() + (uint64_t)c * LOG_WINDOW, 0};
            uint32_t status = host_readv(&s, 1);
            if (status != AIODD_OK) {
                log->base[c] = UINT64_MAX;
                return status;
            }
            if (s.got != n) {
                host_fault(); /* the log lies inside the file, which the host said is longer */
            }
            holder = c;
        }
        log->base[c] = base;
        log->owner[c] = holder;
    }
    *p = host_in() + (uint64_t)log->owner[c] * LOG_WINDOW + (position - base);
    *avail = n - (position - base);
    return AIODD_OK;
}

/* Whatever was in IN is gone (a command read into it): every window is read again. */
static void log_forget(struct log *log) {
    for (unsigned c = 0; c < CURSORS; c++) {
        log->base[c] = UINT64_MAX;
        log->owner[c] = c;
    }
}

struct entry {
    uint64_t sequence;
    uint64_t length;
    uint64_t flushed;
    uint64_t last;
    uint64_t count;
};

static void entry_head(const unsigned char *head, struct entry *e) {
    *e = (struct entry){le64(head + 16), le32(head + 8), le64(head + 48), le64(head + 56),
                        le32(head + 24)};
}

/* parse_log_entry: *valid, and *e when the entry at `position` (a sector's start) is
 * valid.  Its descriptors are checked before its checksum, which costs more: an entry
 * is valid when every check passes, in whatever order. */
static uint32_t parse_entry(struct log *log, uint64_t position, struct entry *e, int *valid) {
    const uint64_t size = log->size;
    const unsigned char *p;
    uint64_t avail;
    unsigned char head[64];
    uint32_t status = log_bytes(log, CURSOR_DESC, position, &p, &avail);
    if (status != AIODD_OK) {
        return status;
    }
    memcpy(head, p, 64);
    *valid = 0;
    const uint64_t length = le32(head + 8);
    const uint64_t seq = le64(head + 16);
    const uint64_t count = le32(head + 24);
    if (memcmp(head, "loge", 4) != 0 || memcmp(head + 32, log->guid, 16) != 0 || seq == 0) {
        return AIODD_OK;
    }
    if (length == 0 || length % LOG_SECTOR || length > size) {
        return AIODD_OK;
    }
    const uint64_t desc_sectors = (count + 2 + 127) / 128;
    if (desc_sectors * LOG_SECTOR > length) {
        return AIODD_OK;
    }
    uint64_t data_at = desc_sectors * LOG_SECTOR;
    for (uint64_t i = 0; i < count; i++) {
        const unsigned char *d;
        if ((status = log_bytes(log, CURSOR_DESC, (position + 64 + 32 * i) % size, &d, &avail))) {
            return status;
        }
        if (le64(d + 24) != seq || le64(d + 16) % LOG_SECTOR) {
            return AIODD_OK;
        }
        if (memcmp(d, "zero", 4) == 0) {
            if (le64(d + 8) % LOG_SECTOR) {
                return AIODD_OK;
            }
        } else if (memcmp(d, "desc", 4) == 0) {
            if (data_at + LOG_SECTOR > length) {
                return AIODD_OK;
            }
            const unsigned char *sector;
            if ((status = log_bytes(log, CURSOR_DATA, (position + data_at) % size, &sector,
                                    &avail))) {
                return status;
            }
            data_at += LOG_SECTOR;
            uint64_t stamp = (uint64_t)le32(sector + 4) << 32 | le32(sector + 4092);
            if (memcmp(sector, "data", 4) != 0 || stamp != seq) {
                return AIODD_OK;
            }
        } else {
            return AIODD_OK;
        }
    }
    static const unsigned char zeros[4] = {0};
    uint32_t state = crc_update(0xFFFFFFFFu, head, 4);
    state = crc_update(state, zeros, 4);
    for (uint64_t done = 8; done < length;) {
        if ((status = log_bytes(log, CURSOR_CRC, (position + done) % size, &p, &avail))) {
            return status;
        }
        const uint64_t n = min_u64(avail, length - done);
        state = crc_update(state, p, n);
        done += n;
    }
    if ((state ^ 0xFFFFFFFFu) != le32(head + 4)) {
        return AIODD_OK;
    }
    entry_head(head, e);
    *valid = 1;
    return AIODD_OK;
}

/* find_active_sequence: the chain's first entry and its length (0: no entry). */
static uint32_t active_sequence(struct log *log, uint64_t *start, uint64_t *chain) {
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
        const unsigned char *p;
        uint64_t avail;
        struct entry e;
        int valid = 0;
        seq[s] = 0; /* 0: not a valid entry (a valid one's sequence is not 0) */
        length[s] = 0;
        uint32_t status = log_bytes(log, CURSOR_SCAN, s * LOG_SECTOR, &p, &avail);
        if (status == AIODD_OK && memcmp(p, "loge", 4) == 0) {
            status = parse_entry(log, s * LOG_SECTOR, &e, &valid);
        }
        if (status != AIODD_OK) {
            return status;
        }
        if (valid) {
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

/* A walk over the chain's writes, oldest first: `entry` before each entry's writes (may
 * be NULL), `write` for each, with its age. */
struct visit {
    uint32_t (*entry)(struct visit *v, const struct entry *e);
    uint32_t (*write)(struct visit *v, uint64_t age, const struct log_write *w);
};

/* The chain was found valid: its entries are read again, unchecked, a piece at a time
 * (the windows the cursors hold must still be in IN). */
static uint32_t each_write(struct overlay *o, struct visit *v) {
    struct log *log = &o->log;
    const uint64_t size = log->size;
    uint64_t age = 0;
    uint64_t position = o->start;
    for (uint64_t k = 0; k < o->chain; k++) {
        const unsigned char *p;
        uint64_t avail;
        struct entry e;
        uint32_t status = log_bytes(log, CURSOR_DESC, position, &p, &avail);
        if (status != AIODD_OK) {
            return status;
        }
        entry_head(p, &e);
        if (v->entry != NULL && (status = v->entry(v, &e)) != AIODD_OK) {
            return status;
        }
        uint64_t data_at = (e.count + 2 + 127) / 128 * LOG_SECTOR;
        for (uint64_t i = 0; i < e.count; i++) {
            const unsigned char *d;
            if ((status = log_bytes(log, CURSOR_DESC, (position + 64 + 32 * i) % size, &d,
                                    &avail))) {
                return status;
            }
            struct log_write w;
            memset(&w, 0, sizeof w);
            w.offset = le64(d + 16);
            if (memcmp(d, "zero", 4) == 0) {
                w.length = le64(d + 8);
                w.zero = 1;
            } else {
                w.length = LOG_SECTOR;
                w.sector = (position + data_at) % size;
                data_at += LOG_SECTOR;
                memcpy(w.lead, d + 8, 8);
                memcpy(w.trail, d + 4, 4);
            }
            if ((status = v->write(v, age++, &w)) != AIODD_OK) {
                return status;
            }
        }
        position = (position + e.length) % size;
    }
    return AIODD_OK;
}

/* _replay_log's checks of each entry and write, in its order; counts the writes. */
struct check_visit {
    struct visit v;
    uint32_t handle;
    uint64_t file_size;
    struct entry entry;
    uint64_t limit;
    uint64_t written; /* writes of at least one byte */
    uint64_t end;     /* Overlay.end */
};

static uint32_t check_entry_visit(struct visit *v, const struct entry *e) {
    struct check_visit *c = (struct check_visit *)v;
    if (e->flushed > c->file_size) {
        return image_error(c->handle,
                           "vhdx log entry %lu expects a file of %lu bytes, the file has %lu:"
                           " it was truncated",
                           (unsigned long)e->sequence, (unsigned long)e->flushed,
                           (unsigned long)c->file_size);
    }
    if (e->last > MAX_FILE_OFFSET) {
        return image_error(c->handle, "vhdx log entry %lu has an absurd file size",
                           (unsigned long)e->sequence);
    }
    c->entry = *e;
    c->limit = c->file_size > e->last ? c->file_size : e->last;
    return AIODD_OK;
}

static uint32_t check_write_visit(struct visit *v, uint64_t age, const struct log_write *w) {
    struct check_visit *c = (struct check_visit *)v;
    (void)age;
    if ((u128)w->offset + w->length > c->limit) {
        return image_error(c->handle, "vhdx log entry %lu writes at %#lx past the end of the file",
                           (unsigned long)c->entry.sequence, (unsigned long)w->offset);
    }
    if (w->length > 0) {
        c->written++;
        if (w->offset + w->length > c->end) {
            c->end = w->offset + w->length;
        }
    }
    return AIODD_OK;
}

/* -- the overlay's windows ------------------------------------------------------------ */

static void sift_u64(uint64_t *a, uint64_t root, uint64_t n) {
    for (;;) {
        uint64_t child = 2 * root + 1;
        if (child >= n) {
            return;
        }
        if (child + 1 < n && a[child] < a[child + 1]) {
            child++;
        }
        if (a[root] >= a[child]) {
            return;
        }
        uint64_t t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}

/* Sorts a[0:n) and drops the repeats; returns how many are left. */
static uint64_t sort_unique(uint64_t *a, uint64_t n) {
    for (uint64_t i = n / 2; i-- > 0;) {
        sift_u64(a, i, n);
    }
    for (uint64_t end = n; end-- > 1;) {
        uint64_t t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_u64(a, 0, end);
    }
    uint64_t k = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (k == 0 || a[k - 1] != a[i]) {
            a[k++] = a[i];
        }
    }
    return k;
}

/* The index of edge `offset`, which is one. */
static uint64_t edge_index(const struct overlay *o, uint64_t offset) {
    uint64_t lo = 0, hi = o->count + 1;
    while (hi - lo > 1) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (o->edges[mid] <= offset) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* The first `capacity` distinct edges past the window's start, in a buffer of twice
 * that: sorted and cut back to `capacity` whenever it fills, whatever lies past the cut
 * refused from then on. */
struct edge_visit {
    struct visit v;
    struct overlay *o;
    uint64_t n;
    uint64_t threshold;
    int cut;
};

static void edges_compact(struct edge_visit *g) {
    struct overlay *o = g->o;
    g->n = sort_unique(o->edges, g->n);
    if (g->n > o->capacity) {
        g->n = o->capacity;
        g->threshold = o->edges[g->n - 1];
        g->cut = 1;
    }
}

static void edges_push(struct edge_visit *g, uint64_t edge) {
    if (edge >= g->threshold) {
        return;
    }
    if (g->n == 2 * g->o->capacity) {
        edges_compact(g);
        if (edge >= g->threshold) {
            return;
        }
    }
    g->o->edges[g->n++] = edge;
}

static uint32_t edge_write_visit(struct visit *v, uint64_t age, const struct log_write *w) {
    struct edge_visit *g = (struct edge_visit *)v;
    const uint64_t lo = g->o->lo;
    (void)age;
    if (w->length > 0 && w->offset + w->length > lo) {
        if (w->offset > lo) {
            edges_push(g, w->offset);
        }
        edges_push(g, w->offset + w->length);
    }
    return AIODD_OK;
}

/* A write clipped to the window: 0 when it misses it. */
static int clip(const struct overlay *o, const struct log_write *w, uint64_t *from,
                uint64_t *to) {
    if (w->length == 0) {
        return 0;
    }
    *from = w->offset > o->lo ? w->offset : o->lo;
    *to = w->offset + w->length < o->hi ? w->offset + w->length : o->hi;
    return *from < *to;
}

/* Each write owns the intervals it covers, the newer over the older: the ages come in
 * order, so a node of the tree keeps the last one set on it, and an interval's owner is
 * the largest along its path to the root. */
static uint32_t own_write_visit(struct visit *v, uint64_t age, const struct log_write *w) {
    struct overlay *o = ((struct edge_visit *)v)->o;
    uint64_t from, to;
    if (clip(o, w, &from, &to)) {
        for (uint64_t l = edge_index(o, from) + o->leaves, r = edge_index(o, to) + o->leaves;
             l < r; l >>= 1, r >>= 1) {
            if (l & 1) {
                o->owner[l++] = age + 1;
            }
            if (r & 1) {
                o->owner[--r] = age + 1;
            }
        }
    }
    return AIODD_OK;
}

/* The sectors of the data writes that own an interval (one spans at most two). */
static uint32_t data_write_visit(struct visit *v, uint64_t age, const struct log_write *w) {
    struct overlay *o = ((struct edge_visit *)v)->o;
    uint64_t from, to;
    if (!w->zero && clip(o, w, &from, &to)) {
        for (uint64_t i = edge_index(o, from); i < o->count && o->edges[i] < to; i++) {
            if (o->owner[o->leaves + i] == age + 1) {
                struct data_write *d = &o->data[i];
                d->sector = (uint32_t)w->sector;
                memcpy(d->lead, w->lead, 8);
                memcpy(d->trail, w->trail, 4);
            }
        }
    }
    return AIODD_OK;
}

/* The window from `lo`: three walks over the chain's writes (its edges, their owners,
 * the owners' sectors). */
static uint32_t build_window(struct overlay *o, uint64_t lo) {
    struct edge_visit g = {{NULL, edge_write_visit}, o, 0, UINT64_MAX, 0};
    o->lo = lo;
    o->hi = UINT64_MAX;
    log_forget(&o->log); /* IN has served other reads since */
    uint32_t status = each_write(o, &g.v);
    if (status != AIODD_OK) {
        o->lo = 1; /* none built */
        o->hi = 0;
        return status;
    }
    edges_compact(&g);
    memmove(o->edges + 1, o->edges, (size_t)g.n * 8);
    o->edges[0] = lo;
    o->count = g.n;
    o->hi = g.cut ? o->edges[g.n] : UINT64_MAX;
    o->leaves = 1;
    while (o->leaves < o->count) {
        o->leaves *= 2;
    }
    memset(o->owner, 0, (size_t)(2 * o->leaves) * 8);
    g.v.write = own_write_visit;
    if ((status = each_write(o, &g.v)) == AIODD_OK) {
        for (uint64_t n = 1; n < o->leaves; n++) {
            for (uint64_t c = 2 * n; c <= 2 * n + 1; c++) {
                if (o->owner[c] < o->owner[n]) {
                    o->owner[c] = o->owner[n];
                }
            }
        }
        for (uint64_t i = 0; i < o->count; i++) {
            o->data[i].sector = UINT32_MAX;
        }
        g.v.write = data_write_visit;
        status = each_write(o, &g.v);
    }
    if (status != AIODD_OK) {
        o->lo = 1;
        o->hi = 0;
    }
    return status;
}

/* The window holding `offset`, built there when the one held does not.  Building reads
 * the log into IN: a command's batch is sent first (what it queued comes first in
 * Python's order too). */
static uint32_t overlay_window(struct reader *r, struct overlay *o, uint64_t offset) {
    if (o->lo <= offset && offset < o->hi) {
        return AIODD_OK;
    }
    if (r != NULL) {
        uint32_t status = reader_flush(r);
        if (status != AIODD_OK) {
            return status;
        }
    }
    return build_window(o, offset);
}

/* The interval holding `offset` (in the window); count when none does. */
static uint64_t interval_of(const struct overlay *o, uint64_t offset) {
    if (o->count == 0 || offset >= o->edges[o->count]) {
        return o->count;
    }
    return edge_index(o, offset);
}

/* -- the overlay (layout.Overlay.apply, decode.LoggedFile) ---------------------------- */

/* Interval i's bytes [from, to): zeros, or its data write's sector, whose middle part
 * (the log's own bytes) is left to `middle`, the file offset where it lies given. */
struct span {
    uint64_t lead_at, lead_n;     /* in the write's lead */
    uint64_t middle_at, middle_n; /* in the log's sector */
    uint64_t trail_at, trail_n;   /* in the write's trail */
};

static void split_sector(uint64_t from, uint64_t to, struct span *s) {
    /* a data write is one sector at a sector's start: its offset is from's sector */
    const uint64_t k = from % LOG_SECTOR, end = k + (to - from);
    const uint64_t m0 = k > 8 ? k : 8, m1 = end < 4092 ? end : 4092;
    const uint64_t t0 = k > 4092 ? k : 4092;
    s->lead_at = k;
    s->lead_n = k < 8 ? (end < 8 ? end : 8) - k : 0;
    s->middle_at = m0;
    s->middle_n = m1 > m0 ? m1 - m0 : 0;
    s->trail_at = t0 - 4092;
    s->trail_n = end > t0 ? end - t0 : 0;
}

/* Overlay.apply: patch buf, the file's bytes at `offset`, in memory of the decoder's.
 * The log's bytes a patch needs are read into IN, several sectors per doorbell. */
#define PATCH_BATCH 64u
static uint32_t overlay_patch(struct reader *r, const struct vhdx *x, uint64_t offset,
                              unsigned char *buf, uint64_t length) {
    struct overlay *o = x->overlay;
    if (o == NULL) {
        return AIODD_OK;
    }
    struct host_segment segments[PATCH_BATCH];
    unsigned char *targets[PATCH_BATCH];
    size_t queued = 0;
    int flushed = 0;
    const uint64_t end = offset + length;
    uint32_t status;
    for (uint64_t cur = offset; cur < end;) {
        if ((status = overlay_window(r, o, cur)) != AIODD_OK) {
            return status;
        }
        const uint64_t stop = min_u64(end, o->hi);
        for (uint64_t i = interval_of(o, cur); cur < stop && i < o->count; i++) {
            const uint64_t to = min_u64(stop, o->edges[i + 1]);
            unsigned char *dest = buf + (cur - offset);
            const struct data_write *d = &o->data[i];
            if (o->owner[o->leaves + i] == 0) {
                /* the file's own bytes */
            } else if (d->sector == UINT32_MAX) {
                memset(dest, 0, (size_t)(to - cur));
            } else {
                struct span s;
                split_sector(cur, to, &s);
                memcpy(dest, d->lead + s.lead_at, (size_t)s.lead_n);
                memcpy(dest + s.lead_n + s.middle_n, d->trail + s.trail_at, (size_t)s.trail_n);
                if (s.middle_n > 0) {
                    if (r != NULL && !flushed) {
                        if ((status = reader_flush(r)) != AIODD_OK) {
                            return status;
                        }
                        flushed = 1;
                    }
                    segments[queued] = (struct host_segment){
                        o->log.handle, o->log.offset + d->sector + s.middle_at, s.middle_n,
                        host_in() + (uint64_t)queued * LOG_SECTOR, 0};
                    targets[queued++] = dest + s.lead_n;
                }
            }
            cur = to;
            if (queued == PATCH_BATCH || (queued > 0 && (cur >= stop || i + 1 == o->count))) {
                /* sent before the window moves: a new one is read into IN */
                if ((status = host_readv(segments, queued)) != AIODD_OK) {
                    return status;
                }
                for (size_t j = 0; j < queued; j++) {
                    if (segments[j].got != segments[j].length) {
                        host_fault(); /* the log lies inside the file */
                    }
                    memcpy(targets[j], segments[j].dest, (size_t)segments[j].length);
                }
                queued = 0;
            }
        }
        cur = stop;
    }
    return AIODD_OK;
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
    return overlay_patch(NULL, x, offset, dest, length);
}

/* The file's [offset, offset + length) into a command's dest, through the overlay: the
 * zeros and a data write's own bytes now, the file's bytes and the log's queued. */
static uint32_t queue_file(struct reader *r, const struct vhdx *x, uint64_t offset,
                           unsigned char *dest, uint64_t length) {
    const struct layer *layer = x->layer;
    struct overlay *o = x->overlay;
    if (o == NULL) {
        return reader_data(r, layer->handle, layer->file_size, offset, dest, length);
    }
    const uint64_t end = offset + length;
    uint32_t status;
    for (uint64_t cur = offset; cur < end;) {
        if ((status = overlay_window(r, o, cur)) != AIODD_OK) {
            return status;
        }
        const uint64_t stop = min_u64(end, o->hi);
        for (uint64_t i = interval_of(o, cur); cur < stop;) {
            status = AIODD_OK;
            const uint64_t to = i < o->count ? min_u64(stop, o->edges[i + 1]) : stop;
            unsigned char *at = dest + (cur - offset);
            const struct data_write *d = i < o->count ? &o->data[i] : NULL;
            if (d == NULL || o->owner[o->leaves + i] == 0) {
                status = reader_data(r, layer->handle, layer->file_size, cur, at, to - cur);
            } else if (d->sector == UINT32_MAX) {
                memset(at, 0, (size_t)(to - cur));
            } else {
                struct span s;
                split_sector(cur, to, &s);
                memcpy(at, d->lead + s.lead_at, (size_t)s.lead_n);
                memcpy(at + s.lead_n + s.middle_n, d->trail + s.trail_at, (size_t)s.trail_n);
                if (s.middle_n > 0) {
                    status = reader_data(r, o->log.handle, layer->file_size,
                                         o->log.offset + d->sector + s.middle_at, at + s.lead_n,
                                         s.middle_n);
                }
            }
            if (status != AIODD_OK) {
                return status;
            }
            cur = to;
            i++;
        }
    }
    return AIODD_OK;
}

/* How many edges a window holds at most: its memory (48 bytes an edge) stays under
 * 3 MiB whatever the log writes.  The tests cut it down, so small logs need windows. */
#ifndef EDGE_MAX
#define EDGE_MAX (64 * 1024ULL)
#endif

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
    struct overlay *o = disk_alloc(sizeof *o);
    if (o == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(o, 0, sizeof *o);
    o->log.handle = handle;
    o->log.offset = h->log_offset;
    o->log.size = h->log_length;
    memcpy(o->log.guid, h->log_guid, 16);
    o->lo = 1; /* none built */
    log_forget(&o->log);
    if ((status = active_sequence(&o->log, &o->start, &o->chain)) != AIODD_OK ||
        o->chain == 0) {
        return status;
    }
    struct check_visit c = {{check_entry_visit, check_write_visit}, handle, file_size,
                            {0, 0, 0, 0, 0}, 0, 0, 0};
    if ((status = each_write(o, &c.v)) != AIODD_OK || c.written == 0) {
        return status;
    }
    o->capacity = min_u64(EDGE_MAX, 2 * c.written);
    uint64_t leaves = 1;
    while (leaves < o->capacity) {
        leaves *= 2;
    }
    o->edges = disk_alloc((size_t)(2 * o->capacity + 1) * 8);
    o->owner = disk_alloc((size_t)(2 * leaves) * 8);
    o->data = disk_alloc((size_t)o->capacity * sizeof *o->data);
    if (o->edges == NULL || o->owner == NULL || o->data == NULL) {
        return AIODD_E_NOMEM;
    }
    x->overlay = o;
    if (c.end > x->size) {
        x->size = c.end;
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
    if (x->overlay != NULL) {
        unsigned char raw[8];
        for (int i = 0; i < 8; i++) {
            raw[i] = (unsigned char)(value >> (8 * i));
        }
        if ((status = overlay_patch(r, x, x->bat_offset + index * 8, raw, 8)) != AIODD_OK) {
            return status;
        }
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
#define fail(w, ...) reader_fail((w)->r, (w)->x->layer->handle, __VA_ARGS__)

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
