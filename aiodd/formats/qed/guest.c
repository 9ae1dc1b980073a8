/* QED in the KVM guest: the twin of decode.py and layout.py, which say what each step
 * means.  Every check runs in the Python decoder's order with its message byte for byte
 * (tests/test_kvm_decoder_qed.py holds the two together).
 *
 * Tables are read in pieces of 64 KiB through the cache, as Python reads them (a table
 * may be 16 clusters of 64 MiB); a run of backing clusters is read where Python flushes
 * it, when a piece of another kind follows it or at the end. */
#include "qed/guest.h"

#define HEADER_SIZE 64u
#define F_BACKING_FILE 0x01ULL
#define F_BACKING_FORMAT_NO_PROBE 0x04ULL
#define FEATURE_MASK 0x07ULL
#define MIN_CLUSTER_SIZE (4u << 10)
#define MAX_CLUSTER_SIZE (64u << 20)
#define MAX_TABLE_SIZE 16u
#define MAX_BACKING_NAME 4095u
#define UINT32_MAX_U 0xffffffffULL
#define ZERO_CLUSTER 1u
#define PIECE_ENTRIES 8192u  /* decode.PIECE_ENTRIES */

struct qed {
    struct layer *layer;
    struct layer *backing;
    uint64_t cluster_size;
    uint32_t cluster_bits;
    uint64_t table_size;
    uint64_t header_bytes;  /* header_size clusters, in bytes */
    uint64_t file_size;     /* rounded down to a cluster */
    uint64_t table_entries;
    uint32_t l1_shift;
    uint64_t l1_offset;
    uint64_t l1_entries;
    uint64_t *l1;  /* NULL: too large to hold, read through the cache */
};

static int power_of_two_in(uint64_t value, uint64_t low, uint64_t high) {
    return value >= low && value <= high && (value & (value - 1)) == 0;
}

static unsigned log2_u64(uint64_t value) {
    unsigned bits = 0;
    while (value > 1) {
        value >>= 1;
        bits++;
    }
    return bits;
}

/* Header.cluster_offset_valid */
static int cluster_offset_valid(const struct qed *q, uint64_t offset) {
    if (offset & (q->cluster_size - 1)) {
        return 0;
    }
    return offset >= q->header_bytes && offset < q->file_size;
}

/* Header.table_offset_valid: in 64 bits, as qemu computes it. */
static int table_offset_valid(const struct qed *q, uint64_t offset) {
    const uint64_t end = offset + (q->table_size - 1) * q->cluster_size;
    if (end <= offset) {
        return 0;
    }
    return cluster_offset_valid(q, offset) && cluster_offset_valid(q, end);
}

/* layout.max_image_size, wrapping as qemu's does. */
static uint64_t max_image_size(uint64_t cluster_size, uint64_t table_size) {
    const uint64_t entries = table_size * cluster_size / 8;
    return entries * cluster_size * entries;
}

/* -- decode.open_disk (layout.parse_header first) -------------------------------------- */

uint32_t qed_open(struct layer *layer, unsigned depth) {
    const uint32_t handle = layer->handle;
    const unsigned char *in = host_in();
    uint64_t got;
    uint32_t status = disk_read_in(handle, 0, HEADER_SIZE, &got);
    if (status != AIODD_OK) {
        return status;
    }
    if (got < HEADER_SIZE) {
        return image_error(handle, "qed header is truncated (the file has %lu bytes)",
                           (unsigned long)got);
    }
    if (memcmp(in, "QED\0", 4) != 0) {
        return image_error(handle, "image is not in qed format (no QED\\0 magic)");
    }
    const uint32_t cluster_size = le32(in + 4);
    const uint32_t table_size = le32(in + 8);
    const uint32_t header_size = le32(in + 12);
    const uint64_t features = le64(in + 16);
    const uint64_t l1_offset = le64(in + 40);
    const uint64_t image_size = le64(in + 48);
    const uint32_t backing_offset = le32(in + 56);
    const uint32_t backing_size = le32(in + 60);
    if (features & ~FEATURE_MASK) {
        return host_error(AIODD_E_UNSUPPORTED, handle, "qed image uses unsupported features %#lx",
                          (unsigned long)(features & ~FEATURE_MASK));
    }
    if (!power_of_two_in(cluster_size, MIN_CLUSTER_SIZE, MAX_CLUSTER_SIZE)) {
        return image_error(handle,
                           "qed cluster size %u is invalid (a power of two from 4 KiB to 64 MiB)",
                           cluster_size);
    }
    if (!power_of_two_in(table_size, 1, MAX_TABLE_SIZE)) {
        return image_error(handle,
                           "qed table size %u is invalid (a power of two from 1 to 16 clusters)",
                           table_size);
    }
    if (image_size % 512 != 0) {
        return image_error(handle, "qed image size %lu is not a multiple of 512",
                           (unsigned long)image_size);
    }
    if (image_size > max_image_size(cluster_size, table_size)) {
        return image_error(handle, "qed image size %lu is too large for its cluster and table sizes",
                           (unsigned long)image_size);
    }
    struct qed *q = disk_alloc(sizeof *q);
    if (q == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(q, 0, sizeof *q);
    q->layer = layer;
    q->cluster_size = cluster_size;
    q->cluster_bits = log2_u64(cluster_size);
    q->table_size = table_size;
    q->header_bytes = (uint64_t)header_size * cluster_size;
    q->file_size = layer->file_size - layer->file_size % cluster_size;
    q->table_entries = (uint64_t)table_size * cluster_size / 8;
    q->l1_shift = q->cluster_bits + log2_u64(q->table_entries);
    q->l1_offset = l1_offset;
    if (!table_offset_valid(q, l1_offset)) {
        return image_error(handle, "qed L1 table offset %#lx is invalid", (unsigned long)l1_offset);
    }
    if (header_size > UINT32_MAX_U / cluster_size) {
        return image_error(handle, "qed header size %u is too large", header_size);
    }
    if (features & F_BACKING_FILE) {
        if ((uint64_t)backing_offset + backing_size > (uint64_t)cluster_size * header_size) {
            return image_error(handle, "qed backing file name offset %#x is invalid",
                               backing_offset);
        }
        if (backing_size > MAX_BACKING_NAME) {
            return image_error(handle, "qed backing file name is too long (%u bytes)",
                               backing_size);
        }
    }
    layer->qed = q;
    layer->virtual_size = image_size;
    q->l1_entries = (image_size >> q->l1_shift) + ((image_size & ((1ULL << q->l1_shift) - 1)) != 0);
    disk_note_tables(PIECE_ENTRIES * 8);

    int whole;
    if ((status = disk_hold_table(handle, l1_offset, q->l1_entries, 1, &q->l1, &whole))) {
        return status;
    }
    if (!whole) {
        host_fault();  /* the table was found inside the file: the host's fault */
    }

    if (!(features & F_BACKING_FILE) || backing_size == 0) {
        return AIODD_OK;
    }
    char *name;
    size_t length;
    status = disk_read_name(handle, backing_offset, backing_size, &name, &length);
    if (status != AIODD_OK || length == 0) {
        return status;
    }
    const int raw = (features & F_BACKING_FORMAT_NO_PROBE) != 0;
    return disk_open_named(handle, AIODD_REF_BACKING, name, length, raw ? "raw" : "",
                           raw ? 3 : 0, raw ? AIODD_FMT_RAW : AIODD_FMT_NONE, depth + 1,
                           &q->backing);
}

/* -- reading (decode.QedDisk._read) --------------------------------------------------- */

static const struct qed *of(const struct table_walk *w) {
    return w->format;
}

/* One entry of a table at `offset` holding `entries` (QedDisk._l2_piece and the L1),
 * through the cache a piece at a time; `key_bit` keeps the L1's pieces apart. */
static uint32_t table_entry(struct table_walk *w, uint64_t offset, uint64_t entries,
                            uint64_t index, uint64_t key_bit, uint64_t *entry) {
    const struct layer *layer = w->layer;
    const uint64_t piece = index / PIECE_ENTRIES;
    const uint64_t count = min_u64(PIECE_ENTRIES, entries - piece * PIECE_ENTRIES);
    const uint64_t at = offset + piece * PIECE_ENTRIES * 8;
    const uint64_t *table;
    uint32_t status = disk_table(w->r, layer, at << 1 | key_bit, layer->handle,
                                 layer->file_size, at, count * 8, &table);
    if (status == AIODD_OK) {
        /* the cache holds big-endian reads: QED's entries are little-endian */
        *entry = __builtin_bswap64(table[index % PIECE_ENTRIES]);
    }
    return status;
}

static uint32_t l2_offset(struct table_walk *w, uint64_t l1_index, uint64_t *offset) {
    const struct qed *q = of(w);
    if (q->l1 != NULL) {
        *offset = q->l1[l1_index];
        return AIODD_OK;
    }
    return table_entry(w, q->l1_offset, q->l1_entries, l1_index, 1, offset);
}

/* Its pieces are looked up entry by entry: only the offset to check. */
static uint32_t l2_table(struct table_walk *w, uint64_t l2_offset, uint64_t l1_index) {
    if (!table_offset_valid(of(w), l2_offset)) {
        return walk_fail(w, "qed L2 table offset %#lx is invalid (L1 index %lu)",
                         (unsigned long)l2_offset, (unsigned long)l1_index);
    }
    return AIODD_OK;
}

static uint32_t entry(struct table_walk *w, uint64_t l2_offset, uint64_t index, uint64_t pos,
                      uint64_t n) {
    const struct qed *q = of(w);
    uint64_t e;
    uint32_t status = table_entry(w, l2_offset, q->table_entries, index, 0, &e);
    if (status != AIODD_OK) {
        return status;
    }
    if (e == 0) {
        parent_run_add(&w->run, pos, n);
        return AIODD_OK;
    }
    if (e == ZERO_CLUSTER) {
        if ((status = walk_flush(w)) == AIODD_OK) {
            memset(w->dest + pos, 0, (size_t)n);
        }
        return status;
    }
    if (!cluster_offset_valid(q, e)) {
        return walk_fail(w,
                         "qed data cluster offset %#lx is invalid"
                         " (L2 table at %#lx, index %lu)",
                         (unsigned long)e, (unsigned long)l2_offset, (unsigned long)index);
    }
    if ((status = walk_flush(w)) != AIODD_OK) {
        return status;
    }
    const uint64_t in_cluster = (w->base + pos) & (q->cluster_size - 1);
    return reader_data(w->r, w->layer->handle, w->layer->file_size, e + in_cluster,
                       w->dest + pos, n);
}

static const struct table_walk_ops OPS = {l2_offset, l2_table, entry};

uint32_t qed_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length) {
    const struct qed *q = layer->qed;
    struct table_walk w = {r, q, layer, q->backing, offset, dest, NULL, {0, 0, 0, 0}};
    return table_walk(&w, &OPS, q->cluster_bits, q->l1_shift - q->cluster_bits, length);
}
