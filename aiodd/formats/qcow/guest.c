/* qcow (version 1) in the KVM guest: the twin of decode.py and layout.py, which say what
 * each step means.  Every check runs in the Python decoder's order with its message byte
 * for byte (tests/test_kvm_decoder_qcow.py holds the two together).
 *
 * Python reads a run of backing clusters when a piece of another kind follows it, and
 * inflates a compressed cluster at once; here the inflating is a job of the batch, so
 * the jobs queued so far run (reader_settle) before a backing run is read and before an
 * error is reported, as Python would have inflated them by then. */
#include "qcow/guest.h"

#include "qcow2/guest.h"

#define HEADER_SIZE 48u
#define MIN_CLUSTER_BITS 9u
#define MAX_CLUSTER_BITS 16u
#define MIN_L2_BITS 6u
#define MAX_L2_BITS 13u
#define MAX_BACKING_NAME 1023u
#define INT_MAX_U 0x7fffffffULL
#define CRYPT_AES 1u
#define OFLAG_COMPRESSED (1ULL << 63)
#define SECTOR 512u

struct qcow {
    struct layer *layer;
    struct layer *backing;
    uint32_t cluster_bits;
    uint32_t l2_bits;
    uint64_t l1_offset;
    uint64_t l1_size;
    uint64_t *l1;  /* NULL: too large to hold, read through the cache */
};

/* -- the header (layout.parse_header) ------------------------------------------------- */

struct header {
    uint64_t size;
    uint32_t cluster_bits;
    uint32_t l2_bits;
    uint64_t l1_offset;
    uint64_t l1_size;
    uint64_t backing_offset;
    uint32_t backing_size;
};

static uint32_t parse_header(const unsigned char *h, uint64_t got, uint64_t file_size,
                             uint32_t handle, struct header *out) {
    if (got < HEADER_SIZE) {
        return image_error(handle, "qcow header is truncated (the file has %lu bytes)",
                           (unsigned long)got);
    }
    if (memcmp(h, "QFI\xfb", 4) != 0) {
        return image_error(handle, "image is not in qcow format (no QFI\\xfb magic)");
    }
    const uint32_t version = be32(h + 4);
    const uint64_t backing_offset = be64(h + 8);
    const uint32_t backing_size = be32(h + 16);
    const uint64_t size = be64(h + 24);
    const uint32_t cluster_bits = h[32];
    const uint32_t l2_bits = h[33];
    const uint32_t crypt_method = be32(h + 36);
    const uint64_t l1_offset = be64(h + 40);
    if (version != 1) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "qcow version %u is not supported (only 1)%s", version,
                          version == 2 || version == 3 ? ": this is a qcow2 image" : "");
    }
    if (size <= 1) {
        return image_error(handle, "qcow image size %lu is too small (at least 2 bytes)",
                           (unsigned long)size);
    }
    if (cluster_bits < MIN_CLUSTER_BITS || cluster_bits > MAX_CLUSTER_BITS) {
        return image_error(handle, "qcow cluster_bits %u is out of range (%u to %u)",
                           cluster_bits, MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
    }
    if (l2_bits < MIN_L2_BITS || l2_bits > MAX_L2_BITS) {
        return image_error(handle, "qcow l2_bits %u is out of range (%u to %u)", l2_bits,
                           MIN_L2_BITS, MAX_L2_BITS);
    }
    if (crypt_method > CRYPT_AES) {
        return image_error(handle, "qcow encryption method %u is invalid", crypt_method);
    }
    if (crypt_method) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "qcow encryption (crypt_method %u) is not supported", crypt_method);
    }
    const uint32_t shift = cluster_bits + l2_bits;
    if (size > ~0ULL - (1ULL << shift)) {
        return image_error(handle, "qcow virtual size %lu is too big", (unsigned long)size);
    }
    const uint64_t l1_size = (size + (1ULL << shift) - 1) >> shift;
    if (l1_size > INT_MAX_U / 8) {
        return image_error(handle, "qcow virtual size %lu is too big", (unsigned long)size);
    }
    /* l1_offset + l1_size * 8 > file_size, without overflowing */
    if (l1_offset > file_size || l1_size * 8 > file_size - l1_offset) {
        return image_error(handle, "qcow L1 table at %#lx %s past the end of the file",
                           (unsigned long)l1_offset, l1_offset >= file_size ? "lies" : "extends");
    }
    if (backing_offset && backing_size > MAX_BACKING_NAME) {
        return image_error(handle, "qcow backing file name is too long (%u bytes)",
                           backing_size);
    }
    *out = (struct header){size, cluster_bits, l2_bits, l1_offset, l1_size, backing_offset,
                           backing_offset ? backing_size : 0};
    return AIODD_OK;
}

/* -- decode.open_disk ----------------------------------------------------------------- */

uint32_t qcow_open(struct layer *layer, unsigned depth) {
    const uint32_t handle = layer->handle;
    const uint64_t file_size = layer->file_size;
    const unsigned char *in = host_in();
    uint64_t got;
    struct header h = {0};
    uint32_t status = disk_read_in(handle, 0, HEADER_SIZE, &got);
    if (status != AIODD_OK || (status = parse_header(in, got, file_size, handle, &h))) {
        return status;
    }
    struct qcow *q = disk_alloc(sizeof *q);
    if (q == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(q, 0, sizeof *q);
    q->layer = layer;
    q->cluster_bits = h.cluster_bits;
    q->l2_bits = h.l2_bits;
    q->l1_offset = h.l1_offset;
    q->l1_size = h.l1_size;
    layer->qcow = q;
    layer->virtual_size = h.size / SECTOR * SECTOR;
    const uint64_t cluster_size = 1ULL << h.cluster_bits;
    const uint64_t table_size = 8ULL << h.l2_bits;
    disk_note_tables(cluster_size > table_size ? cluster_size : table_size);
    disk_note_codec(0);

    int whole;
    if ((status = disk_hold_table(handle, h.l1_offset, h.l1_size, 0, &q->l1, &whole))) {
        return status;
    }
    if (!whole) {
        host_fault();  /* the file was found long enough: the host's fault */
    }

    /* The name past the file's end reads as zeros: an empty name, no backing file. */
    if (h.backing_size == 0 || h.backing_offset >= file_size) {
        return AIODD_OK;
    }
    char *name;
    size_t length;
    status = disk_read_name(handle, h.backing_offset, h.backing_size, &name, &length);
    if (status != AIODD_OK || length == 0) {
        return status;
    }
    return disk_open_named(handle, AIODD_REF_BACKING, name, length, "", 0, AIODD_FMT_NONE,
                           depth + 1, &q->backing);
}

/* -- compressed clusters (layout.decompress_cluster) ---------------------------------- */

static uint32_t inflate_job(struct reader *r, const struct reader_job *job,
                            const unsigned char *data, uint64_t got) {
    const struct qcow *q = job->owner;
    const uint64_t cluster_size = 1ULL << q->cluster_bits;
    uint32_t status = prepare_codecs(r);
    if (status != AIODD_OK) {
        return status;
    }
    /* Python pads what the file's end cuts with zeros: so here, in a buffer of our own
     * (past `got`, IN holds the next segment's bytes). */
    static unsigned char padded[1u << MAX_CLUSTER_BITS];
    const uint64_t length = job->skip >> 32;
    if (got < length) {
        memcpy(padded, data, (size_t)got);
        memset(padded + got, 0, (size_t)(length - got));
        data = padded;
    }
    uint64_t produced = 0;
    enum inflated result =
        zlib_cluster(r->zlib, data, length, r->cluster, cluster_size, NULL, &produced);
    if (result == NO_MEMORY) {
        return AIODD_E_NOMEM;
    }
    if (result == CORRUPT) {
        return image_error(q->layer->handle, "qcow compressed cluster at %#lx fails to inflate",
                           (unsigned long)job->where);
    }
    if (produced < cluster_size) {
        return image_error(q->layer->handle,
                           "qcow compressed cluster at %#lx inflates to %lu bytes,"
                           " less than one cluster",
                           (unsigned long)job->where, (unsigned long)produced);
    }
    memcpy(job->dest, r->cluster + (job->skip & 0xffffffffULL), (size_t)job->length);
    return AIODD_OK;
}

/* -- reading (decode.QcowDisk._read) -------------------------------------------------- */

static const struct qcow *of(const struct table_walk *w) {
    return w->format;
}

static uint32_t compressed(struct table_walk *w, uint64_t entry, uint64_t pos, uint64_t n) {
    const struct qcow *q = of(w);
    const struct layer *layer = q->layer;
    uint32_t status = walk_flush(w);  /* Python flushes before it inflates */
    if (status != AIODD_OK) {
        return status;
    }
    const uint32_t shift = 63 - q->cluster_bits;
    const uint64_t host = entry & ((1ULL << shift) - 1);
    const uint64_t length = (entry >> shift) & ((1ULL << q->cluster_bits) - 1);
    if (host >= layer->file_size) {
        return walk_fail(w, "qcow compressed cluster at %#lx lies past the end of the file",
                         (unsigned long)host);
    }
    const uint64_t in_cluster = (w->base + pos) & ((1ULL << q->cluster_bits) - 1);
    /* skip: the compressed length above, the place in the cluster below (both < 2^16) */
    struct reader_job job = {
        .run = inflate_job,
        .owner = q,
        .dest = w->dest + pos,
        .skip = length << 32 | in_cluster,
        .length = n,
        .where = host,
    };
    return reader_job(w->r, layer->handle, layer->file_size, host, length, &job);
}

static uint32_t l2_offset(struct table_walk *w, uint64_t l1_index, uint64_t *offset) {
    const struct qcow *q = of(w);
    return disk_table_entry(w->r, q->layer, q->l1, q->l1_offset, q->l1_size, l1_index, offset);
}

static uint32_t l2_table(struct table_walk *w, uint64_t l2_offset, uint64_t l1_index) {
    (void)l1_index;
    const struct layer *layer = w->layer;
    if (l2_offset >= layer->file_size) {
        return walk_fail(w, "qcow L2 table at %#lx lies past the end of the file",
                         (unsigned long)l2_offset);
    }
    return disk_table(w->r, layer, l2_offset << 1, layer->handle, layer->file_size, l2_offset,
                      8ULL << of(w)->l2_bits, &w->table);
}

static uint32_t entry(struct table_walk *w, uint64_t l2_offset, uint64_t index, uint64_t pos,
                      uint64_t n) {
    const struct layer *layer = w->layer;
    const uint64_t e = w->table[index];
    if (!e) {
        parent_run_add(&w->run, pos, n);
        return AIODD_OK;
    }
    if (e & OFLAG_COMPRESSED) {
        return compressed(w, e, pos, n);
    }
    if (e & (SECTOR - 1)) {
        return walk_fail(w,
                         "qcow data cluster offset %#lx is not sector aligned"
                         " (L2 table at %#lx, index %lu)",
                         (unsigned long)e, (unsigned long)l2_offset, (unsigned long)index);
    }
    if (e >= layer->file_size) {
        return walk_fail(w, "qcow data cluster at %#lx lies past the end of the file",
                         (unsigned long)e);
    }
    uint32_t status = walk_flush(w);
    if (status != AIODD_OK) {
        return status;
    }
    const uint64_t in_cluster = (w->base + pos) & ((1ULL << of(w)->cluster_bits) - 1);
    return reader_data(w->r, layer->handle, layer->file_size, e + in_cluster, w->dest + pos, n);
}

static const struct table_walk_ops OPS = {l2_offset, l2_table, entry};

uint32_t qcow_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length) {
    const struct qcow *q = layer->qcow;
    struct table_walk w = {r, q, layer, q->backing, offset, dest, NULL, {0, 0, 0, 0}};
    return table_walk(&w, &OPS, q->cluster_bits, q->l2_bits, length);
}
