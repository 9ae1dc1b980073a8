/* vpc (VHD) in the KVM guest: the twin of decode.py and layout.py, which say what each
 * step means.  Every check runs in the Python decoder's order with its message byte for
 * byte; a change there is a change here (tests/test_kvm_decoder_vpc.py holds the two
 * together).
 *
 * Once open, a VHD's own reads cannot fail (every block the BAT names was found inside
 * the file), so the only errors of a read are its parent's: the parent is asked for
 * exactly the ranges Python asks it for, in the same order, and its errors come in that
 * order. */
#include "vpc/guest.h"

#define FOOTER_SIZE 512u
#define DYN_HEADER_SIZE 1024u
#define TYPE_FIXED 2u
#define TYPE_DIFFERENCING 4u
#define SECTOR 512u
#define MAX_SECTORS 0xFF000000ULL
#define MAX_GEOMETRY (65535ULL * 16u * 255u)
#define MAX_BLOCK_SIZE (256u << 20)
#define UNALLOCATED 0xFFFFFFFFu
#define MAX_LOCATOR_LENGTH (64u * 1024u)
#define MAX_PARENT_PATH 4095u
#define LOCATORS_AT 576u
#define LOCATOR_COUNT 8u
/* A BAT too large to hold is read through the cache in pieces of this many bytes. */
#define BAT_PIECE 4096u

struct vpc {
    struct layer *parent;
    int fixed;
    int differencing;
    uint64_t block_size;
    uint64_t bitmap_size;
    uint64_t bitmap_table;  /* bytes of bitmap read through the cache, a multiple of 8 */
    uint64_t entries;
    uint64_t table_offset;
    uint32_t *bat;  /* NULL: too large to hold, read through the cache */
};

static int cookie(const unsigned char *bytes, uint64_t length, const char *expected) {
    return length >= 8 && memcmp(bytes, expected, 8) == 0;
}

/* -- the footer (layout.parse_footer) ------------------------------------------------- */

/* Creator applications that qemu 7.2 sizes by the footer's current size. */
static int sized_by_current_size(const unsigned char *app) {
    static const char creators[5][4] = {"win ", "qem2", "d2v ", "CTXS", {'t', 'a', 'p', 0}};
    for (unsigned i = 0; i < 5; i++) {
        if (memcmp(app, creators[i], 4) == 0) {
            return 1;
        }
    }
    return 0;
}

static uint32_t parse_footer(const unsigned char *raw, uint64_t length, uint32_t handle,
                             uint64_t *virtual_size) {
    if (length < FOOTER_SIZE) {
        return image_error(handle, "vpc footer is truncated");
    }
    if (!cookie(raw, length, "conectix")) {
        return image_error(handle, "vpc footer has no 'conectix' cookie");
    }
    uint32_t sum = 0;
    for (unsigned i = 0; i < FOOTER_SIZE; i++) {
        sum += (i >= 64 && i < 68) ? 0u : raw[i];
    }
    if (~sum != be32(raw + 64)) {
        return image_error(handle, "vpc footer checksum is incorrect");
    }
    const uint64_t current_size = be64(raw + 48);
    const uint64_t cylinders = (uint64_t)raw[56] << 8 | raw[57];
    uint64_t sectors = cylinders * raw[58] * raw[59];
    if (sized_by_current_size(raw + 28) || sectors == MAX_GEOMETRY) {
        sectors = current_size / SECTOR;
    }
    const uint64_t size = sectors * SECTOR;
    if (size > MAX_SECTORS * SECTOR) {
        return image_error(handle, "vpc virtual size %lu is larger than 2040 GiB",
                           (unsigned long)size);
    }
    *virtual_size = size;
    return AIODD_OK;
}

/* -- the parent locator (layout.decode_locator) --------------------------------------- */

struct locator {
    const char *platform;
    uint32_t length;
    uint64_t offset;
};

/* layout.choose_locator over the dynamic header's eight entries. */
static int choose_locator(const unsigned char *header, struct locator *chosen) {
    static const char *const preference[] = {"W2ru", "W2ku", "MacX"};
    for (unsigned p = 0; p < 3; p++) {
        for (unsigned i = 0; i < LOCATOR_COUNT; i++) {
            const unsigned char *entry = header + LOCATORS_AT + 24u * i;
            uint32_t length = be32(entry + 8);
            if (memcmp(entry, preference[p], 4) == 0 && length > 0) {
                *chosen = (struct locator){preference[p], length, be64(entry + 16)};
                return 1;
            }
        }
    }
    return 0;
}

static size_t put_utf8(unsigned char *out, uint32_t cp) {
    if (cp < 0x80) {
        if (out != NULL) {
            out[0] = (unsigned char)cp;
        }
        return 1;
    }
    if (cp < 0x800) {
        if (out != NULL) {
            out[0] = (unsigned char)(0xC0 | cp >> 6);
            out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        }
        return 2;
    }
    if (cp < 0x10000) {
        if (out != NULL) {
            out[0] = (unsigned char)(0xE0 | cp >> 12);
            out[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
            out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        }
        return 3;
    }
    if (out != NULL) {
        out[0] = (unsigned char)(0xF0 | cp >> 18);
        out[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
        out[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        out[3] = (unsigned char)(0x80 | (cp & 0x3F));
    }
    return 4;
}

/* Python's data.decode("utf-16-le") up to the first NUL, as UTF-8 into out (NULL: only
 * the length); -1 when the whole data is not valid UTF-16 (Python decodes it all before
 * the NUL is looked for). */
static int64_t utf16_text(const unsigned char *data, uint64_t length, unsigned char *out) {
    if (length % 2 != 0) {
        return -1;
    }
    int64_t written = 0;
    int ended = 0;
    for (uint64_t i = 0; i < length; i += 2) {
        uint32_t unit = (uint32_t)data[i] | (uint32_t)data[i + 1] << 8;
        uint32_t cp = unit;
        if (unit >= 0xDC00 && unit <= 0xDFFF) {
            return -1;
        }
        if (unit >= 0xD800 && unit <= 0xDBFF) {
            if (i + 4 > length) {
                return -1;
            }
            uint32_t low = (uint32_t)data[i + 2] | (uint32_t)data[i + 3] << 8;
            if (low < 0xDC00 || low > 0xDFFF) {
                return -1;
            }
            cp = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
            i += 2;
        }
        if (cp == 0) {
            ended = 1;
        }
        if (!ended) {
            written += (int64_t)put_utf8(out != NULL ? out + written : NULL, cp);
        }
    }
    return written;
}

/* The length of the UTF-8 sequence at data[i], 0 when it is not one Python's strict
 * decoder takes. */
static unsigned utf8_sequence(const unsigned char *data, uint64_t length, uint64_t i) {
    unsigned char b = data[i];
    if (b < 0x80) {
        return 1;
    }
    unsigned n;
    unsigned char lo = 0x80, hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF) {
        n = 2;
    } else if (b >= 0xE0 && b <= 0xEF) {
        n = 3;
        lo = b == 0xE0 ? 0xA0 : 0x80;
        hi = b == 0xED ? 0x9F : 0xBF;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4;
        lo = b == 0xF0 ? 0x90 : 0x80;
        hi = b == 0xF4 ? 0x8F : 0xBF;
    } else {
        return 0;
    }
    for (unsigned k = 1; k < n; k++) {
        if (i + k >= length) {
            return 0;
        }
        unsigned char c = data[i + k];
        if (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF)) {
            return 0;
        }
    }
    return n;
}

/* Python's data.decode("utf-8") up to the first NUL: its length, -1 when the whole data
 * is not valid UTF-8. */
static int64_t utf8_text(const unsigned char *data, uint64_t length) {
    int64_t cut = -2;
    for (uint64_t i = 0; i < length;) {
        unsigned n = utf8_sequence(data, length, i);
        if (n == 0) {
            return -1;
        }
        if (data[i] == 0 && cut < 0) {
            cut = (int64_t)i;
        }
        i += n;
    }
    return cut < 0 ? (int64_t)length : cut;
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

/* One code point of Python's bytes.decode("utf-8", "replace") at data[*i]: a character,
 * or U+FFFD for the longest prefix of a sequence that could have been valid (a stray
 * byte alone). */
static uint32_t utf8_replace_next(const unsigned char *data, uint64_t length, uint64_t *i) {
    unsigned char b = data[*i];
    if (b < 0x80) {
        *i += 1;
        return b;
    }
    unsigned n;
    unsigned char lo = 0x80, hi = 0xBF;
    uint32_t cp;
    if (b >= 0xC2 && b <= 0xDF) {
        n = 2;
        cp = b & 0x1Fu;
    } else if (b >= 0xE0 && b <= 0xEF) {
        n = 3;
        cp = b & 0x0Fu;
        lo = b == 0xE0 ? 0xA0 : 0x80;
        hi = b == 0xED ? 0x9F : 0xBF;
    } else if (b >= 0xF0 && b <= 0xF4) {
        n = 4;
        cp = b & 0x07u;
        lo = b == 0xF0 ? 0x90 : 0x80;
        hi = b == 0xF4 ? 0x8F : 0xBF;
    } else {
        *i += 1;
        return 0xFFFD;
    }
    for (unsigned k = 1; k < n; k++) {
        uint64_t at = *i + k;
        unsigned char c = at < length ? data[at] : 0;
        if (at >= length || (k == 1 ? (c < lo || c > hi) : (c < 0x80 || c > 0xBF))) {
            *i += k;
            return 0xFFFD;
        }
        cp = cp << 6 | (c & 0x3Fu);
    }
    *i += n;
    return cp;
}

/* urllib.parse.unquote of text[0:length] (valid UTF-8) into out: %XX escapes made bytes
 * (into `bytes`, as long as the text), then the whole decoded as UTF-8 with U+FFFD for
 * what is not (the text's own characters are whole sequences, so decoding it all at once
 * is decoding it run by run, as unquote does).  Never longer than the text: an invalid
 * byte came from three characters and becomes three bytes.  Returns the length. */
static size_t unquote(const unsigned char *text, size_t length, unsigned char *bytes,
                      unsigned char *out) {
    size_t n = 0;
    for (size_t i = 0; i < length; i++) {
        int h = i + 2 < length && text[i] == '%' ? hex_value(text[i + 1]) : -1;
        int l = h >= 0 ? hex_value(text[i + 2]) : -1;
        if (h >= 0 && l >= 0) {
            bytes[n++] = (unsigned char)(h << 4 | l);
            i += 2;
        } else {
            bytes[n++] = text[i];
        }
    }
    size_t written = 0;
    for (uint64_t i = 0; i < n;) {
        written += put_utf8(out + written, utf8_replace_next(bytes, n, &i));
    }
    return written;
}

static int in_set(unsigned char c, const char *set) {
    for (; *set != '\0'; set++) {
        if (c == (unsigned char)*set) {
            return 1;
        }
    }
    return 0;
}

/* layout.file_url_path: [*start, *start + *length) becomes the path of a file URL; 0 for
 * any other URL. */
static int file_url_path(const unsigned char *url, size_t length, size_t *start,
                         size_t *path_length) {
    size_t colon = 0;
    while (colon < length && url[colon] != ':') {
        colon++;
    }
    if (colon != 4 || colon == length) {
        return 0;
    }
    static const char file[] = "file";
    for (size_t i = 0; i < 4; i++) {
        unsigned char c = url[i];
        c = (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
        if (c != (unsigned char)file[i]) {
            return 0;
        }
    }
    size_t at = colon + 1;
    if (length - at >= 2 && url[at] == '/' && url[at + 1] == '/') {
        at += 2;
        while (at < length && !in_set(url[at], "/?#")) {
            at++;
        }
    }
    size_t end = at;
    while (end < length && !in_set(url[end], "?#")) {
        end++;
    }
    *start = at;
    *path_length = end - at;
    return 1;
}

/* Python's repr of a str, quotes chosen as it chooses them; characters other than the
 * quote and the backslash are copied as they stand, as the host's one_line spells out
 * the unprintable ones just as repr does. */
static size_t python_repr(const unsigned char *text, size_t length, unsigned char *out) {
    int single = 0, dbl = 0;
    for (size_t i = 0; i < length; i++) {
        single |= text[i] == '\'';
        dbl |= text[i] == '"';
    }
    const unsigned char quote = single && !dbl ? '"' : '\'';
    size_t n = 0;
    out[n++] = quote;
    for (size_t i = 0; i < length; i++) {
        if (text[i] == '\\' || text[i] == quote) {
            out[n++] = '\\';
        }
        out[n++] = text[i];
    }
    out[n++] = quote;
    return n;
}

/* layout.decode_locator of the locator's data (in IN): the parent's name into *name. */
static uint32_t decode_locator(uint32_t handle, const char *platform, const unsigned char *data,
                               uint64_t length, char **name, size_t *name_length) {
    const int windows = platform[0] == 'W';
    int64_t text_length = windows ? utf16_text(data, length, NULL) : utf8_text(data, length);
    if (text_length < 0) {
        return image_error(handle, "vpc parent locator '%s' is not valid text", platform);
    }
    if ((uint64_t)text_length > MAX_PARENT_PATH) {
        return image_error(handle, "vpc parent locator '%s' names a path of %lu bytes (at most %u)",
                           platform, (unsigned long)text_length, MAX_PARENT_PATH);
    }
    unsigned char *text = disk_alloc((size_t)text_length + 1);
    if (text == NULL) {
        return AIODD_E_NOMEM;
    }
    size_t n = (size_t)text_length;
    if (!windows) {
        memcpy(text, data, n);
        size_t start, path_length;
        if (!file_url_path(text, n, &start, &path_length)) {
            unsigned char *quoted = disk_alloc(2 * n + 2);
            if (quoted == NULL) {
                return AIODD_E_NOMEM;
            }
            size_t q = python_repr(text, n, quoted);
            return image_error(handle, "vpc parent locator 'MacX' is not a file URL: %.*s", (int)q,
                               (const char *)quoted);
        }
        unsigned char *bytes = disk_alloc(path_length + 1);
        unsigned char *path = disk_alloc(path_length + 1);
        if (bytes == NULL || path == NULL) {
            return AIODD_E_NOMEM;
        }
        *name_length = unquote(text + start, path_length, bytes, path);
        *name = (char *)path;
        return AIODD_OK;
    }
    utf16_text(data, length, text);
    for (size_t i = 0; i < n; i++) {
        text[i] = text[i] == '\\' ? '/' : text[i];
    }
    size_t skip = 0;
    while (n - skip >= 2 && text[skip] == '.' && text[skip + 1] == '/') {
        skip += 2;
    }
    if (skip == n) {
        return image_error(handle, "vpc parent locator '%s' is empty", platform);
    }
    *name = (char *)text + skip;
    *name_length = n - skip;
    return AIODD_OK;
}

/* decode._open_parent */
static uint32_t open_parent(struct layer *layer, struct vpc *v, const struct locator *chosen,
                            int found, unsigned depth) {
    const uint32_t handle = layer->handle;
    if (!found) {
        return image_error(handle, "vpc differencing disk has no usable parent locator");
    }
    if (chosen->length > MAX_LOCATOR_LENGTH) {
        return image_error(handle, "vpc parent locator is too long (%u bytes)", chosen->length);
    }
    if (chosen->offset > layer->file_size || chosen->length > layer->file_size - chosen->offset) {
        return image_error(handle,
                           "vpc parent locator data at %#lx lies past the end of the file",
                           (unsigned long)chosen->offset);
    }
    uint64_t got;
    uint32_t status = disk_read_in(handle, chosen->offset, chosen->length, &got);
    if (status != AIODD_OK) {
        return status;
    }
    if (got < chosen->length) {
        host_fault();  /* the file is longer than that: the host said so */
    }
    char *name = NULL;
    size_t name_length = 0;
    status = decode_locator(handle, chosen->platform, host_in(), got, &name, &name_length);
    if (status != AIODD_OK) {
        return status;
    }
    return disk_open_named(handle, AIODD_REF_PARENT, name, name_length, "", 0, AIODD_FMT_NONE,
                           depth + 1, &v->parent);
}

/* -- opening (decode.open_disk) ------------------------------------------------------- */

/* decode.open_disk's check of one entry. */
static uint32_t check_block(void *context, uint64_t index, uint32_t entry) {
    const struct layer *layer = context;
    const struct vpc *v = layer->vpc;
    if (entry != UNALLOCATED &&
        (uint64_t)entry * SECTOR + v->bitmap_size + v->block_size > layer->file_size) {
        return image_error(layer->handle,
                           "vpc BAT entry %lu (block at %#lx) lies past the end of the file",
                           (unsigned long)index, (unsigned long)entry * SECTOR);
    }
    return AIODD_OK;
}

/* The BAT, checked entry by entry as Python checks it (the first entry whose block lies
 * past the end of the file), and kept when the budget allows. */
static uint32_t load_bat(struct layer *layer, struct vpc *v) {
    uint32_t status = disk_keep_table32(v->entries, BAT_PIECE, &v->bat);
    if (status != AIODD_OK) {
        return status;
    }
    return disk_scan_table32(layer->handle, v->table_offset, v->entries, 0, v->bat, check_block,
                             layer);
}

uint32_t vpc_open(struct layer *layer, unsigned depth) {
    const uint32_t handle = layer->handle;
    const uint64_t file_size = layer->file_size;
    const unsigned char *in = host_in();
    unsigned char footer[FOOTER_SIZE];
    uint64_t got;
    uint32_t status = disk_read_in(handle, 0, FOOTER_SIZE, &got);
    if (status != AIODD_OK) {
        return status;
    }
    const int at_start = cookie(in, got, "conectix");
    if (!at_start) {
        if (file_size < FOOTER_SIZE) {
            return image_error(handle, "vpc file is too small for a VHD footer");
        }
        if ((status = disk_read_in(handle, file_size - FOOTER_SIZE, FOOTER_SIZE, &got))) {
            return status;
        }
        if (!cookie(in, got, "conectix")) {
            return image_error(handle, "not in vpc format: no 'conectix' footer");
        }
    }
    memcpy(footer, in, (size_t)got);
    uint64_t size = 0;
    if ((status = parse_footer(footer, got, handle, &size)) != AIODD_OK) {
        return status;
    }
    const uint32_t disk_type = be32(footer + 60);
    const uint64_t data_offset = be64(footer + 16);

    struct vpc *v = disk_alloc(sizeof *v);
    if (v == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(v, 0, sizeof *v);
    layer->vpc = v;
    if (!at_start) {
        /* qemu reads a disk whose footer is only at the end as fixed. */
        if (disk_type != TYPE_FIXED) {
            return image_error(handle, "vpc disk of type %u has no footer copy at offset 0",
                               disk_type);
        }
        if (size > file_size - FOOTER_SIZE) {
            return image_error(handle,
                               "vpc fixed disk data (%lu bytes) is shorter than its virtual size"
                               " (%lu bytes)",
                               (unsigned long)(file_size - FOOTER_SIZE), (unsigned long)size);
        }
        v->fixed = 1;
        layer->virtual_size = size;
        return AIODD_OK;
    }

    if (file_size < DYN_HEADER_SIZE || data_offset > file_size - DYN_HEADER_SIZE) {
        return image_error(handle, "vpc dynamic header at %#lx lies past the end of the file",
                           (unsigned long)data_offset);
    }
    if ((status = disk_read_in(handle, data_offset, DYN_HEADER_SIZE, &got)) != AIODD_OK) {
        return status;
    }
    if (got < DYN_HEADER_SIZE) {
        host_fault();  /* inside the file, by the size the host gave */
    }
    /* layout.parse_dynamic_header */
    if (!cookie(in, got, "cxsparse")) {
        return image_error(handle, "vpc dynamic header has no 'cxsparse' cookie");
    }
    const uint64_t table_offset = be64(in + 16);
    const uint32_t entries = be32(in + 28);
    const uint32_t block_size = be32(in + 32);
    if (block_size < SECTOR || (block_size & (block_size - 1)) != 0) {
        return image_error(handle, "vpc block size %u is not a power of two >= 512", block_size);
    }
    if (block_size > MAX_BLOCK_SIZE) {
        return image_error(handle, "vpc block size %u is larger than 256 MiB", block_size);
    }
    if ((uint64_t)entries * block_size < size) {
        return image_error(handle, "vpc BAT of %u entries is too small for the virtual size %lu",
                           entries, (unsigned long)size);
    }
    struct locator chosen = {"", 0, 0};
    const int found = choose_locator(in, &chosen);

    const uint64_t bat_bytes = 4ULL * entries;
    if (table_offset > file_size || bat_bytes > file_size - table_offset) {
        return image_error(handle,
                           "vpc BAT at %#lx (%u entries) lies past the end of the file",
                           (unsigned long)table_offset, entries);
    }
    v->block_size = block_size;
    /* layout.DynamicHeader.bitmap_size */
    v->bitmap_size = ((uint64_t)block_size / (8 * SECTOR) + SECTOR - 1) / SECTOR * SECTOR;
    v->entries = entries;
    v->table_offset = table_offset;
    v->differencing = disk_type == TYPE_DIFFERENCING;
    layer->virtual_size = size;
    if ((status = load_bat(layer, v)) != AIODD_OK) {
        return status;
    }
    if (!v->differencing) {
        return AIODD_OK;
    }
    /* The bitmap bytes a block's sectors need, as whole 64-bit words through the cache. */
    const uint64_t bitmap_bytes = ((uint64_t)block_size / SECTOR + 7) / 8;
    v->bitmap_table = (bitmap_bytes + 7) / 8 * 8;
    disk_note_tables(v->bitmap_table);
    return open_parent(layer, v, &chosen, found, depth);
}

/* -- reading (decode.DynamicVpcDisk.read_into) ---------------------------------------- */

static uint32_t bat_entry(struct reader *r, const struct layer *layer, uint64_t index,
                          uint32_t *entry) {
    const struct vpc *v = layer->vpc;
    if (index >= v->entries) {
        *entry = UNALLOCATED;
        return AIODD_OK;
    }
    if (v->bat != NULL) {
        *entry = v->bat[index];
        return AIODD_OK;
    }
    return disk_table_entry32(r, layer, v->table_offset, v->entries, index, 0, entry);
}

/* read_by_bitmap over one block: set runs from the file, clear runs from the parent,
 * each run a read of its own as Python makes it. */
static uint32_t read_differencing(struct reader *r, const struct layer *layer, uint64_t block_at,
                                  uint64_t within, uint64_t voffset, unsigned char *dest,
                                  uint64_t n) {
    const struct vpc *v = layer->vpc;
    const uint64_t data = block_at + v->bitmap_size;
    const uint64_t first = within / SECTOR;
    const uint64_t last = (within + n - 1) / SECTOR;
    const uint64_t end = within + n;
    const uint64_t *bits;
    uint32_t status = disk_table(r, layer, block_at, layer->handle, layer->file_size, block_at,
                                 v->bitmap_table, &bits);
    for (uint64_t s = first; status == AIODD_OK && s <= last;) {
        const int set = (int)((bits[s >> 6] >> (63 - (s & 63))) & 1);
        uint64_t t = s + 1;
        while (t <= last && (int)((bits[t >> 6] >> (63 - (t & 63))) & 1) == set) {
            t++;
        }
        const uint64_t lo = (s * SECTOR > within ? s * SECTOR : within) - within;
        const uint64_t hi = (t * SECTOR < end ? t * SECTOR : end) - within;
        if (set) {
            status = reader_data(r, layer->handle, layer->file_size, data + within + lo, dest + lo,
                                 hi - lo);
        } else {
            status = disk_read_parent(r, v->parent, voffset + lo, dest + lo, hi - lo);
            if (status == AIODD_OK && t <= last) {
                /* the parent's reads may have taken the bitmap's cache slot */
                status = disk_table(r, layer, block_at, layer->handle, layer->file_size,
                                    block_at, v->bitmap_table, &bits);
            }
        }
        s = t;
    }
    return status;
}

uint32_t vpc_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length) {
    const struct vpc *v = layer->vpc;
    const uint64_t stop = disk_clip(layer, offset, dest, length);
    if (stop == 0) {
        return AIODD_OK;
    }
    if (v->fixed) {
        return reader_data(r, layer->handle, layer->file_size, offset, dest, stop);
    }
    const uint64_t bs = v->block_size;
    for (uint64_t pos = 0; pos < stop;) {
        const uint64_t index = (offset + pos) / bs;
        const uint64_t within = (offset + pos) % bs;
        const uint64_t n = min_u64(bs - within, stop - pos);
        uint32_t entry;
        uint32_t status = bat_entry(r, layer, index, &entry);
        if (status != AIODD_OK) {
            return status;
        }
        if (entry == UNALLOCATED) {
            status = disk_read_parent(r, v->parent, offset + pos, dest + pos, n);
        } else if (v->differencing) {
            status = read_differencing(r, layer, (uint64_t)entry * SECTOR, within, offset + pos,
                                       dest + pos, n);
        } else {
            status = reader_data(r, layer->handle, layer->file_size,
                                 (uint64_t)entry * SECTOR + v->bitmap_size + within, dest + pos, n);
        }
        if (status != AIODD_OK) {
            return status;
        }
        pos += n;
    }
    return AIODD_OK;
}
