/* vmdk in the KVM guest: the twin of decode.py and layout.py, which say what each step
 * means.  Every check runs in the Python decoder's order with its message byte for byte;
 * a change there is a change here (tests/test_kvm_decoder_vmdk.py holds the two
 * together).
 *
 * A descriptor's extents are files the host opens (AIODD_REF_EXTENT, plain files); the
 * parent named by parentFileNameHint is a further layer, always read as vmdk
 * (AIODD_REF_PARENT), as the Python decoder declares it.  Python's numbers are
 * unbounded: where a product of the header's fields can pass 2^64 it is kept in 128
 * bits and printed by hand (the guest has no 128-bit division). */
#include "vmdk/guest.h"

#include <zlib.h>
#include "zpool.h"

#define SECTOR 512u
#define GD_AT_END 0xFFFFFFFFFFFFFFFFULL
#define FLAG_ZERO_GRAIN (1u << 2)
#define FLAG_MARKER (1u << 17)
#define COMPRESSION_DEFLATE 1u
#define MARKER_EOS 0u
#define MARKER_FOOTER 3u
#define MARKER_SIZE 12u
#define DESC_READ_MAX ((1u << 20) - 1u)
#define DESC_AREA (20u * SECTOR)
#define EMBEDDED_DESC_OFFSET 0x200u
#define MAX_GRAIN_SECTORS 0x200000u
#define MAX_GD_ENTRIES (32u * 1024u * 1024u)
#define MAX_GTES_PER_GT 512u
#define COWD_GTES_PER_GT 4096u
#define MAX_EXTENTS 4096u
#define MAX_COMPRESSED_GRAIN (16u << 20)
#define MAX_PARENT_NAME 4095u
#define MAX_VIRTUAL_SIZE ((1ULL << 63) - SECTOR)
#define INT64_MIN_MAGNITUDE (1ULL << 63)
#define NAME_WIDTH 511u
#define WORD_WIDTH 10u
/* zlib's blocks for a zlib-wrapped inflate (its state and a 32 KiB window). */
#define ZLIB_POOL (64u << 10)
/* Where inflated bytes outside the wanted range go. */
#define SCRATCH (32u << 10)

typedef unsigned __int128 u128;

struct extent {
    uint32_t handle;
    uint64_t file_size;
    uint64_t sectors;
    int sparse;
    uint64_t flat_start;  /* bytes into the file (FLAT, VMFS) */
    /* sparse (layout.SparseLayout) */
    uint32_t index;
    uint64_t grain_size;
    uint64_t gtes_per_gt;
    uint64_t gd_offset;
    uint64_t gd_entries;
    uint64_t gt_read;     /* a grain table's bytes, read as a multiple of 8 */
    int compressed;
    int markers;
    int zero_grain;
    int cowd;
    uint32_t *gd;         /* NULL: too large to hold, read through the cache */
};

struct vmdk {
    struct layer *layer;
    struct layer *parent;
    uint32_t cid;
    uint32_t parent_cid;
    const char *parent_name;
    size_t parent_name_length;
    uint32_t count;
    struct extent *extents;
    uint64_t *ends;       /* each extent's end in the virtual disk */
};

/* -- messages ------------------------------------------------------------------------- */

/* A 128-bit number as Python prints it: decimal, or hex with "0x" ({n:#x}). */
static const char *u128_text(char *buf, size_t size, u128 value, int hex) {
    char digits[48];
    size_t n = 0;
    if (hex) {
        do {
            digits[n++] = "0123456789abcdef"[(unsigned)(value & 15u)];
            value >>= 4;
        } while (value != 0);
    } else {
        /* long division by 10 over 32-bit limbs */
        uint32_t limbs[4] = {(uint32_t)(value >> 96), (uint32_t)(value >> 64),
                             (uint32_t)(value >> 32), (uint32_t)value};
        int nonzero;
        do {
            uint64_t rest = 0;
            nonzero = 0;
            for (int i = 0; i < 4; i++) {
                uint64_t cur = rest << 32 | limbs[i];
                limbs[i] = (uint32_t)(cur / 10u);
                rest = cur % 10u;
                nonzero |= limbs[i] != 0;
            }
            digits[n++] = (char)('0' + rest);
        } while (nonzero);
    }
    size_t pos = 0;
    if (hex && pos + 2 < size) {
        buf[pos++] = '0';
        buf[pos++] = 'x';
    }
    while (n > 0 && pos + 1 < size) {
        buf[pos++] = digits[--n];
    }
    buf[pos] = '\0';
    return buf;
}

/* Bytes decoded as latin-1, as UTF-8 (the message travels as UTF-8). */
static size_t latin1(char *out, const unsigned char *s, size_t n) {
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x80) {
            out[pos++] = (char)s[i];
        } else {
            out[pos++] = (char)(0xC0 | s[i] >> 6);
            out[pos++] = (char)(0x80 | (s[i] & 0x3F));
        }
    }
    return pos;
}

/* repr() of a latin-1 string: Python's quote choice and escapes. */
static size_t latin1_repr(char *out, const unsigned char *s, size_t n, const char *suffix) {
    int single = 0;
    int dbl = 0;
    for (size_t i = 0; i < n; i++) {
        single |= s[i] == '\'';
        dbl |= s[i] == '"';
    }
    for (const char *p = suffix; *p; p++) {
        single |= *p == '\'';
        dbl |= *p == '"';
    }
    const char quote = single && !dbl ? '"' : '\'';
    size_t pos = 0;
    out[pos++] = quote;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '\\' || c == (unsigned char)quote) {
            out[pos++] = '\\';
            out[pos++] = (char)c;
        } else if (c == '\t' || c == '\n' || c == '\r') {
            out[pos++] = '\\';
            out[pos++] = c == '\t' ? 't' : (c == '\n' ? 'n' : 'r');
        } else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
            out[pos++] = '\\';
            out[pos++] = 'x';
            out[pos++] = "0123456789abcdef"[c >> 4];
            out[pos++] = "0123456789abcdef"[c & 15];
        } else {
            pos += latin1(out + pos, &c, 1);
        }
    }
    for (const char *p = suffix; *p; p++) {
        out[pos++] = *p;
    }
    out[pos++] = quote;
    return pos;
}

/* -- little-endian fields (layout.py's structs) --------------------------------------- */

struct sparse_header {
    uint32_t version;
    uint32_t flags;
    uint64_t capacity;
    uint64_t granularity;
    uint64_t desc_offset;
    uint32_t num_gtes_per_gt;
    uint64_t gd_offset;
    uint64_t grain_offset;
    uint32_t compress_algorithm;
};

/* layout.parse_sparse_header over a zero-padded sector. */
static void parse_sparse_header(const unsigned char *b, struct sparse_header *h) {
    h->version = le32(b + 4);
    h->flags = le32(b + 8);
    h->capacity = le64(b + 12);
    h->granularity = le64(b + 20);
    h->desc_offset = le64(b + 28);
    h->num_gtes_per_gt = le32(b + 44);
    h->gd_offset = le64(b + 56);
    h->grain_offset = le64(b + 64);
    h->compress_algorithm = (uint32_t)b[77] | (uint32_t)b[78] << 8;
}

/* `length` bytes of a file at `offset` into buf, zero-padded (layout._pad). */
static uint32_t read_padded(uint32_t handle, uint64_t offset, uint64_t length,
                            unsigned char *buf) {
    uint64_t got;
    uint32_t status = disk_read_in(handle, offset, length, &got);
    if (status != AIODD_OK) {
        return status;
    }
    memcpy(buf, host_in(), (size_t)got);
    memset(buf + got, 0, (size_t)(length - got));
    return AIODD_OK;
}

/* layout.check_table */
static uint32_t check_table(uint32_t handle, u128 offset, uint64_t length, uint64_t file_size,
                            const char *what) {
    if (length == 0) {
        return AIODD_OK;
    }
    char at[48];
    if (offset >= file_size) {
        return image_error(handle, "vmdk %s at %s lies past the end of the file", what,
                           u128_text(at, sizeof at, offset, 1));
    }
    if ((uint64_t)offset + length > file_size) {
        return image_error(handle,
                           "vmdk %s at %s (%lu bytes) is cut short by the end of the file"
                           " (%lu bytes)",
                           what, u128_text(at, sizeof at, offset, 1), (unsigned long)length,
                           (unsigned long)file_size);
    }
    return AIODD_OK;
}

/* layout.sparse_layout */
static uint32_t sparse_layout(const struct sparse_header *h, uint32_t handle, uint64_t file_size,
                              struct extent *e) {
    const int compressed = h->compress_algorithm == COMPRESSION_DEFLATE;
    if (h->version > 3) {
        return host_error(AIODD_E_UNSUPPORTED, handle, "vmdk version %u is not supported",
                          h->version);
    }
    if (h->num_gtes_per_gt > MAX_GTES_PER_GT) {
        return image_error(handle, "vmdk grain table size %u is too big (max 512)",
                           h->num_gtes_per_gt);
    }
    const uint64_t coverage = (h->num_gtes_per_gt * h->granularity) & 0xFFFFFFFFu;
    if (coverage == 0) {
        return image_error(handle,
                           "vmdk grain table coverage is invalid (%u entries of %lu sectors)",
                           h->num_gtes_per_gt, (unsigned long)h->granularity);
    }
    if (h->granularity > MAX_GRAIN_SECTORS) {
        return image_error(handle, "vmdk grain size of %lu sectors is invalid",
                           (unsigned long)h->granularity);
    }
    if (compressed && h->granularity * SECTOR > MAX_COMPRESSED_GRAIN) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vmdk compressed grains of %lu sectors are not supported (max %u)",
                          (unsigned long)h->granularity, MAX_COMPRESSED_GRAIN / SECTOR);
    }
    const uint64_t gd_entries = h->capacity / coverage + (h->capacity % coverage != 0);
    if (gd_entries > MAX_GD_ENTRIES) {
        return image_error(handle, "vmdk grain directory of %lu entries is too big",
                           (unsigned long)gd_entries);
    }
    const uint64_t sectors = file_size / SECTOR + (file_size % SECTOR != 0);
    if (sectors < h->grain_offset) {
        char need[48];
        return image_error(handle,
                           "vmdk file is truncated: the header expects at least %s bytes,"
                           " the file has %lu",
                           u128_text(need, sizeof need, (u128)h->grain_offset * SECTOR, 0),
                           (unsigned long)file_size);
    }
    e->sectors = h->capacity;
    e->grain_size = h->granularity * SECTOR;
    e->gtes_per_gt = h->num_gtes_per_gt;
    e->gd_entries = gd_entries;
    e->compressed = compressed;
    e->markers = (h->flags & FLAG_MARKER) != 0;
    e->zero_grain = (h->flags & FLAG_ZERO_GRAIN) != 0;
    e->cowd = 0;
    const u128 gd_offset = (u128)h->gd_offset * SECTOR;
    uint32_t status = check_table(handle, gd_offset, gd_entries * 4, file_size, "grain directory");
    e->gd_offset = (uint64_t)gd_offset;
    return status;
}

/* layout.cowd_layout */
static uint32_t cowd_layout(const unsigned char *b, uint32_t handle, uint64_t file_size,
                            struct extent *e) {
    const uint32_t disk_sectors = le32(b + 12);
    const uint32_t granularity = le32(b + 16);
    const uint32_t gd_sector = le32(b + 20);
    const uint32_t gd_entries = le32(b + 24);
    if (granularity == 0) {
        return image_error(handle, "vmdk COWD grain size of 0 sectors is invalid");
    }
    if (granularity > MAX_GRAIN_SECTORS) {
        return image_error(handle, "vmdk COWD grain size of %u sectors is invalid", granularity);
    }
    if (gd_entries > MAX_GD_ENTRIES) {
        return image_error(handle, "vmdk COWD grain directory of %u entries is too big",
                           gd_entries);
    }
    e->sectors = disk_sectors;
    e->grain_size = (uint64_t)granularity * SECTOR;
    e->gtes_per_gt = COWD_GTES_PER_GT;
    e->gd_offset = (uint64_t)gd_sector * SECTOR;
    e->gd_entries = gd_entries;
    e->compressed = 0;
    e->markers = 0;
    e->zero_grain = 0;
    e->cowd = 1;
    return check_table(handle, e->gd_offset, (uint64_t)gd_entries * 4, file_size,
                       "COWD grain directory");
}

/* _SparseExtent.__init__: the grain directory, held whole when the budget allows. */
static uint32_t load_gd(struct extent *e) {
    e->gt_read = (e->gtes_per_gt * 4 + 7) & ~(uint64_t)7;
    disk_note_tables(e->gt_read);
    const uint64_t bytes = e->gd_entries * 4;
    if (bytes == 0 || !disk_take_table_budget(bytes)) {
        return AIODD_OK;
    }
    e->gd = disk_alloc((size_t)bytes);
    if (e->gd == NULL) {
        return AIODD_E_NOMEM;
    }
    const unsigned char *in = host_in();
    for (uint64_t done = 0; done < bytes;) {
        uint64_t chunk = min_u64(bytes - done, AIODD_IN_SIZE);
        uint64_t got;
        uint32_t status = disk_read_in(e->handle, e->gd_offset + done, chunk, &got);
        if (status != AIODD_OK) {
            return status;
        }
        if (got < chunk) {
            host_fault();  /* check_table saw the file hold it */
        }
        for (uint64_t i = 0; i < chunk / 4; i++) {
            e->gd[done / 4 + i] = le32(in + i * 4);
        }
        done += chunk;
    }
    return AIODD_OK;
}

/* decode._open_sparse.  Sets *desc_offset (nonzero) instead of an extent when a
 * top-level file holds a descriptor of its own. */
static uint32_t open_sparse(struct extent *e, uint32_t handle, uint64_t file_size, int nested,
                            uint64_t *desc_offset) {
    *desc_offset = 0;
    if (file_size < 4) {
        return image_error(handle, "vmdk file is too small to be an image");
    }
    unsigned char block[SECTOR];
    uint32_t status = read_padded(handle, 0, SECTOR, block);
    if (status != AIODD_OK) {
        return status;
    }
    e->handle = handle;
    e->file_size = file_size;
    e->sparse = 1;
    if (memcmp(block, "COWD", 4) == 0) {
        if ((status = cowd_layout(block, handle, file_size, e)) != AIODD_OK) {
            return status;
        }
        return load_gd(e);
    }
    if (memcmp(block, "KDMV", 4) != 0) {
        return image_error(handle, "vmdk extent is not in VMDK format");
    }
    struct sparse_header h;
    parse_sparse_header(block, &h);
    if (h.capacity == 0 && h.desc_offset) {
        if (nested) {
            return host_error(AIODD_E_UNSUPPORTED, handle,
                              "vmdk extent holds a descriptor of its own (nested descriptors)");
        }
        *desc_offset = h.desc_offset;
        return AIODD_OK;
    }
    if (h.gd_offset == GD_AT_END) {
        const uint64_t end = (file_size + SECTOR - 1) / SECTOR * SECTOR;
        if (end < 3 * SECTOR) {
            return image_error(handle, "vmdk file is too small to hold a footer");
        }
        unsigned char tail[3 * SECTOR];
        if ((status = read_padded(handle, end - 3 * SECTOR, 3 * SECTOR, tail)) != AIODD_OK) {
            return status;
        }
        const unsigned char *footer = tail + SECTOR;
        if (memcmp(footer, "KDMV", 4) != 0 || le32(tail + 8) != 0 ||
            le32(tail + 12) != MARKER_FOOTER || le64(tail + 2 * SECTOR) != 0 ||
            le32(tail + 2 * SECTOR + 8) != 0 || le32(tail + 2 * SECTOR + 12) != MARKER_EOS) {
            return image_error(handle,
                               "vmdk footer (1024 bytes before the end of the file) is invalid");
        }
        parse_sparse_header(footer, &h);
    }
    if ((status = sparse_layout(&h, handle, file_size, e)) != AIODD_OK) {
        return status;
    }
    return load_gd(e);
}

/* -- the descriptor (layout.py) ------------------------------------------------------- */

struct text {
    const unsigned char *s;
    size_t n;
};

static long find(const struct text *t, size_t from, const char *key, size_t key_length) {
    if (key_length > t->n) {
        return -1;
    }
    for (size_t i = from; i + key_length <= t->n; i++) {
        if (memcmp(t->s + i, key, key_length) == 0) {
            return (long)i;
        }
    }
    return -1;
}

static long find_char(const struct text *t, size_t from, unsigned char c) {
    for (size_t i = from; i < t->n; i++) {
        if (t->s[i] == c) {
            return (long)i;
        }
    }
    return -1;
}

static size_t c_length(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (s[i] == 0) {
            return i;
        }
    }
    return n;
}

static int is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

static size_t skip_space(const struct text *t, size_t pos) {
    while (pos < t->n && is_space(t->s[pos])) {
        pos++;
    }
    return pos;
}

/* layout.create_type, checked against SUPPORTED_CREATE_TYPES. */
static uint32_t check_create_type(const struct text *t, uint32_t handle) {
    long pos = find(t, 0, "createType", 10);
    if (pos < 0) {
        return image_error(handle, "vmdk descriptor is invalid: it has no createType");
    }
    size_t start = (size_t)pos + 12;
    if (start >= t->n) {
        return image_error(handle, "vmdk descriptor is invalid: createType has no value");
    }
    long end = find_char(t, start, '"');
    if (end < 0 || (size_t)end - start + 1 > 128) {
        return image_error(handle, "vmdk descriptor is invalid: createType is not a quoted value");
    }
    static const char *const supported[] = {"monolithicFlat",       "vmfs",
                                            "vmfsSparse",           "seSparse",
                                            "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"};
    const size_t n = (size_t)end - start;
    for (size_t i = 0; i < sizeof supported / sizeof supported[0]; i++) {
        size_t k = 0;
        while (supported[i][k] != '\0') {
            k++;
        }
        if (k == n && memcmp(supported[i], t->s + start, n) == 0) {
            return AIODD_OK;
        }
    }
    char shown[256];
    size_t length = latin1(shown, t->s + start, n);
    return host_error(AIODD_E_UNSUPPORTED, handle,
                      "vmdk image type '%.*s' is not supported in a descriptor", (int)length,
                      shown);
}

/* layout._Scan: enough of sscanf. */
struct scan {
    const struct text *t;
    size_t pos;
};

static int scan_word(struct scan *sc, size_t *at, size_t *length) {
    sc->pos = skip_space(sc->t, sc->pos);
    size_t start = sc->pos;
    while (sc->pos < sc->t->n && sc->pos - start < WORD_WIDTH && !is_space(sc->t->s[sc->pos])) {
        sc->pos++;
    }
    *at = start;
    *length = sc->pos - start;
    return sc->pos > start;
}

static int scan_int64(struct scan *sc, int64_t *value) {
    sc->pos = skip_space(sc->t, sc->pos);
    const struct text *t = sc->t;
    size_t pos = sc->pos;
    int negative = 0;
    if (pos < t->n && (t->s[pos] == '+' || t->s[pos] == '-')) {
        negative = t->s[pos] == '-';
        pos++;
    }
    size_t start = pos;
    uint64_t magnitude = 0;  /* saturates at 2^63 */
    while (pos < t->n && t->s[pos] >= '0' && t->s[pos] <= '9') {
        uint64_t digit = (uint64_t)(t->s[pos] - '0');
        if (magnitude > (INT64_MIN_MAGNITUDE - digit) / 10) {
            magnitude = INT64_MIN_MAGNITUDE;
        } else {
            magnitude = magnitude * 10 + digit;
        }
        pos++;
    }
    if (pos == start) {
        return 0;
    }
    sc->pos = pos;
    if (negative) {
        *value = magnitude == INT64_MIN_MAGNITUDE ? (-0x7fffffffffffffffLL - 1) : -(int64_t)magnitude;
    } else {
        *value = magnitude >= INT64_MIN_MAGNITUDE ? (int64_t)(INT64_MIN_MAGNITUDE - 1)
                                                  : (int64_t)magnitude;
    }
    return 1;
}

static int scan_literal(struct scan *sc, unsigned char c) {
    if (sc->pos < sc->t->n && sc->t->s[sc->pos] == c) {
        sc->pos++;
        return 1;
    }
    return 0;
}

static int scan_name(struct scan *sc, size_t *at, size_t *length) {
    size_t start = sc->pos;
    while (sc->pos < sc->t->n && sc->pos - start < NAME_WIDTH) {
        unsigned char c = sc->t->s[sc->pos];
        if (c == '\n' || c == '\r' || c == '"') {
            break;
        }
        sc->pos++;
    }
    *at = start;
    *length = sc->pos - start;
    return sc->pos > start;
}

struct scanned {
    int matches;
    size_t access_at, access_length;
    int64_t sectors;
    size_t kind_at, kind_length;
    size_t name_at, name_length;
    int64_t offset;
};

/* layout._scan_extent */
static void scan_extent(const struct text *t, size_t pos, struct scanned *s) {
    struct scan sc = {t, pos};
    memset(s, 0, sizeof *s);
    s->offset = -1;
    if (!scan_word(&sc, &s->access_at, &s->access_length)) {
        return;
    }
    s->matches = 1;
    if (!scan_int64(&sc, &s->sectors)) {
        s->sectors = 0;
        return;
    }
    s->matches = 2;
    if (!scan_word(&sc, &s->kind_at, &s->kind_length)) {
        return;
    }
    s->matches = 3;
    sc.pos = skip_space(t, sc.pos);
    if (!scan_literal(&sc, '"') || !scan_name(&sc, &s->name_at, &s->name_length)) {
        s->name_length = 0;
        return;
    }
    s->matches = 4;
    if (!scan_literal(&sc, '"') || !scan_int64(&sc, &s->offset)) {
        s->offset = -1;
        return;
    }
    s->matches = 5;
}

enum kind { FLAT, SPARSE, VMFS, VMFSSPARSE, SESPARSE, OTHER };

static enum kind kind_of(const unsigned char *s, size_t n) {
    static const char *const kinds[] = {"FLAT", "SPARSE", "VMFS", "VMFSSPARSE", "SESPARSE"};
    for (int i = 0; i < 5; i++) {
        size_t k = 0;
        while (kinds[i][k] != '\0') {
            k++;
        }
        if (k == n && memcmp(kinds[i], s, n) == 0) {
            return (enum kind)i;
        }
    }
    return OTHER;
}

struct line {
    uint64_t sectors;
    enum kind kind;
    char *file;
    size_t file_length;
    uint64_t offset;  /* sectors */
    uint64_t number;
};

/* layout.parse_extents.  `out` NULL: only counts (and checks); else fills. */
static uint32_t parse_extents(const struct text *t, uint32_t handle, struct line *out,
                              uint32_t *count) {
    uint32_t n = 0;
    size_t pos = 0;
    uint64_t number = 0;
    size_t scanned_from = (size_t)-1;
    struct scanned s;
    memset(&s, 0, sizeof s);
    while (pos < t->n) {
        number++;
        long nl = find_char(t, pos, '\n');
        size_t next = nl < 0 ? t->n : (size_t)nl + 1;
        /* Blank lines all scan from where their white space ends: scan that place once. */
        size_t from = scanned_from != (size_t)-1 && pos <= scanned_from ? scanned_from
                                                                       : skip_space(t, pos);
        if (from != scanned_from) {
            scan_extent(t, from, &s);
            scanned_from = from;
        }
        size_t here = pos;
        pos = next;
        if (s.matches < 4 || s.access_length != 2 || memcmp(t->s + s.access_at, "RW", 2) != 0) {
            continue;
        }
        enum kind kind = kind_of(t->s + s.kind_at, s.kind_length);
        int64_t offset = s.offset;
        int valid;
        if (kind == FLAT) {
            valid = s.matches == 5 && offset >= 0;
        } else if (kind == VMFS) {
            valid = s.matches == 4;
            offset = 0;
        } else {
            valid = s.matches == 4;
        }
        if (!valid) {
            size_t end = next;
            while (end > here && t->s[end - 1] == '\n') {
                end--;
            }
            size_t length = end - here;
            const int cut = length > 200;
            char shown[1024];
            size_t shown_length =
                latin1_repr(shown, t->s + here, cut ? 200 : length, cut ? "..." : "");
            return image_error(handle, "vmdk descriptor line %lu is an invalid extent line: %.*s",
                               (unsigned long)number, (int)shown_length, shown);
        }
        if (s.sectors <= 0 || kind == OTHER) {
            continue;
        }
        if (n >= MAX_EXTENTS) {
            return image_error(handle, "vmdk descriptor names more than %u extents", MAX_EXTENTS);
        }
        if (out != NULL) {
            char *file = disk_alloc(s.name_length + 1);
            if (file == NULL) {
                return AIODD_E_NOMEM;
            }
            memcpy(file, t->s + s.name_at, s.name_length);
            file[s.name_length] = '\0';
            out[n] = (struct line){(uint64_t)s.sectors, kind, file, s.name_length,
                                   offset > 0 ? (uint64_t)offset : 0, number};
        }
        n++;
    }
    *count = n;
    return AIODD_OK;
}

/* layout._scan_hex: sscanf("%x") into a uint32_t. */
static int scan_hex(const struct text *t, size_t pos, uint32_t *value) {
    size_t p = skip_space(t, pos);
    int negative = 0;
    if (p < t->n && (t->s[p] == '+' || t->s[p] == '-')) {
        negative = t->s[p] == '-';
        p++;
    }
    static const char hex[] = "0123456789abcdefABCDEF";
    if (p + 2 <= t->n && t->s[p] == '0' && (t->s[p + 1] == 'x' || t->s[p + 1] == 'X')) {
        size_t q = p + 2;
        int digit = 0;
        for (const char *h = hex; q < t->n && *h; h++) {
            digit |= t->s[q] == (unsigned char)*h;
        }
        if (!digit) {
            *value = 0;
            return 1;
        }
        p = q;
    }
    size_t start = p;
    uint64_t v = 0;
    int saturated = 0;
    for (; p < t->n; p++) {
        unsigned char c = t->s[p];
        unsigned d;
        if (c >= '0' && c <= '9') {
            d = c - '0';
        } else if (c >= 'a' && c <= 'f') {
            d = c - 'a' + 10;
        } else if (c >= 'A' && c <= 'F') {
            d = c - 'A' + 10;
        } else {
            break;
        }
        if (v >> 60) {
            saturated = 1;
        }
        v = v << 4 | d;
    }
    if (p == start) {
        return 0;
    }
    if (saturated) {
        v = ~(uint64_t)0;
    }
    if (negative) {
        v = (uint64_t)0 - v;
    }
    *value = (uint32_t)v;
    return 1;
}

/* layout.read_cid */
static int read_cid(const unsigned char *area, uint64_t got, int parent, uint32_t *cid) {
    struct text t = {area, c_length(area, (size_t)min_u64(got, DESC_AREA - 1))};
    const char *key = parent ? "parentCID" : "CID";
    size_t key_length = parent ? 9 : 3;
    long pos = find(&t, 0, key, key_length);
    if (pos < 0) {
        return 0;
    }
    size_t start = (size_t)pos + key_length + 1;
    if (start > t.n) {
        return 0;
    }
    return scan_hex(&t, start, cid);
}

/* -- opening (decode.py) -------------------------------------------------------------- */

/* _open_descriptor over the text in IN (the extent lines copied out before any read). */
static uint32_t open_descriptor(struct vmdk *v, const struct text *t, unsigned depth) {
    (void)depth;
    const uint32_t handle = v->layer->handle;
    uint32_t status = check_create_type(t, handle);
    uint32_t count;
    if (status != AIODD_OK || (status = parse_extents(t, handle, NULL, &count)) != AIODD_OK) {
        return status;
    }
    struct line *lines = disk_alloc((size_t)count * sizeof *lines + 1);
    v->extents = disk_alloc((size_t)count * sizeof *v->extents + 1);
    if (lines == NULL || v->extents == NULL) {
        return AIODD_E_NOMEM;
    }
    if ((status = parse_extents(t, handle, lines, &count)) != AIODD_OK) {
        return status;
    }
    memset(v->extents, 0, (size_t)count * sizeof *v->extents);
    /* t is no longer read: IN is free for the extents' headers */
    for (uint32_t i = 0; i < count; i++) {
        const struct line *line = &lines[i];
        struct extent *e = &v->extents[v->count];
        if (line->kind == SESPARSE) {
            return host_error(AIODD_E_UNSUPPORTED, handle,
                              "vmdk SESPARSE extents are not supported");
        }
        struct host_file file;
        status = host_open(handle, AIODD_REF_EXTENT, line->file, line->file_length, "", 0, &file);
        if (status != AIODD_OK) {
            return status;
        }
        if (file.format != AIODD_FMT_NONE) {
            host_fault();
        }
        if (line->kind == FLAT || line->kind == VMFS) {
            const u128 start = (u128)line->offset * SECTOR;
            const u128 need = start + (u128)line->sectors * SECTOR;
            if (need > file.size) {
                char shown[48];
                return image_error(handle,
                                   "vmdk %s extent '%.*s' (descriptor line %lu) needs %s bytes,"
                                   " the file has %lu",
                                   line->kind == FLAT ? "FLAT" : "VMFS", (int)line->file_length,
                                   line->file, (unsigned long)line->number,
                                   u128_text(shown, sizeof shown, need, 0),
                                   (unsigned long)file.size);
            }
            e->handle = file.handle;
            e->file_size = file.size;
            e->sectors = line->sectors;
            e->flat_start = (uint64_t)start;
        } else {
            uint64_t desc_offset;
            e->index = v->count;
            status = open_sparse(e, file.handle, file.size, 1, &desc_offset);
            if (status != AIODD_OK) {
                return status;
            }
        }
        v->count++;
    }
    return AIODD_OK;
}

/* The descriptor text: the file's bytes at `offset`, up to the first NUL, in IN. */
static uint32_t read_text(uint32_t handle, uint64_t file_size, u128 offset, struct text *t) {
    uint64_t got = 0;
    if (offset < file_size) {
        uint32_t status = disk_read_in(handle, (uint64_t)offset,
                                       min_u64(file_size, DESC_READ_MAX), &got);
        if (status != AIODD_OK) {
            return status;
        }
    }
    t->s = host_in();
    t->n = c_length(t->s, (size_t)got);
    return AIODD_OK;
}

/* decode.open_disk */
uint32_t vmdk_open(struct layer *layer, unsigned depth) {
    const uint32_t handle = layer->handle;
    const uint64_t file_size = layer->file_size;
    if (file_size < 4) {
        return image_error(handle, "vmdk file is too small to be an image");
    }
    struct vmdk *v = disk_alloc(sizeof *v);
    if (v == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(v, 0, sizeof *v);
    v->layer = layer;
    layer->vmdk = v;
    unsigned char magic[4];
    uint32_t status = read_padded(handle, 0, 4, magic);
    if (status != AIODD_OK) {
        return status;
    }
    uint64_t area_offset = 0;
    struct text t;
    if (memcmp(magic, "KDMV", 4) == 0 || memcmp(magic, "COWD", 4) == 0) {
        area_offset = EMBEDDED_DESC_OFFSET;
        v->extents = disk_alloc(sizeof *v->extents);
        if (v->extents == NULL) {
            return AIODD_E_NOMEM;
        }
        memset(v->extents, 0, sizeof *v->extents);
        uint64_t desc_offset;
        status = open_sparse(v->extents, handle, file_size, 0, &desc_offset);
        if (status != AIODD_OK) {
            return status;
        }
        if (desc_offset == 0) {
            v->count = 1;
        } else if ((status = read_text(handle, file_size, (u128)desc_offset * SECTOR, &t)) ||
                   (status = open_descriptor(v, &t, depth))) {
            return status;
        }
    } else if ((status = read_text(handle, file_size, 0, &t)) ||
               (status = open_descriptor(v, &t, depth))) {
        return status;
    }

    uint64_t got;
    if ((status = disk_read_in(handle, area_offset, DESC_AREA, &got)) != AIODD_OK) {
        return status;
    }
    const unsigned char *area = host_in();
    /* layout.parent_hint */
    struct text hint_text = {area, c_length(area, (size_t)min_u64(got, DESC_AREA))};
    long hint_at = find(&hint_text, 0, "parentFileNameHint", 18);
    size_t hint_start = 0;
    size_t hint_length = 0;
    if (hint_at >= 0) {
        hint_start = (size_t)hint_at + 20;
        long end = hint_start <= hint_text.n ? find_char(&hint_text, hint_start, '"') : -1;
        if (end < 0) {
            return image_error(handle, "vmdk parentFileNameHint is not a quoted value");
        }
        if ((size_t)end - hint_start > MAX_PARENT_NAME) {
            return image_error(handle, "vmdk parentFileNameHint is longer than %u bytes",
                               MAX_PARENT_NAME);
        }
        hint_length = (size_t)end - hint_start;
    }
    if (!read_cid(area, got, 0, &v->cid)) {
        return image_error(handle, "vmdk descriptor has no readable CID");
    }
    if (!read_cid(area, got, 1, &v->parent_cid)) {
        return image_error(handle, "vmdk descriptor has no readable parentCID");
    }
    char *hint = NULL;
    if (hint_length > 0) {
        hint = disk_alloc(hint_length + 1);
        if (hint == NULL) {
            return AIODD_E_NOMEM;
        }
        memcpy(hint, area + hint_start, hint_length);
        hint[hint_length] = '\0';
    }

    v->ends = disk_alloc((size_t)v->count * sizeof *v->ends + 1);
    if (v->ends == NULL) {
        return AIODD_E_NOMEM;
    }
    u128 end = 0;
    for (uint32_t i = 0; i < v->count; i++) {
        end += (u128)v->extents[i].sectors * SECTOR;
        if (end > MAX_VIRTUAL_SIZE) {
            return image_error(handle, "vmdk virtual size is too large");
        }
        v->ends[i] = (uint64_t)end;
    }
    layer->virtual_size = (uint64_t)end;

    if (hint != NULL) {
        v->parent_name = hint;
        v->parent_name_length = hint_length;
        /* the parent is declared vmdk, as the Python decoder declares it */
        status = disk_open_named(handle, AIODD_REF_PARENT, hint, hint_length, "vmdk", 4,
                                 AIODD_FMT_VMDK, depth + 1, &v->parent);
        if (status != AIODD_OK) {
            return status;
        }
    }
    return AIODD_OK;
}

/* -- reading (decode._SparseExtent.read) ---------------------------------------------- */

struct walk {
    struct reader *r;
    const struct vmdk *v;
    const struct extent *e;
    uint64_t eoff;    /* the extent offset of dest[0] */
    uint64_t voff;    /* the virtual offset of dest[0] */
    unsigned char *dest;
    int pending;      /* a run of unallocated grains waits: [pending_pos, + pending_length) */
    uint64_t pending_pos;
    uint64_t pending_length;
};

/* VmdkDisk.flush of an unallocated run: the parent's bytes, its CID checked first. */
static uint32_t run_pending(struct walk *w) {
    if (!w->pending) {
        return AIODD_OK;
    }
    w->pending = 0;
    unsigned char *dest = w->dest + w->pending_pos;
    const struct vmdk *v = w->v;
    if (v->parent == NULL) {
        memset(dest, 0, (size_t)w->pending_length);
        return AIODD_OK;
    }
    /* Python inflates the grains before this run first; the parent's errors come after */
    uint32_t status = reader_settle(w->r);
    if (status != AIODD_OK) {
        return status;
    }
    const uint32_t parent_cid = v->parent->vmdk->cid;
    if (parent_cid != v->parent_cid) {
        return image_error(v->layer->handle,
                           "vmdk parentCID %08x does not match the CID (%08x) of parent '%.*s'",
                           v->parent_cid, parent_cid, (int)v->parent_name_length, v->parent_name);
    }
    return disk_read_parent(w->r, v->parent, w->voff + w->pending_pos, dest, w->pending_length);
}

static uint32_t gd_entry(struct walk *w, uint64_t index, uint32_t *entry) {
    const struct extent *e = w->e;
    if (e->gd != NULL) {
        *entry = e->gd[index];
        return AIODD_OK;
    }
    /* Too large to hold: through the cache, a cache slot's worth of entries at a time. */
    const uint64_t per_chunk = disk_cluster_max() / 4;
    const uint64_t chunk = index / per_chunk;
    const uint64_t first = chunk * per_chunk;
    const uint64_t count = min_u64(per_chunk, e->gd_entries - first);
    const uint64_t *table;
    uint32_t status = disk_table(w->r, w->v->layer, (uint64_t)e->index << 40 | chunk << 1 | 1,
                                 e->handle, e->file_size, e->gd_offset + first * 4,
                                 (count * 4 + 7) & ~(uint64_t)7, &table);
    if (status == AIODD_OK) {
        const uint64_t i = index - first;
        const uint64_t bytes = __builtin_bswap64(table[i / 2]);  /* the file's byte order */
        *entry = (uint32_t)(bytes >> (32 * (i & 1)));
    }
    return status;
}

static uint32_t gt_entry(struct walk *w, uint32_t sector, uint64_t index, uint32_t *entry) {
    const struct extent *e = w->e;
    const uint64_t offset = (uint64_t)sector * SECTOR;
    const uint64_t length = e->gtes_per_gt * 4;
    uint32_t status;
    if (length != 0 && (offset >= e->file_size || offset + length > e->file_size)) {
        /* the grains queued before it inflate (and fail) first, as in Python */
        if ((status = reader_settle(w->r)) != AIODD_OK) {
            return status;
        }
        return check_table(e->handle, offset, length, e->file_size,
                           e->cowd ? "COWD grain table" : "grain table");
    }
    const uint64_t *table;
    status = disk_table(w->r, w->v->layer, (uint64_t)e->index << 40 | (uint64_t)sector << 1,
                        e->handle, e->file_size, offset, e->gt_read, &table);
    if (status == AIODD_OK) {
        const uint64_t bytes = __builtin_bswap64(table[index / 2]);
        *entry = (uint32_t)(bytes >> (32 * (index & 1)));
    }
    return status;
}

/* -- compressed grains (layout.inflate_grain) ----------------------------------------- */

struct inflater {
    z_stream z;
    struct zpool zpool;
    unsigned char pool[ZLIB_POOL];
    unsigned char scratch[SCRATCH];
};

/* The compressed bytes [next, end) of a file: held in memory (`mem`, a span read in a
 * batch), or fed to zlib a window of IN at a time. */
struct source {
    uint32_t handle;
    uint64_t next;
    uint64_t end;
    const unsigned char *mem;
};

static uint32_t feed(struct inflater *f, struct source *src) {
    if (f->z.avail_in > 0 || src->next >= src->end) {
        return AIODD_OK;
    }
    if (src->mem != NULL) {
        f->z.next_in = (unsigned char *)(uintptr_t)src->mem;  /* zlib only reads it */
        f->z.avail_in = (uInt)(src->end - src->next);  /* at most IN */
        src->next = src->end;
        return AIODD_OK;
    }
    struct host_segment s = {src->handle, src->next, min_u64(src->end - src->next, AIODD_IN_SIZE),
                             host_in(), 0};
    uint32_t status = host_readv(&s, 1);
    if (status != AIODD_OK) {
        return status;
    }
    if (s.got < s.length) {
        host_fault();  /* the source was clipped to the file */
    }
    src->next += s.got;
    f->z.next_in = host_in();
    f->z.avail_in = (uInt)s.got;
    return AIODD_OK;
}

enum inflated { GOING, ENDED, FAILED };

/* Inflate until `limit` bytes are out in all, the stream ends, fails, or the input is
 * used up, as one call of CPython's Decompress.decompress(data, max_length) runs.  The
 * bytes in [want, want + length) land in dest, the others in the scratch buffer. */
static uint32_t inflate_to(struct inflater *f, struct source *src, uint64_t limit, uint64_t want,
                           unsigned char *dest, uint64_t length, uint64_t *total, int *err,
                           enum inflated *state) {
    *state = GOING;
    while (*total < limit) {
        uint32_t status = feed(f, src);
        if (status != AIODD_OK) {
            return status;
        }
        unsigned char *out;
        uint64_t room;
        if (*total < want) {
            out = f->scratch;
            room = min_u64(SCRATCH, want - *total);
        } else if (*total < want + length) {
            out = dest + (*total - want);
            room = want + length - *total;
        } else {
            out = f->scratch;
            room = SCRATCH;
        }
        room = min_u64(min_u64(room, limit - *total), 0x40000000u);
        f->z.next_out = out;
        f->z.avail_out = (uInt)room;
        const uInt before_in = f->z.avail_in;
        *err = inflate(&f->z, Z_SYNC_FLUSH);
        *total += room - f->z.avail_out;
        if (*err == Z_MEM_ERROR) {
            return AIODD_E_NOMEM;
        }
        if (*err == Z_STREAM_END) {
            *state = ENDED;
            return AIODD_OK;
        }
        if (*err != Z_OK && *err != Z_BUF_ERROR) {
            *state = FAILED;
            return AIODD_OK;
        }
        /* Output room left over means zlib wants input: done when none is left.  A full
         * window may hold back output, so zlib is asked again even without input. */
        const int exhausted = f->z.avail_in == 0 && src->next >= src->end;
        if (f->z.avail_out != 0 && exhausted) {
            return AIODD_OK;
        }
        if (f->z.avail_out == room && f->z.avail_in == before_in && exhausted) {
            return AIODD_OK;
        }
    }
    return AIODD_OK;
}

static uint32_t corrupt(const struct extent *e, uint64_t foff, const struct inflater *f, int err) {
    const char *msg = f->z.msg;
    if (msg == NULL) {
        msg = err == Z_BUF_ERROR    ? "incomplete or truncated stream"
              : err == Z_STREAM_ERROR ? "inconsistent stream state"
              : err == Z_DATA_ERROR   ? "invalid input data"
                                      : NULL;
    }
    const char *sign = err < 0 ? "-" : "";
    const unsigned magnitude = (unsigned)(err < 0 ? -err : err);
    if (msg == NULL) {
        return image_error(e->handle,
                           "vmdk compressed grain at %#lx is corrupt"
                           " (Error %s%u while decompressing data)",
                           (unsigned long)foff, sign, magnitude);
    }
    size_t n = 0;
    while (msg[n] != '\0' && n < 200) {
        n++;
    }
    return image_error(e->handle,
                       "vmdk compressed grain at %#lx is corrupt"
                       " (Error %s%u while decompressing data: %.*s)",
                       (unsigned long)foff, sign, magnitude, (int)n, msg);
}

/* The command's inflater, made at its first compressed grain and reset for each (a reset
 * stream behaves as a new one: its window stays 32 KiB). */
static struct inflater *inflater_of(struct reader *r) {
    if (r->grain != NULL) {
        return r->grain;
    }
    struct inflater *f = heap_alloc(sizeof *f);
    if (f == NULL) {
        return NULL;
    }
    memset(&f->z, 0, sizeof f->z);
    zpool_attach(&f->z, &f->zpool, f->pool, ZLIB_POOL);
    if (inflateInit(&f->z) != Z_OK) {
        return NULL;
    }
    r->grain = f;
    return f;
}

/* layout.inflate_grain and the check after it: the grain's bytes [in_grain, + n) into
 * dest. */
static uint32_t inflate_grain(struct inflater *f, const struct extent *e, struct source *src,
                              uint64_t foff, uint64_t in_grain, unsigned char *dest, uint64_t n) {
    const uint64_t grain = e->grain_size;
    if (inflateReset(&f->z) != Z_OK) {
        return AIODD_E_NOMEM;
    }
    f->z.next_in = Z_NULL;  /* the last grain's trailing bytes, which a reset keeps */
    f->z.avail_in = 0;
    uint64_t total = 0;
    int err = Z_OK;
    enum inflated state = GOING;
    uint32_t status = inflate_to(f, src, grain, in_grain, dest, n, &total, &err, &state);
    if (status == AIODD_OK && state == GOING && total == grain &&
        (f->z.avail_in > 0 || src->next < src->end)) {
        /* the tail must not inflate to one more byte */
        status = inflate_to(f, src, grain + 1, in_grain, dest, n, &total, &err, &state);
        if (status == AIODD_OK && state != FAILED && total > grain) {
            return image_error(e->handle,
                               "vmdk compressed grain at %#lx inflates to more than one grain"
                               " (%lu bytes)",
                               (unsigned long)foff, (unsigned long)grain);
        }
    }
    if (status != AIODD_OK) {
        return status;
    }
    if (state == FAILED) {
        return corrupt(e, foff, f, err);
    }
    if (state != ENDED) {
        return image_error(e->handle, "vmdk compressed grain at %#lx is truncated",
                           (unsigned long)foff);
    }
    if (in_grain + n > total) {
        return image_error(e->handle,
                           "vmdk compressed grain at %#lx inflates to %lu bytes,"
                           " short of the %lu needed",
                           (unsigned long)foff, (unsigned long)total,
                           (unsigned long)(in_grain + n));
    }
    return AIODD_OK;
}

static uint32_t bad_marker(const struct extent *e, uint64_t foff, uint32_t size) {
    return image_error(e->handle, "vmdk grain marker at %#lx has an invalid size (%u)",
                       (unsigned long)foff, size);
}

/* _SparseExtent._read_compressed, synchronously (a grain too large for a span in IN):
 * the marker, then the data a window of IN at a time. */
static uint32_t read_compressed(struct walk *w, uint64_t foff, uint64_t in_grain, uint64_t pos,
                                uint64_t n) {
    const struct extent *e = w->e;
    const uint64_t grain = e->grain_size;
    struct source src = {e->handle, foff, 0, NULL};
    if (e->markers) {
        unsigned char marker[MARKER_SIZE];
        uint32_t status = read_padded(e->handle, foff, MARKER_SIZE, marker);
        if (status != AIODD_OK) {
            return status;
        }
        const uint32_t size = le32(marker + 8);
        if (size == 0 || size > 2 * grain) {
            return bad_marker(e, foff, size);
        }
        src.next = foff + MARKER_SIZE;
        src.end = src.next + size;
    } else {
        src.end = foff + grain;
    }
    src.next = min_u64(src.next, e->file_size);
    src.end = min_u64(src.end, e->file_size);
    struct inflater *f = inflater_of(w->r);
    if (f == NULL) {
        return AIODD_E_NOMEM;
    }
    return inflate_grain(f, e, &src, foff, in_grain, w->dest + pos, n);
}

/* _SparseExtent._read_compressed over a span of the file read in a batch: the grain's
 * marker and data lie in it (the span reaches a grain's largest extent, or the file's
 * end). */
static uint32_t grain_job(struct reader *r, const struct reader_job *job,
                          const unsigned char *data, uint64_t got) {
    const struct extent *e = job->owner;
    const struct host_segment *s = &r->segments[job->segment];
    const uint64_t foff = job->where;
    const uint64_t have = s->offset + got > foff ? s->offset + got - foff : 0;
    struct source src = {e->handle, foff, 0, NULL};
    if (e->markers) {
        if (have < min_u64(MARKER_SIZE, e->file_size - foff)) {
            host_fault();  /* a read short of the file's end */
        }
        unsigned char marker[MARKER_SIZE] = {0};
        memcpy(marker, data + (foff - s->offset), (size_t)min_u64(have, MARKER_SIZE));
        const uint32_t size = le32(marker + 8);
        if (size == 0 || size > 2 * e->grain_size) {
            return bad_marker(e, foff, size);
        }
        src.next = foff + MARKER_SIZE;
        src.end = src.next + size;
    } else {
        src.end = foff + e->grain_size;
    }
    src.next = min_u64(src.next, e->file_size);
    src.end = min_u64(src.end, e->file_size);
    if (src.end - foff > have) {
        host_fault();  /* as above */
    }
    src.mem = data + (src.next - s->offset);
    return inflate_grain(r->grain, e, &src, foff, job->skip, job->dest, job->length);
}

/* A compressed grain's bytes [in_grain, + n) into dest[pos]: queued as a job over a span
 * of the file, which the next grains share while they follow it (streamOptimized writes
 * them in order), so that a batch reads many grains in one doorbell. */
static uint32_t compressed_grain(struct walk *w, uint64_t foff, uint64_t in_grain, uint64_t pos,
                                 uint64_t n) {
    const struct extent *e = w->e;
    struct reader *r = w->r;
    if (inflater_of(r) == NULL) {
        return AIODD_E_NOMEM;
    }
    /* the most a grain can span: its marker and the largest size the check allows */
    const uint64_t reach = e->markers ? MARKER_SIZE + 2 * e->grain_size : e->grain_size;
    if (reach > AIODD_IN_SIZE) {
        uint32_t status;
        if (r->in_used != 0 && (status = reader_flush(r)) != AIODD_OK) {
            return status;
        }
        return read_compressed(w, foff, in_grain, pos, n);
    }
    struct reader_job job = {
        .run = grain_job,
        .owner = e,
        .dest = w->dest + pos,
        .skip = in_grain,
        .length = n,
        .where = foff,
    };
    return reader_span_job(r, e->handle, e->file_size, foff, reach, &job);
}

/* _SparseExtent.read */
static uint32_t read_sparse(struct walk *w, uint64_t n) {
    const struct extent *e = w->e;
    const uint64_t grain = e->grain_size;
    const uint64_t cover = grain * e->gtes_per_gt;
    uint64_t pos = 0;
    uint32_t status;
    while (pos < n) {
        const uint64_t off = w->eoff + pos;
        const uint64_t gd_i = off / cover;
        const uint64_t in_cover = off % cover;
        if (gd_i >= e->gd_entries) {
            if ((status = reader_settle(w->r)) != AIODD_OK) {
                return status;
            }
            return image_error(e->handle,
                               "vmdk grain directory (%lu entries) does not cover offset %#lx",
                               (unsigned long)e->gd_entries, (unsigned long)off);
        }
        uint32_t gt_sector;
        if ((status = gd_entry(w, gd_i, &gt_sector)) != AIODD_OK) {
            return status;
        }
        uint64_t take;
        if (gt_sector == 0) {
            take = min_u64(n - pos, cover - in_cover);
        } else {
            uint32_t gte = 0;
            const uint64_t in_grain = in_cover % grain;
            if ((status = gt_entry(w, gt_sector, in_cover / grain, &gte)) != AIODD_OK) {
                return status;
            }
            take = min_u64(n - pos, grain - in_grain);
            if (gte == 1 && e->zero_grain) {
                if ((status = run_pending(w)) != AIODD_OK) {
                    return status;
                }
                memset(w->dest + pos, 0, (size_t)take);
                pos += take;
                continue;
            }
            if (gte != 0) {
                const uint64_t foff = (uint64_t)gte * SECTOR;
                if (foff >= e->file_size) {
                    if ((status = reader_settle(w->r)) != AIODD_OK) {
                        return status;
                    }
                    return image_error(e->handle, "vmdk %s at %#lx lies past the end of the file",
                                       e->compressed ? "compressed grain" : "grain",
                                       (unsigned long)foff);
                }
                if ((status = run_pending(w)) != AIODD_OK) {
                    return status;
                }
                if (e->compressed) {
                    status = compressed_grain(w, foff, in_grain, pos, take);
                } else {
                    status = reader_data(w->r, e->handle, e->file_size, foff + in_grain,
                                         w->dest + pos, take);
                }
                if (status != AIODD_OK) {
                    return status;
                }
                pos += take;
                continue;
            }
        }
        /* unallocated: from the parent, or zeros */
        if (w->pending) {
            w->pending_length += take;
        } else {
            w->pending = 1;
            w->pending_pos = pos;
            w->pending_length = take;
        }
        pos += take;
    }
    return run_pending(w);
}

uint32_t vmdk_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length) {
    const struct vmdk *v = layer->vmdk;
    uint64_t pos = 0;
    /* bisect_right(starts, offset) - 1 */
    uint32_t lo = 0;
    uint32_t hi = v->count;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        uint64_t start = mid == 0 ? 0 : v->ends[mid - 1];
        if (offset < start) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    uint32_t i = lo > 0 ? lo - 1 : 0;
    while (pos < length) {
        const uint64_t voff = offset + pos;
        while (i < v->count && voff >= v->ends[i]) {
            i++;
        }
        if (i >= v->count) {
            memset(dest + pos, 0, (size_t)(length - pos));
            return reader_settle(r);
        }
        const uint64_t start = i == 0 ? 0 : v->ends[i - 1];
        const uint64_t n = min_u64(length - pos, v->ends[i] - voff);
        const struct extent *e = &v->extents[i];
        uint32_t status;
        if (e->sparse) {
            struct walk w = {r, v, e, voff - start, voff, dest + pos, 0, 0, 0};
            status = read_sparse(&w, n);
        } else {
            status = reader_data(r, e->handle, e->file_size, e->flat_start + (voff - start),
                                 dest + pos, n);
        }
        if (status != AIODD_OK) {
            return status;
        }
        pos += n;
    }
    /* a layer above may fail next: the grains before it inflate (and fail) first */
    return reader_settle(r);
}
