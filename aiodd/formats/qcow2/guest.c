/* qcow2 in the KVM guest: the twin of decode.py and layout.py, which say what each step
 * means.  Every check runs in the Python decoder's order with its message byte for byte;
 * a change there is a change here (tests/test_kvm_decoder.py holds the two together).
 *
 * Reads are batched (disk.h), but whatever can fail still fails in Python's order: a
 * run of backing clusters is read where Python flushes it (when a run of another kind
 * follows, before a compressed cluster, at the end), and the compressed clusters queued
 * so far are decompressed (reader_settle) before a backing run is read or an error of
 * the tables is reported, as Python would have decompressed them by then. */
#include "qcow2/guest.h"

#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_createDCtx_advanced: the heap's allocator */
#include <zlib.h>
#include <zstd.h>
#include "zpool.h"
#include <zstd_errors.h>

#define MIN_CLUSTER_BITS 9u
#define MAX_CLUSTER_BITS 21u
#define V2_HEADER_LENGTH 72u
#define V3_HEADER_LENGTH 104u
#define MAX_BACKING_NAME 1023u
#define BACKING_FORMAT_BUF 16u
#define MAX_DATA_FILE_NAME 4095u
#define MAX_L1_BYTES (32u << 20)
#define MAX_REFTABLE_BYTES (8u << 20)
#define MAX_SNAPSHOTS 65536u
#define SNAPSHOT_HEADER_SIZE 40u
#define INT_MAX_U 0x7fffffffu

#define EXT_END 0x00000000u
#define EXT_BACKING_FORMAT 0xE2792ACAu
#define EXT_FEATURE_TABLE 0x6803F857u
#define EXT_DATA_FILE 0x44415441u

#define INCOMPAT_DATA_FILE (1u << 2)
#define INCOMPAT_COMPRESSION (1u << 3)
#define INCOMPAT_EXTL2 (1u << 4)
#define INCOMPAT_KNOWN 0x1Fu
#define AUTOCLEAR_DATA_FILE_RAW (1u << 1)

#define COMPRESSION_ZLIB 0u
#define COMPRESSION_ZSTD 1u

#define L1E_OFFSET_MASK 0x00FFFFFFFFFFFE00ULL
#define L2E_OFFSET_MASK 0x00FFFFFFFFFFFE00ULL
#define OFLAG_COPIED (1ULL << 63)
#define OFLAG_COMPRESSED (1ULL << 62)
#define OFLAG_ZERO 1ULL
#define ALL_ALLOC 0xFFFFFFFFULL
#define SUBCLUSTER_BITS 5u

/* layout._ZSTD_MAX_WINDOW: a frame asking for a larger window does not decode. */
#define ZSTD_WINDOW_LOG_MAX 23
/* zlib's two blocks for a raw inflate with windowBits 12 (its state, a 4 KiB window). */
#define ZLIB_POOL (32u << 10)

struct qcow2 {
    struct layer *layer;
    struct layer *backing;
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t l2_bits;
    uint32_t compression;
    int extended;
    int external;
    uint64_t l1_offset;
    uint64_t l1_entries;
    uint64_t *l1; /* NULL: too large to hold, read through the cache */
    uint32_t data_handle;
    uint64_t data_size;
    const char *data_name;
    size_t data_name_length;
};

/* -- the header (layout.py) ----------------------------------------------------------- */

/* The image's first cluster as read: `length` bytes, zeros after them up to `padded`
 * (qemu reads zeros past a short file's end). */
struct view {
    const unsigned char *bytes;
    uint64_t length;
    uint64_t padded;
};

static unsigned char byte_at(const struct view *v, uint64_t i) {
    return i < v->length ? v->bytes[i] : 0;
}

static uint32_t u32_at(const struct view *v, uint64_t i) {
    return (uint32_t)byte_at(v, i) << 24 | (uint32_t)byte_at(v, i + 1) << 16 |
           (uint32_t)byte_at(v, i + 2) << 8 | (uint32_t)byte_at(v, i + 3);
}

/* layout._c_string: a name is read up to its first NUL. */
static uint64_t c_length(const struct view *v, uint64_t at, uint64_t length) {
    for (uint64_t i = 0; i < length; i++) {
        if (byte_at(v, at + i) == 0) {
            return i;
        }
    }
    return length;
}

struct name {
    uint64_t at;
    uint64_t length;
    int present;
};

struct extensions {
    struct name backing_format;
    struct name data_file;
};

struct header {
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t compression;
    uint64_t size;
    uint64_t l1_offset;
    uint64_t l1_entries;
    uint64_t incompatible;
    struct name backing_file;
    struct name backing_format;
    struct name data_file;
};

/* layout.header_cluster_bits, over the first `length` bytes of the file. */
static uint32_t header_cluster_bits(const unsigned char *head, uint64_t length, uint32_t handle,
                                    uint32_t *cluster_bits) {
    if (length < 24) {
        return image_error(handle, "qcow2 header is truncated (the file has %lu bytes)",
                           (unsigned long)length);
    }
    if (memcmp(head, "QFI\xfb", 4) != 0) {
        return image_error(handle, "image is not in qcow2 format (no QFI\\xfb magic)");
    }
    uint32_t version = be32(head + 4);
    if (version != 2 && version != 3) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "qcow2 version %u is not supported (only 2 and 3)", version);
    }
    uint32_t bits = be32(head + 20);
    if (bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
        return image_error(handle, "qcow2 cluster_bits %u is out of range (%u to %u)", bits,
                           MIN_CLUSTER_BITS, MAX_CLUSTER_BITS);
    }
    *cluster_bits = bits;
    return AIODD_OK;
}

/* layout._check_table: qemu's qcow2_validate_table. */
static uint32_t check_table(uint32_t handle, const char *what, uint64_t offset, uint64_t entries,
                            uint64_t entry_length, uint64_t max_bytes, uint64_t cluster_size) {
    if (entries > max_bytes / entry_length) {
        return image_error(handle, "qcow2 %s is too large (%lu entries)", what,
                           (unsigned long)entries);
    }
    if (INT64_MAX_U - entries * entry_length < offset || (offset & (cluster_size - 1)) != 0) {
        return image_error(handle, "qcow2 %s offset %#lx is invalid", what, (unsigned long)offset);
    }
    return AIODD_OK;
}

/* layout._check_in_file (after check_table: offset + length cannot overflow). */
static uint32_t check_in_file(uint32_t handle, const char *what, uint64_t offset, uint64_t length,
                              uint64_t file_size) {
    if (length != 0 && offset + length > file_size) {
        return image_error(handle, "qcow2 %s at %#lx %s past the end of the file", what,
                           (unsigned long)offset, offset >= file_size ? "lies" : "extends");
    }
    return AIODD_OK;
}

/* layout.parse_extensions over v[start:end].  `report` 0: a failure is only returned
 * (the feature-name lookup ignores a bad extension area), nothing is recorded. */
static uint32_t parse_extensions(const struct view *v, uint64_t start, uint64_t end,
                                 uint32_t handle, int report, struct extensions *ext) {
    memset(ext, 0, sizeof *ext);
    uint64_t offset = start;
    while (offset < end) {
        if (offset + 8 > v->padded) {
            return report ? image_error(handle, "qcow2 header extension at %#lx is too large",
                                        (unsigned long)offset)
                          : AIODD_E_IMAGE;
        }
        uint32_t magic = u32_at(v, offset);
        uint64_t length = u32_at(v, offset + 4);
        offset += 8;
        if (offset > end || length > end - offset) {
            return report ? image_error(handle, "qcow2 header extension %#010x at %#lx is too large",
                                        magic, (unsigned long)(offset - 8))
                          : AIODD_E_IMAGE;
        }
        if (magic == EXT_END) {
            break;
        }
        if (magic == EXT_BACKING_FORMAT) {
            if (length >= BACKING_FORMAT_BUF) {
                return report ? image_error(handle,
                                            "qcow2 backing format name is too long (%lu bytes)",
                                            (unsigned long)length)
                              : AIODD_E_IMAGE;
            }
            ext->backing_format = (struct name){offset, c_length(v, offset, length), 1};
        } else if (magic == EXT_DATA_FILE) {
            ext->data_file = (struct name){offset, c_length(v, offset, length), 1};
        }
        offset += (length + 7) & ~(uint64_t)7;
    }
    return AIODD_OK;
}

/* The first non-empty name the feature tables give incompatible bit `bit`, as
 * layout._unsupported_features finds it; the area was parsed whole already. */
static int feature_label(const struct view *v, uint64_t start, uint64_t end, unsigned bit,
                         struct name *label) {
    uint64_t offset = start;
    while (offset < end) {
        uint32_t magic = u32_at(v, offset);
        uint64_t length = u32_at(v, offset + 4);
        offset += 8;
        if (magic == EXT_END) {
            break;
        }
        if (magic == EXT_FEATURE_TABLE) {
            for (uint64_t pos = 0; pos + 48 <= length; pos += 48) {
                uint64_t n = c_length(v, offset + pos + 2, 46);
                if (byte_at(v, offset + pos) == 0 && byte_at(v, offset + pos + 1) == bit && n > 0) {
                    *label = (struct name){offset + pos + 2, n, 1};
                    return 1;
                }
            }
        }
        offset += (length + 7) & ~(uint64_t)7;
    }
    return 0;
}

static void append(char *buf, size_t capacity, size_t *length, const char *format, ...)
    __attribute__((format(printf, 4, 5)));
static void append(char *buf, size_t capacity, size_t *length, const char *format, ...) {
    va_list args;
    va_start(args, format);
    *length += aiodd_vformat(buf + *length, capacity - *length, format, args);
    va_end(args);
}

/* layout._unsupported_features */
static uint32_t unsupported_features(const struct view *v, uint64_t start, uint64_t end,
                                     uint64_t mask, uint32_t handle) {
    struct extensions ext;
    int named = parse_extensions(v, start, end, handle, 0, &ext) == AIODD_OK;
    char text[64 * 64];
    size_t length = 0;
    unsigned parts = 0;
    for (unsigned bit = 0; bit < 64; bit++) {
        if (((mask >> bit) & 1) == 0) {
            continue;
        }
        append(text, sizeof text, &length, "%s", parts++ ? ", " : "");
        struct name label;
        if (named && feature_label(v, start, end, bit, &label)) {
            char name[46];
            for (uint64_t i = 0; i < label.length; i++) {
                name[i] = (char)byte_at(v, label.at + i);
            }
            append(text, sizeof text, &length, "bit %u (%.*s)", bit, (int)label.length, name);
        } else {
            append(text, sizeof text, &length, "bit %u", bit);
        }
    }
    return host_error(AIODD_E_UNSUPPORTED, handle,
                      "qcow2 image uses unsupported incompatible %s: %.*s",
                      parts == 1 ? "feature" : "features", (int)length, text);
}

/* layout.parse_header: `cluster` holds the file's first min(cluster size, file size)
 * bytes; tables are checked against file_size. */
static uint32_t parse_header(const unsigned char *bytes, uint64_t got, uint64_t file_size,
                             uint32_t handle, struct header *h) {
    uint32_t cluster_bits;
    uint32_t status = header_cluster_bits(bytes, got, handle, &cluster_bits);
    if (status != AIODD_OK) {
        return status;
    }
    const uint64_t cluster_size = 1ULL << cluster_bits;
    const uint64_t length = min_u64(got, cluster_size);
    if (length < V2_HEADER_LENGTH) {
        return image_error(handle, "qcow2 header is truncated (the file has %lu bytes)",
                           (unsigned long)length);
    }
    const uint32_t version = be32(bytes + 4);
    const uint64_t backing_file_offset = be64(bytes + 8);
    const uint32_t backing_file_size = be32(bytes + 16);
    const uint64_t size = be64(bytes + 24);
    const uint32_t crypt_method = be32(bytes + 32);
    const uint32_t l1_size = be32(bytes + 36);
    const uint64_t l1_table_offset = be64(bytes + 40);
    const uint64_t refcount_table_offset = be64(bytes + 48);
    const uint32_t refcount_table_clusters = be32(bytes + 56);
    const uint32_t nb_snapshots = be32(bytes + 60);
    const uint64_t snapshots_offset = be64(bytes + 64);

    uint64_t incompatible = 0;
    uint64_t autoclear = 0;
    uint32_t refcount_order = 4;
    uint32_t header_length = V2_HEADER_LENGTH;
    if (version != 2) {
        if (length < V3_HEADER_LENGTH) {
            return image_error(handle,
                               "qcow2 version 3 header is truncated (the file has %lu bytes)",
                               (unsigned long)length);
        }
        incompatible = be64(bytes + 72);
        autoclear = be64(bytes + 88);
        refcount_order = be32(bytes + 96);
        header_length = be32(bytes + 100);
        if (header_length < V3_HEADER_LENGTH) {
            return image_error(handle,
                               "qcow2 header_length %u is too short"
                               " (version 3 needs at least %u)",
                               header_length, V3_HEADER_LENGTH);
        }
    }
    if (header_length > cluster_size) {
        return image_error(handle, "qcow2 header_length %u exceeds the cluster size",
                           header_length);
    }
    if (header_length > length) {
        return image_error(handle,
                           "qcow2 header is truncated (header_length %u, the file has %lu bytes)",
                           header_length, (unsigned long)length);
    }
    if (backing_file_offset > cluster_size) {
        return image_error(handle, "qcow2 backing file name offset %#lx is outside the header",
                           (unsigned long)backing_file_offset);
    }
    const uint64_t ext_end = backing_file_offset ? backing_file_offset : cluster_size;
    const struct view padded = {bytes, length, cluster_size};

    const uint32_t compression = header_length > V3_HEADER_LENGTH ? bytes[V3_HEADER_LENGTH] : 0;
    if (compression != COMPRESSION_ZLIB && compression != COMPRESSION_ZSTD) {
        return host_error(AIODD_E_UNSUPPORTED, handle, "qcow2 compression type %u is unknown",
                          compression);
    }
    if (compression == COMPRESSION_ZLIB && (incompatible & INCOMPAT_COMPRESSION)) {
        return image_error(handle,
                           "qcow2 compression type bit is set but the compression type is zlib");
    }
    if (compression != COMPRESSION_ZLIB && !(incompatible & INCOMPAT_COMPRESSION)) {
        return image_error(
            handle, "qcow2 compression type is not zlib but the compression type bit is clear");
    }
    if (incompatible & ~(uint64_t)INCOMPAT_KNOWN) {
        return unsupported_features(&padded, header_length, ext_end,
                                    incompatible & ~(uint64_t)INCOMPAT_KNOWN, handle);
    }

    const int extended = (incompatible & INCOMPAT_EXTL2) != 0;
    if (extended && cluster_size / 32 < 512) {
        return image_error(handle,
                           "qcow2 extended L2 entries need clusters of at least 16 KiB"
                           " (the cluster size is %lu)",
                           (unsigned long)cluster_size);
    }
    if (refcount_order > 6) {
        return image_error(handle, "qcow2 refcount_order %u is too large (at most 6)",
                           refcount_order);
    }
    if (crypt_method) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "qcow2 encryption (crypt_method %u) is not supported", crypt_method);
    }

    if (refcount_table_clusters == 0) {
        return image_error(handle, "qcow2 image has no refcount table");
    }
    if ((status = check_table(handle, "refcount table", refcount_table_offset,
                              refcount_table_clusters, cluster_size, MAX_REFTABLE_BYTES,
                              cluster_size)) ||
        (status = check_in_file(handle, "refcount table", refcount_table_offset,
                                refcount_table_clusters * cluster_size, file_size)) ||
        (status = check_table(handle, "snapshot table", snapshots_offset, nb_snapshots,
                              SNAPSHOT_HEADER_SIZE, SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
                              cluster_size)) ||
        (status = check_in_file(handle, "snapshot table", snapshots_offset,
                                (uint64_t)nb_snapshots * SNAPSHOT_HEADER_SIZE, file_size)) ||
        (status = check_table(handle, "L1 table", l1_table_offset, l1_size, 8, MAX_L1_BYTES,
                              cluster_size))) {
        return status;
    }

    const uint32_t l2_bits = cluster_bits - (extended ? 4u : 3u);
    const uint32_t shift = cluster_bits + l2_bits;
    const uint64_t l1_entries = (size >> shift) + ((size & ((1ULL << shift) - 1)) != 0);
    if (l1_entries > INT_MAX_U) {
        return image_error(handle, "qcow2 virtual size %lu is too big", (unsigned long)size);
    }
    if (l1_size < l1_entries) {
        return image_error(handle,
                           "qcow2 L1 table is too small (%u entries, the virtual size needs %lu)",
                           l1_size, (unsigned long)l1_entries);
    }
    if ((status = check_in_file(handle, "L1 table", l1_table_offset, l1_entries * 8, file_size))) {
        return status;
    }

    struct extensions ext;
    if ((status = parse_extensions(&padded, header_length, ext_end, handle, 1, &ext))) {
        return status;
    }
    memset(h, 0, sizeof *h);
    if (incompatible & INCOMPAT_DATA_FILE) {
        if (!ext.data_file.present || ext.data_file.length == 0) {
            return image_error(
                handle, "qcow2 external data file bit is set but the image names no data file");
        }
        if (ext.data_file.length > MAX_DATA_FILE_NAME) {
            return image_error(handle, "qcow2 external data file name is too long (%lu bytes)",
                               (unsigned long)ext.data_file.length);
        }
        h->data_file = ext.data_file;
    } else if (autoclear & AUTOCLEAR_DATA_FILE_RAW) {
        return image_error(handle,
                           "qcow2 raw external data bit is set without an external data file");
    }

    if (backing_file_offset) {
        uint64_t room = cluster_size - backing_file_offset;
        if (backing_file_size > min_u64(MAX_BACKING_NAME, room)) {
            return image_error(handle, "qcow2 backing file name is too long (%u bytes)",
                               backing_file_size);
        }
        uint64_t n = c_length(&padded, backing_file_offset, backing_file_size);
        h->backing_file = (struct name){backing_file_offset, n, n > 0};
    }
    if (ext.backing_format.present && ext.backing_format.length > 0) {
        h->backing_format = ext.backing_format;
    }
    h->version = version;
    h->cluster_bits = cluster_bits;
    h->compression = compression;
    h->size = size;
    h->l1_offset = l1_table_offset;
    h->l1_entries = l1_entries;
    h->incompatible = incompatible;
    return AIODD_OK;
}

/* A name of the header, kept past the next read into IN. */
static const char *keep_name(const unsigned char *bytes, uint64_t got, struct name n) {
    char *copy = disk_alloc((size_t)n.length + 1);
    if (copy != NULL) {
        const struct view v = {bytes, got, got};
        for (uint64_t i = 0; i < n.length; i++) {
            copy[i] = (char)byte_at(&v, n.at + i);
        }
        copy[n.length] = '\0';
    }
    return copy;
}

/* The formats a backing file may be declared as (aiodd.formats.INPUT_FORMATS). */
static int input_format(const char *name, size_t length) {
    static const char *const formats[] = {"parallels", "qcow", "qcow2", "qed", "raw",
                                          "vdi",       "vhdx", "vmdk",  "vpc"};
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++) {
        size_t n = 0;
        while (formats[i][n] != '\0') {
            n++;
        }
        if (n == length && memcmp(formats[i], name, n) == 0) {
            return 1;
        }
    }
    return 0;
}

/* decode.open_disk */
uint32_t qcow2_open(struct layer *layer, unsigned depth) {
    const uint32_t handle = layer->handle;
    const uint64_t file_size = layer->file_size;
    const unsigned char *in = host_in();
    uint64_t got;
    uint32_t cluster_bits;
    uint32_t status = disk_read_in(handle, 0, 24, &got);
    if (status != AIODD_OK ||
        (status = header_cluster_bits(in, got, handle, &cluster_bits)) != AIODD_OK) {
        return status;
    }
    status = disk_read_in(handle, 0, min_u64(1ULL << cluster_bits, file_size), &got);
    struct header h;
    if (status != AIODD_OK || (status = parse_header(in, got, file_size, handle, &h))) {
        return status;
    }

    struct qcow2 *q = disk_alloc(sizeof *q);
    if (q == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(q, 0, sizeof *q);
    q->layer = layer;
    q->version = h.version;
    q->cluster_bits = h.cluster_bits;
    q->extended = (h.incompatible & INCOMPAT_EXTL2) != 0;
    q->l2_bits = h.cluster_bits - (q->extended ? 4u : 3u);
    q->compression = h.compression;
    q->l1_offset = h.l1_offset;
    q->l1_entries = h.l1_entries;
    q->data_handle = handle;
    q->data_size = file_size;
    layer->qcow2 = q;
    layer->virtual_size = h.size / 512 * 512;
    const char *backing_file = NULL;
    const char *backing_format = NULL;
    if (h.data_file.present) {
        q->data_name = keep_name(in, got, h.data_file);
        q->data_name_length = (size_t)h.data_file.length;
    }
    if (h.backing_file.present) {
        backing_file = keep_name(in, got, h.backing_file);
    }
    if (h.backing_format.present) {
        backing_format = keep_name(in, got, h.backing_format);
    }
    if ((h.data_file.present && q->data_name == NULL) ||
        (h.backing_file.present && backing_file == NULL) ||
        (h.backing_format.present && backing_format == NULL)) {
        return AIODD_E_NOMEM;
    }
    disk_note_tables(1ULL << h.cluster_bits);
    disk_note_codec(h.compression == COMPRESSION_ZSTD);

    int whole;
    if ((status = disk_hold_table(handle, h.l1_offset, h.l1_entries, 0, &q->l1, &whole))) {
        return status;
    }
    if (!whole) {
        return image_error(handle, "qcow2 L1 table at %#lx extends past the end of the file",
                           (unsigned long)h.l1_offset);
    }

    struct host_file file;
    if (q->data_name != NULL) {
        status = host_open(handle, AIODD_REF_DATA_FILE, q->data_name, q->data_name_length, "", 0,
                           &file);
        if (status != AIODD_OK) {
            return status;
        }
        if (file.format != AIODD_FMT_NONE) {
            host_fault();
        }
        q->external = 1;
        q->data_handle = file.handle;
        q->data_size = file.size;
    }
    if (backing_file != NULL) {
        size_t name_length = (size_t)h.backing_file.length;
        size_t format_length = backing_format != NULL ? (size_t)h.backing_format.length : 0;
        if (backing_format != NULL && !input_format(backing_format, format_length)) {
            return host_error(AIODD_E_UNSUPPORTED, handle,
                              "qcow2 backing file '%.*s' has format '%.*s',"
                              " which aiodd does not read",
                              (int)name_length, backing_file, (int)format_length, backing_format);
        }
        status = disk_open_named(handle, AIODD_REF_BACKING, backing_file, name_length,
                                 backing_format != NULL ? backing_format : "", format_length,
                                 AIODD_FMT_NONE, depth + 1, &q->backing);
        if (status != AIODD_OK) {
            return status;
        }
    }
    return AIODD_OK;
}

/* -- compressed clusters (layout.decompress_cluster) ---------------------------------- */

struct zlib_state {
    z_stream stream;
    struct zpool pool;
};

static void *zstd_alloc(void *opaque, size_t size) {
    (void)opaque;
    return heap_alloc(size);
}

static void zstd_free(void *opaque, void *address) {
    (void)opaque;
    heap_free(address);
}

/* The codecs for a command, made once: the cluster buffer and zlib's pool first, zstd
 * last, so that zstd's window (the one block that is freed and made again, when a frame
 * needs another size) stays on top of the heap and is given back. */
uint32_t prepare_codecs(struct reader *r) {
    if (r->cluster != NULL) {
        return AIODD_OK;
    }
    unsigned char *cluster = heap_alloc((size_t)disk_cluster_max() + 1);
    if (cluster == NULL) {
        return AIODD_E_NOMEM;
    }
    if (disk_uses_codec(0)) {
        struct zlib_state *z = heap_alloc(sizeof *z);
        unsigned char *pool = heap_alloc(ZLIB_POOL);
        if (z == NULL || pool == NULL) {
            return AIODD_E_NOMEM;
        }
        memset(z, 0, sizeof *z);
        zpool_attach(&z->stream, &z->pool, pool, ZLIB_POOL);
        if (inflateInit2(&z->stream, -12) != Z_OK) {
            return AIODD_E_NOMEM;
        }
        r->zlib = z;
    }
    if (disk_uses_codec(1)) {
        ZSTD_customMem memory = {zstd_alloc, zstd_free, NULL};
        ZSTD_DCtx *dctx = ZSTD_createDCtx_advanced(memory);
        if (dctx == NULL ||
            ZSTD_isError(ZSTD_DCtx_setParameter(dctx, ZSTD_d_windowLogMax, ZSTD_WINDOW_LOG_MAX))) {
            return AIODD_E_NOMEM;
        }
        r->zstd = dctx;
    }
    r->cluster = cluster;
    return AIODD_OK;
}

/* zlib.decompressobj(-12).decompress(data, limit), as CPython runs it: inflate with
 * Z_SYNC_FLUSH while the output fills, stopping at the limit, an error raised from any
 * call.  The output is `out` and then, when `extra` is given, one more byte there (a
 * whole cluster inflates straight into the command's output; the extra byte only tells
 * "more than one cluster"). */
enum inflated zlib_cluster(struct zlib_state *z, const unsigned char *data, uint64_t got,
                           unsigned char *out, uint64_t out_size, unsigned char *extra,
                           uint64_t *produced) {
    z_stream *s = &z->stream;
    if (inflateReset(s) != Z_OK) {
        return CORRUPT;
    }
    s->next_in = (Bytef *)(uintptr_t)data;
    s->avail_in = (uInt)got;
    s->next_out = out;
    s->avail_out = (uInt)out_size;
    int extra_used = 0;
    for (;;) {
        int err = inflate(s, Z_SYNC_FLUSH);
        if (err == Z_MEM_ERROR) {
            return NO_MEMORY;
        }
        if (err != Z_OK && err != Z_BUF_ERROR && err != Z_STREAM_END) {
            return CORRUPT;
        }
        if (err == Z_STREAM_END || s->avail_out != 0 || extra == NULL || extra_used) {
            break;
        }
        extra_used = 1;
        s->next_out = extra;
        s->avail_out = 1;
    }
    *produced = s->total_out;
    return INFLATED;
}

/* zstandard's stream_reader(data, read_across_frames=False).read(limit), as its C
 * backend runs it: one ZSTD_decompressStream per step, stopping when the output is
 * full, when a frame ends having produced something, or when the input is used up. */
static enum inflated zstd_cluster(ZSTD_DCtx *dctx, const unsigned char *data, uint64_t got,
                                  unsigned char *out, uint64_t out_size, uint64_t *produced) {
    if (ZSTD_isError(ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only))) {
        return CORRUPT;
    }
    ZSTD_inBuffer input = {data, (size_t)got, 0};
    ZSTD_outBuffer output = {out, (size_t)out_size, 0};
    while (input.pos < input.size) {
        size_t ret = ZSTD_decompressStream(dctx, &output, &input);
        if (ZSTD_isError(ret)) {
            return ZSTD_getErrorCode(ret) == ZSTD_error_memory_allocation ? NO_MEMORY : CORRUPT;
        }
        if (output.pos != 0 && (output.pos == output.size || ret == 0)) {
            break;
        }
    }
    *produced = output.pos;
    return INFLATED;
}

static uint32_t inflate_job(struct reader *r, const struct reader_job *job,
                            const unsigned char *data, uint64_t got) {
    const struct qcow2 *q = job->owner;
    const uint32_t handle = q->layer->handle;
    const uint64_t cluster_size = 1ULL << q->cluster_bits;
    uint32_t status = prepare_codecs(r);
    if (status != AIODD_OK) {
        return status;
    }
    const int zstd = q->compression == COMPRESSION_ZSTD;
    const int direct = !zstd && job->skip == 0 && job->length == cluster_size;
    unsigned char extra;
    uint64_t produced = 0;
    enum inflated result;
    if (zstd) {
        result = zstd_cluster(r->zstd, data, got, r->cluster, cluster_size + 1, &produced);
    } else if (direct) {
        result = zlib_cluster(r->zlib, data, got, job->dest, cluster_size, &extra, &produced);
    } else {
        result = zlib_cluster(r->zlib, data, got, r->cluster, cluster_size + 1, NULL, &produced);
    }
    if (result == NO_MEMORY) {
        return AIODD_E_NOMEM;
    }
    if (result == CORRUPT) {
        return image_error(handle, "qcow2 compressed cluster at %#lx fails to inflate",
                           (unsigned long)job->where);
    }
    if (produced > cluster_size) {
        return image_error(handle, "qcow2 compressed cluster at %#lx inflates beyond one cluster",
                           (unsigned long)job->where);
    }
    if (produced < cluster_size) {
        return image_error(handle,
                           "qcow2 compressed cluster at %#lx inflates to %lu bytes,"
                           " less than one cluster",
                           (unsigned long)job->where, (unsigned long)produced);
    }
    if (!direct) {
        memcpy(job->dest, r->cluster + job->skip, (size_t)job->length);
    }
    return AIODD_OK;
}

/* -- reading (decode._Reader) --------------------------------------------------------- */

static const struct qcow2 *of(const struct table_walk *w) {
    return w->format;
}

static uint32_t add_backing(struct table_walk *w, uint64_t pos, uint64_t n) {
    parent_run_add(&w->run, pos, n);
    return AIODD_OK;
}

static uint32_t add_zero(struct table_walk *w, uint64_t pos, uint64_t n) {
    uint32_t status = walk_flush(w);
    if (status == AIODD_OK) {
        memset(w->dest + pos, 0, (size_t)n);
    }
    return status;
}

static uint32_t add_data(struct table_walk *w, uint64_t pos, uint64_t n, uint64_t source) {
    uint32_t status = walk_flush(w);
    if (status != AIODD_OK) {
        return status;
    }
    return reader_data(w->r, of(w)->data_handle, of(w)->data_size, source, w->dest + pos, n);
}

static uint32_t host_cluster(struct table_walk *w, uint64_t entry, uint64_t l2_offset,
                             uint64_t index, uint64_t guest_cluster, uint64_t *host) {
    const struct qcow2 *q = of(w);
    uint64_t h = entry & L2E_OFFSET_MASK;
    if (h & ((1ULL << q->cluster_bits) - 1)) {
        return walk_fail(w,
                         "qcow2 data cluster offset %#lx is not cluster aligned"
                         " (L2 table at %#lx, index %lu)",
                         (unsigned long)h, (unsigned long)l2_offset, (unsigned long)index);
    }
    if (q->external && h != guest_cluster) {
        return walk_fail(w,
                         "qcow2 data cluster at %#lx in the external data file does not match"
                         " its guest offset %#lx",
                         (unsigned long)h, (unsigned long)guest_cluster);
    }
    *host = h;
    return AIODD_OK;
}

static uint32_t past_end(struct table_walk *w, uint64_t host) {
    const struct qcow2 *q = of(w);
    if (q->external) {
        return walk_fail(w,
                         "qcow2 data cluster at %#lx lies past the end of the data file '%.*s'",
                         (unsigned long)host, (int)q->data_name_length, q->data_name);
    }
    return walk_fail(w, "qcow2 data cluster at %#lx lies past the end of the file",
                     (unsigned long)host);
}

static uint32_t compressed(struct table_walk *w, uint64_t entry, uint64_t l2_offset,
                           uint64_t index, uint64_t pos, uint64_t n) {
    const struct qcow2 *q = of(w);
    const struct layer *layer = q->layer;
    if (q->external) {
        return walk_fail(w,
                         "qcow2 compressed cluster in an image with an external data file"
                         " (L2 table at %#lx, index %lu)",
                         (unsigned long)l2_offset, (unsigned long)index);
    }
    /* layout.compressed_location */
    const uint32_t cluster_bits = q->cluster_bits;
    const uint32_t csize_shift = 62 - (cluster_bits - 8);
    const uint64_t csize_mask = (1ULL << (cluster_bits - 8)) - 1;
    const uint64_t host = entry & ((1ULL << csize_shift) - 1);
    const uint64_t sectors = ((entry >> csize_shift) & csize_mask) + 1;
    const uint64_t length = sectors * 512 - (host & 511);
    if (host >= layer->file_size) {
        return walk_fail(w, "qcow2 compressed cluster at %#lx lies past the end of the file",
                         (unsigned long)host);
    }
    uint32_t status = walk_flush(w);
    if (status != AIODD_OK) {
        return status;
    }
    struct reader_job job = {
        .run = inflate_job,
        .owner = q,
        .dest = w->dest + pos,
        .skip = (w->base + pos) & ((1ULL << cluster_bits) - 1),
        .length = n,
        .where = host,
    };
    return reader_job(w->r, layer->handle, layer->file_size, host, length, &job);
}

/* _Reader._entry */
static uint32_t plain_entry(struct table_walk *w, uint64_t entry, uint64_t l2_offset,
                            uint64_t index, uint64_t pos, uint64_t n) {
    const struct qcow2 *q = of(w);
    if (entry & OFLAG_COMPRESSED) {
        return compressed(w, entry, l2_offset, index, pos, n);
    }
    if (entry & OFLAG_ZERO) {
        if (q->version < 3) {
            return walk_fail(w,
                             "qcow2 zero cluster flag in a version 2 image"
                             " (L2 table at %#lx, index %lu)",
                             (unsigned long)l2_offset, (unsigned long)index);
        }
        return add_zero(w, pos, n);
    }
    if (!(entry & L2E_OFFSET_MASK) && !(q->external && (entry & OFLAG_COPIED))) {
        return add_backing(w, pos, n);
    }
    const uint64_t guest = w->base + pos;
    const uint64_t cluster_mask = (1ULL << q->cluster_bits) - 1;
    uint64_t host;
    uint32_t status = host_cluster(w, entry, l2_offset, index, guest & ~cluster_mask, &host);
    if (status != AIODD_OK) {
        return status;
    }
    if (host >= q->data_size) {
        return past_end(w, host);
    }
    return add_data(w, pos, n, host + (guest & cluster_mask));
}

/* _Reader._extended_entry */
static uint32_t extended_entry(struct table_walk *w, uint64_t entry, uint64_t bitmap,
                               uint64_t l2_offset, uint64_t index, uint64_t pos, uint64_t n) {
    const struct qcow2 *q = of(w);
    if (entry & OFLAG_COMPRESSED) {
        return compressed(w, entry, l2_offset, index, pos, n);
    }
    const uint64_t cluster_mask = (1ULL << q->cluster_bits) - 1;
    const uint64_t alloc = bitmap & ALL_ALLOC;
    const uint64_t zero = bitmap >> 32;
    const int allocated = (entry & L2E_OFFSET_MASK) || (q->external && (entry & OFLAG_COPIED));
    if (allocated ? (alloc & zero) : alloc) {
        return walk_fail(w,
                         "qcow2 extended L2 entry has an invalid subcluster bitmap %#018lx"
                         " (L2 table at %#lx, index %lu)",
                         (unsigned long)bitmap, (unsigned long)l2_offset, (unsigned long)index);
    }
    uint64_t guest = w->base + pos;
    uint64_t host = 0;
    uint32_t status;
    if (allocated &&
        (status = host_cluster(w, entry, l2_offset, index, guest & ~cluster_mask, &host))) {
        return status;
    }
    if (!zero && alloc == (allocated ? ALL_ALLOC : 0)) {
        if (!allocated) {
            return add_backing(w, pos, n);
        }
        if (host >= q->data_size) {
            return past_end(w, host);
        }
        return add_data(w, pos, n, host + (guest & cluster_mask));
    }
    const uint32_t sc_bits = q->cluster_bits - SUBCLUSTER_BITS;
    const uint64_t sc_size = 1ULL << sc_bits;
    const uint64_t end = pos + n;
    while (pos < end) {
        guest = w->base + pos;
        const uint64_t in_cluster = guest & cluster_mask;
        const uint64_t sc = in_cluster >> sc_bits;
        const uint64_t m = min_u64(sc_size - (in_cluster & (sc_size - 1)), end - pos);
        if ((zero >> sc) & 1) {
            status = add_zero(w, pos, m);
        } else if ((alloc >> sc) & 1) {
            uint64_t sc_host = host + (sc << sc_bits);
            if (sc_host >= q->data_size) {
                return past_end(w, sc_host);
            }
            status = add_data(w, pos, m, host + in_cluster);
        } else {
            status = add_backing(w, pos, m);
        }
        if (status != AIODD_OK) {
            return status;
        }
        pos += m;
    }
    return AIODD_OK;
}

static uint32_t l2_offset(struct table_walk *w, uint64_t l1_index, uint64_t *offset) {
    const struct qcow2 *q = of(w);
    uint64_t l1e = 0;
    uint32_t status =
        disk_table_entry(w->r, q->layer, q->l1, q->l1_offset, q->l1_entries, l1_index, &l1e);
    *offset = l1e & L1E_OFFSET_MASK;
    return status;
}

/* Qcow2Disk._l2_table */
static uint32_t l2_table(struct table_walk *w, uint64_t l2_offset, uint64_t l1_index) {
    const struct layer *layer = w->layer;
    const uint32_t cluster_bits = of(w)->cluster_bits;
    if (l2_offset & ((1ULL << cluster_bits) - 1)) {
        return walk_fail(w, "qcow2 L2 table offset %#lx is not cluster aligned (L1 index %lu)",
                         (unsigned long)l2_offset, (unsigned long)l1_index);
    }
    if (l2_offset >= layer->file_size) {
        return walk_fail(w, "qcow2 L2 table at %#lx lies past the end of the file",
                         (unsigned long)l2_offset);
    }
    return disk_table(w->r, layer, l2_offset, layer->handle, layer->file_size, l2_offset,
                      1ULL << cluster_bits, &w->table);
}

/* _Reader.run's step over one cluster */
static uint32_t entry(struct table_walk *w, uint64_t l2_offset, uint64_t index, uint64_t pos,
                      uint64_t n) {
    if (of(w)->extended) {
        return extended_entry(w, w->table[2 * index], w->table[2 * index + 1], l2_offset, index,
                              pos, n);
    }
    return plain_entry(w, w->table[index], l2_offset, index, pos, n);
}

static const struct table_walk_ops OPS = {l2_offset, l2_table, entry};

/* _Reader.run */
uint32_t qcow2_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                    uint64_t length) {
    const struct qcow2 *q = layer->qcow2;
    struct table_walk w = {r, q, layer, q->backing, offset, dest, NULL, {0, 0, 0, 0}};
    return table_walk(&w, &OPS, q->cluster_bits, q->l2_bits, length);
}
