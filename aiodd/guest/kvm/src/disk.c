/* The open image and the batched reads of a command (disk.h). */
#include "disk.h"

#include "parallels/guest.h"
#include "qcow/guest.h"
#include "qcow2/guest.h"
#include "qed/guest.h"
#include "raw/guest.h"
#include "vhdx/guest.h"
#include "vmdk/guest.h"
#include "vpc/guest.h"
#include "vdi/guest.h"

/* What the open image may hold of the heap: its tables whole (L1s) and the cache of the
 * others (L2 tables, and L1s too large to hold).  Together well under half the heap:
 * a command's scratch needs room for zstd's window (up to 8 MiB) and a cluster.  The
 * tests build them tiny too (tests/fuzz/build.py), so that every table goes through
 * the cache and the cache through its evictions. */
#ifndef TABLES_HELD_BUDGET
#define TABLES_HELD_BUDGET (4u << 20)
#endif
#ifndef CACHE_BUDGET
#define CACHE_BUDGET (8u << 20)
#endif
#ifndef CACHE_MIN_SLOTS
#define CACHE_MIN_SLOTS 4u
#endif
#define CACHE_MAX_SLOTS 1024u

struct tag {
    const struct layer *layer;
    uint64_t key;
    uint64_t stamp;
    int32_t next;  /* the next slot in the same bucket, or -1 */
    int32_t used;
};

static struct {
    int open;
    struct layer *top;
    uint64_t held_left;
    uint64_t table_bytes;
    int codecs[2];
    /* the cache: `count` slots of table_bytes each, a hash of their tags */
    uint64_t *slots;
    struct tag *tags;
    int32_t *buckets;
    uint32_t bucket_mask;
    uint32_t count;
    uint64_t clock;
} disk;

void *disk_alloc(size_t n) {
    return heap_alloc(n);
}

int disk_take_table_budget(uint64_t bytes) {
    if (bytes > disk.held_left) {
        return 0;
    }
    disk.held_left -= bytes;
    return 1;
}

void disk_note_tables(uint64_t bytes) {
    if (bytes > disk.table_bytes) {
        disk.table_bytes = bytes;
    }
}

void disk_note_codec(int zstd) {
    disk.codecs[zstd ? 1 : 0] = 1;
}

int disk_uses_codec(int zstd) {
    return disk.codecs[zstd ? 1 : 0];
}

uint64_t disk_cluster_max(void) {
    return disk.table_bytes;
}

int disk_is_open(void) {
    return disk.open;
}

void disk_close(void) {
    memset(&disk, 0, sizeof disk);
}

uint32_t disk_read_in(uint32_t handle, uint64_t offset, uint64_t length, uint64_t *got) {
    struct host_segment segment = {handle, offset, length, host_in(), 0};
    uint32_t status = host_readv(&segment, 1);
    *got = segment.got;
    return status;
}

int disk_layer_format(uint32_t format) {
    return format == AIODD_FMT_RAW || format == AIODD_FMT_QCOW2 || format == AIODD_FMT_VMDK ||
           format == AIODD_FMT_VPC || format == AIODD_FMT_VHDX || format == AIODD_FMT_VDI ||
           format == AIODD_FMT_PARALLELS || format == AIODD_FMT_QCOW || format == AIODD_FMT_QED;
}

uint32_t disk_open_named(uint32_t referrer, uint32_t kind, const char *name,
                         size_t name_length, const char *format, size_t format_length,
                         uint32_t declared, unsigned depth, struct layer **out) {
    struct host_file file;
    uint32_t status =
        host_open(referrer, kind, name, name_length, format, format_length, &file);
    if (status != AIODD_OK) {
        return status;
    }
    if (!disk_layer_format(file.format) ||
        (declared != AIODD_FMT_NONE && file.format != declared)) {
        host_fault();
    }
    return disk_open_layer(file.handle, file.format, file.size, depth, out);
}

uint32_t disk_open_layer(uint32_t handle, uint32_t format, uint64_t file_size, unsigned depth,
                         struct layer **out) {
    if (depth >= DISK_MAX_DEPTH) {
        host_fault();  /* the host's policy ends chains long before */
    }
    struct layer *layer = disk_alloc(sizeof *layer);
    if (layer == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(layer, 0, sizeof *layer);
    layer->handle = handle;
    layer->format = format;
    layer->file_size = file_size;
    *out = layer;
    switch (format) {
    case AIODD_FMT_RAW:
        return raw_open(layer);
    case AIODD_FMT_QCOW2:
        return qcow2_open(layer, depth);
    case AIODD_FMT_VMDK:
        return vmdk_open(layer, depth);
    case AIODD_FMT_VPC:
        return vpc_open(layer, depth);
    case AIODD_FMT_VHDX:
        return vhdx_open(layer, depth);
    case AIODD_FMT_VDI:
        return vdi_open(layer);
    case AIODD_FMT_PARALLELS:
        return parallels_open(layer);
    case AIODD_FMT_QCOW:
        return qcow_open(layer, depth);
    case AIODD_FMT_QED:
        return qed_open(layer, depth);
    default:
        return AIODD_E_REQUEST;
    }
}

static uint32_t cache_init(void) {
    if (disk.table_bytes == 0) {
        return AIODD_OK;  /* no layer has tables to cache */
    }
    uint64_t count = CACHE_BUDGET / disk.table_bytes;
    count = count < CACHE_MIN_SLOTS ? CACHE_MIN_SLOTS : count;
    count = count > CACHE_MAX_SLOTS ? CACHE_MAX_SLOTS : count;
    uint32_t buckets = 1;
    while (buckets < 2 * count) {
        buckets <<= 1;
    }
    disk.slots = disk_alloc((size_t)(count * disk.table_bytes));
    disk.tags = disk_alloc((size_t)count * sizeof *disk.tags);
    disk.buckets = disk_alloc((size_t)buckets * sizeof *disk.buckets);
    if (disk.slots == NULL || disk.tags == NULL || disk.buckets == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(disk.tags, 0, (size_t)count * sizeof *disk.tags);
    for (uint32_t i = 0; i < buckets; i++) {
        disk.buckets[i] = -1;
    }
    disk.bucket_mask = buckets - 1;
    disk.count = (uint32_t)count;
    return AIODD_OK;
}

uint32_t disk_open(uint32_t format, uint64_t file_size, uint64_t *virtual_size) {
    disk_close();
    disk.held_left = TABLES_HELD_BUDGET;
    if (!disk_layer_format(format)) {
        return AIODD_E_REQUEST;
    }
    if (file_size > INT64_MAX_U) {
        return AIODD_E_REQUEST;
    }
    struct layer *top;
    uint32_t status = disk_open_layer(0, format, file_size, 0, &top);
    if (status == AIODD_OK) {
        status = cache_init();
    }
    if (status != AIODD_OK) {
        disk_close();
        return status;
    }
    disk.top = top;
    disk.open = 1;
    *virtual_size = top->virtual_size;
    return AIODD_OK;
}

/* -- the cache ------------------------------------------------------------------------ */

static uint32_t bucket_of(const struct layer *layer, uint64_t key) {
    uint64_t h = ((uint64_t)(uintptr_t)layer ^ key) * 0x9e3779b97f4a7c15ULL;
    return (uint32_t)(h >> 32) & disk.bucket_mask;
}

static void unlink_slot(int32_t slot) {
    int32_t *link = &disk.buckets[bucket_of(disk.tags[slot].layer, disk.tags[slot].key)];
    while (*link != slot) {
        link = &disk.tags[*link].next;
    }
    *link = disk.tags[slot].next;
    disk.tags[slot].used = 0;
}

static uint32_t reader_in(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                          uint64_t length, size_t *segment);
static uint32_t reader_flush_keep(struct reader *r);

uint32_t disk_table(struct reader *r, const struct layer *layer, uint64_t key, uint32_t handle,
                    uint64_t file_size, uint64_t offset, uint64_t length, const uint64_t **table) {
    uint32_t bucket = bucket_of(layer, key);
    for (int32_t s = disk.buckets[bucket]; s >= 0; s = disk.tags[s].next) {
        if (disk.tags[s].layer == layer && disk.tags[s].key == key) {
            disk.tags[s].stamp = ++disk.clock;
            *table = disk.slots + (uint64_t)s * (disk.table_bytes / 8);
            return AIODD_OK;
        }
    }
    if (length > disk.table_bytes) {
        host_fault();  /* a decoder's bug, not the image's: every table size was noted */
    }
    int32_t victim = 0;
    for (uint32_t s = 0; s < disk.count; s++) {
        if (!disk.tags[s].used) {
            victim = (int32_t)s;
            break;
        }
        if (disk.tags[s].stamp < disk.tags[victim].stamp) {
            victim = (int32_t)s;
        }
    }
    if (disk.tags[victim].used) {
        unlink_slot(victim);
    }
    size_t segment;
    uint32_t status = reader_in(r, handle, file_size, offset, length, &segment);
    if (status == AIODD_OK) {
        status = reader_flush_keep(r);  /* leaves the answers in place, for the next lines */
    }
    if (status != AIODD_OK) {
        return status;
    }
    /* The flush left the segment's answer in place: nothing was queued since. */
    const unsigned char *raw = r->segments[segment].dest;
    uint64_t got = r->segments[segment].got;
    uint64_t *slot = disk.slots + (uint64_t)victim * (disk.table_bytes / 8);
    uint64_t entries = length / 8;
    for (uint64_t i = 0; i < entries; i++) {
        slot[i] = (i + 1) * 8 <= got ? be64(raw + i * 8) : 0;
    }
    if (got % 8 != 0 && got / 8 < entries) {  /* an entry the file cuts: zero-padded */
        unsigned char last[8] = {0};
        memcpy(last, raw + got / 8 * 8, got % 8);
        slot[got / 8] = be64(last);
    }
    r->count = 0;
    r->in_used = 0;
    r->span = 0;
    disk.tags[victim] = (struct tag){layer, key, ++disk.clock, disk.buckets[bucket], 1};
    disk.buckets[bucket] = victim;
    *table = slot;
    return AIODD_OK;
}

/* -- the reader ----------------------------------------------------------------------- */

static uint32_t reader_init(struct reader *r) {
    memset(r, 0, sizeof *r);
    r->segments = heap_alloc(AIODD_MAX_SEGMENTS * sizeof *r->segments);
    r->zero_tail = heap_alloc(AIODD_MAX_SEGMENTS);
    r->jobs = heap_alloc(AIODD_MAX_SEGMENTS * sizeof *r->jobs);
    if (r->segments == NULL || r->zero_tail == NULL || r->jobs == NULL) {
        return AIODD_E_NOMEM;
    }
    return AIODD_OK;
}

/* Sends the batch and runs its jobs, leaving the segments' answers in place. */
static uint32_t reader_flush_keep(struct reader *r) {
    if (r->count == 0) {
        return AIODD_OK;
    }
    uint32_t status = host_readv(r->segments, r->count);
    if (status != AIODD_OK) {
        return status;
    }
    for (size_t i = 0; i < r->count; i++) {
        struct host_segment *s = &r->segments[i];
        if (r->zero_tail[i] && s->got < s->length) {
            memset(s->dest + s->got, 0, (size_t)(s->length - s->got));
        }
    }
    size_t jobs = r->job_count;
    r->job_count = 0;
    for (size_t j = 0; j < jobs; j++) {
        const struct reader_job *job = &r->jobs[j];
        const struct host_segment *s = &r->segments[job->segment];
        status = job->run(r, job, s->dest, s->got);
        if (status != AIODD_OK) {
            return status;
        }
    }
    return AIODD_OK;
}

uint32_t reader_flush(struct reader *r) {
    uint32_t status = reader_flush_keep(r);
    r->count = 0;
    r->in_used = 0;
    r->span = 0;
    return status;
}

uint32_t reader_settle(struct reader *r) {
    return r->job_count > 0 ? reader_flush(r) : AIODD_OK;
}

uint32_t reader_data(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                     unsigned char *dest, uint64_t length) {
    uint64_t inside = offset < file_size ? min_u64(length, file_size - offset) : 0;
    if (inside < length) {
        memset(dest + inside, 0, (size_t)(length - inside));
    }
    if (inside == 0) {
        return AIODD_OK;
    }
    if (r->count > 0) {
        struct host_segment *last = &r->segments[r->count - 1];
        if (r->zero_tail[r->count - 1] && last->handle == handle &&
            last->offset + last->length == offset && last->dest + last->length == dest) {
            last->length += inside;
            return AIODD_OK;
        }
    }
    if (r->count == AIODD_MAX_SEGMENTS) {
        uint32_t status = reader_flush(r);
        if (status != AIODD_OK) {
            return status;
        }
    }
    r->segments[r->count] = (struct host_segment){handle, offset, inside, dest, 0};
    r->zero_tail[r->count] = 1;
    r->count++;
    return AIODD_OK;
}

static uint32_t reader_in(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                          uint64_t length, size_t *segment) {
    uint64_t inside = offset < file_size ? min_u64(length, file_size - offset) : 0;
    if (r->count == AIODD_MAX_SEGMENTS || inside > AIODD_IN_SIZE - r->in_used) {
        uint32_t status = reader_flush(r);
        if (status != AIODD_OK) {
            return status;
        }
    }
    r->segments[r->count] = (struct host_segment){handle, offset, inside, host_in() + r->in_used, 0};
    r->zero_tail[r->count] = 0;
    *segment = r->count++;
    r->in_used += inside;
    return AIODD_OK;
}

uint32_t reader_job(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                    uint64_t length, struct reader_job *job) {
    uint32_t status;
    if (r->job_count == AIODD_MAX_SEGMENTS && (status = reader_flush(r)) != AIODD_OK) {
        return status;  /* spans' jobs can outnumber the segments */
    }
    status = reader_in(r, handle, file_size, offset, length, &job->segment);
    if (status != AIODD_OK) {
        return status;
    }
    r->jobs[r->job_count++] = *job;
    return AIODD_OK;
}

uint32_t reader_span_job(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                         uint64_t length, struct reader_job *job) {
    uint32_t status;
    /* One segment may carry many jobs: the job list, not the segments, fills first. */
    if (r->job_count == AIODD_MAX_SEGMENTS && (status = reader_flush(r)) != AIODD_OK) {
        return status;
    }
    if (r->span != 0 && r->span == r->count) {
        struct host_segment *last = &r->segments[r->count - 1];
        const uint64_t start = last->offset;
        const uint64_t end = start + last->length;
        if (last->handle == handle && offset >= start && offset <= end) {
            /* the IN bytes after the span are free: it was the last thing put in IN */
            const uint64_t want = offset < file_size ? min_u64(length, file_size - offset) : 0;
            const uint64_t grow = offset + want > end ? offset + want - end : 0;
            if (grow <= AIODD_IN_SIZE - r->in_used) {
                last->length += grow;
                r->in_used += grow;
                job->segment = r->count - 1;
                r->jobs[r->job_count++] = *job;
                return AIODD_OK;
            }
        }
    }
    if ((status = reader_in(r, handle, file_size, offset, length, &job->segment)) != AIODD_OK) {
        return status;
    }
    r->span = r->count;
    r->jobs[r->job_count++] = *job;
    return AIODD_OK;
}

/* -- reading -------------------------------------------------------------------------- */

uint32_t disk_read_layer(struct reader *r, struct layer *layer, uint64_t offset,
                         unsigned char *dest, uint64_t length) {
    if (layer->format == AIODD_FMT_QCOW2) {
        return qcow2_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_VMDK) {
        return vmdk_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_VPC) {
        return vpc_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_VHDX) {
        return vhdx_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_VDI) {
        return vdi_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_PARALLELS) {
        return parallels_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_QCOW) {
        return qcow_read(r, layer, offset, dest, length);
    }
    if (layer->format == AIODD_FMT_QED) {
        return qed_read(r, layer, offset, dest, length);
    }
    return raw_read(r, layer, offset, dest, length);
}

uint32_t disk_read_parent(struct reader *r, struct layer *parent, uint64_t offset,
                          unsigned char *dest, uint64_t length) {
    uint64_t inside = 0;
    if (parent != NULL && offset < parent->virtual_size) {
        inside = min_u64(length, parent->virtual_size - offset);
    }
    if (inside > 0) {
        uint32_t status = disk_read_layer(r, parent, offset, dest, inside);
        if (status != AIODD_OK) {
            return status;
        }
    }
    if (inside < length) {
        memset(dest + inside, 0, (size_t)(length - inside));
    }
    return AIODD_OK;
}

uint32_t parent_run_flush(struct parent_run *run, struct reader *r, struct layer *parent,
                          uint64_t base, unsigned char *dest) {
    if (!run->pending) {
        return AIODD_OK;
    }
    run->pending = 0;
    if (parent == NULL) {
        memset(dest + run->pos, 0, (size_t)run->length);  /* cannot fail: no order to keep */
        return AIODD_OK;
    }
    uint32_t status = reader_settle(r);
    if (status != AIODD_OK) {
        return status;
    }
    run->stale = 1;
    return disk_read_parent(r, parent, base + run->pos, dest + run->pos, run->length);
}

uint32_t reader_vfail(struct reader *r, uint32_t handle, const char *format, va_list args) {
    uint32_t status = reader_settle(r);
    if (status != AIODD_OK) {
        return status;
    }
    host_verror(AIODD_E_IMAGE, handle, format, args);
    return AIODD_E_IMAGE;
}

uint32_t reader_fail(struct reader *r, uint32_t handle, const char *format, ...) {
    va_list args;
    va_start(args, format);
    uint32_t status = reader_vfail(r, handle, format, args);
    va_end(args);
    return status;
}

uint32_t walk_flush(struct table_walk *w) {
    return parent_run_flush(&w->run, w->r, w->parent, w->base, w->dest);
}

uint32_t walk_fail(struct table_walk *w, const char *format, ...) {
    va_list args;
    va_start(args, format);
    uint32_t status = reader_vfail(w->r, w->layer->handle, format, args);
    va_end(args);
    return status;
}

uint32_t table_walk(struct table_walk *w, const struct table_walk_ops *ops, uint32_t cluster_bits,
                    uint32_t l2_bits, uint64_t length) {
    const uint64_t stop = disk_clip(w->layer, w->base, w->dest, length);
    if (stop == 0) {
        return AIODD_OK;
    }
    const uint64_t cluster_size = 1ULL << cluster_bits;
    const uint64_t cluster_mask = cluster_size - 1;
    const uint32_t span_bits = cluster_bits + l2_bits;
    const uint64_t span_mask = (1ULL << span_bits) - 1;
    const uint64_t l2_mask = (1ULL << l2_bits) - 1;
    uint64_t pos = 0;
    uint32_t status;
    while (pos < stop) {
        const uint64_t guest = w->base + pos;
        const uint64_t l1_index = guest >> span_bits;
        const uint64_t span_end = pos + min_u64(stop - pos, span_mask - (guest & span_mask) + 1);
        uint64_t l2_offset;
        if ((status = ops->l2_offset(w, l1_index, &l2_offset)) != AIODD_OK) {
            return status;
        }
        if (!l2_offset) {
            parent_run_add(&w->run, pos, span_end - pos);
            pos = span_end;
            continue;
        }
        if ((status = ops->l2_table(w, l2_offset, l1_index)) != AIODD_OK) {
            return status;
        }
        uint64_t index = (guest >> cluster_bits) & l2_mask;
        while (pos < span_end) {
            const uint64_t in_cluster = (w->base + pos) & cluster_mask;
            const uint64_t n = min_u64(cluster_size - in_cluster, span_end - pos);
            if ((status = ops->entry(w, l2_offset, index, pos, n)) != AIODD_OK) {
                return status;
            }
            if (w->run.stale) {
                w->run.stale = 0;
                if ((status = ops->l2_table(w, l2_offset, l1_index)) != AIODD_OK) {
                    return status;
                }
            }
            pos += n;
            index++;
        }
    }
    return walk_flush(w);
}

uint32_t image_error(uint32_t handle, const char *format, ...) {
    va_list args;
    va_start(args, format);
    host_verror(AIODD_E_IMAGE, handle, format, args);
    va_end(args);
    return AIODD_E_IMAGE;
}

uint64_t disk_clip(const struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length) {
    const uint64_t size = layer->virtual_size;
    const uint64_t stop = offset < size ? min_u64(length, size - offset) : 0;
    if (stop < length) {
        memset(dest + stop, 0, (size_t)(length - stop));
    }
    return stop;
}

uint32_t disk_hold_table(uint32_t handle, uint64_t offset, uint64_t entries, int little,
                         uint64_t **table, int *whole) {
    const uint64_t bytes = entries * 8;
    *whole = 1;
    if (bytes == 0 || !disk_take_table_budget(bytes)) {
        return AIODD_OK;
    }
    uint64_t *held = disk_alloc((size_t)bytes);
    if (held == NULL) {
        return AIODD_E_NOMEM;
    }
    *table = held;
    const unsigned char *in = host_in();
    for (uint64_t done = 0; done < bytes;) {
        const uint64_t chunk = min_u64(bytes - done, AIODD_IN_SIZE);
        uint64_t got;
        uint32_t status = disk_read_in(handle, offset + done, chunk, &got);
        if (status != AIODD_OK) {
            return status;
        }
        if (got < chunk) {
            *whole = 0;
            return AIODD_OK;
        }
        for (uint64_t i = 0; i < chunk / 8; i++) {
            const uint64_t entry = be64(in + i * 8);
            held[done / 8 + i] = little ? __builtin_bswap64(entry) : entry;
        }
        done += chunk;
    }
    return AIODD_OK;
}

uint32_t disk_table_entry(struct reader *r, const struct layer *layer, const uint64_t *held,
                          uint64_t offset, uint64_t entries, uint64_t index, uint64_t *entry) {
    if (held != NULL) {
        *entry = held[index];
        return AIODD_OK;
    }
    const uint64_t per_chunk = disk_cluster_max() / 8;
    const uint64_t chunk = index / per_chunk;
    const uint64_t first = chunk * per_chunk;
    const uint64_t count = min_u64(per_chunk, entries - first);
    const uint64_t *table;
    uint32_t status = disk_table(r, layer, chunk << 1 | 1, layer->handle, layer->file_size,
                                 offset + first * 8, count * 8, &table);
    if (status == AIODD_OK) {
        *entry = table[index - first];
    }
    return status;
}

uint32_t disk_keep_table32(uint64_t entries, uint64_t piece, uint32_t **table) {
    const uint64_t bytes = 4 * entries;
    if (bytes > 0 && disk_take_table_budget(bytes)) {
        if ((*table = disk_alloc((size_t)bytes)) == NULL) {
            return AIODD_E_NOMEM;
        }
    } else if (bytes > 0) {
        disk_note_tables(piece);
    }
    return AIODD_OK;
}

uint32_t disk_scan_table32(uint32_t handle, uint64_t offset, uint64_t entries, int little,
                           uint32_t *keep,
                           uint32_t (*visit)(void *context, uint64_t index, uint32_t entry),
                           void *context) {
    const uint64_t bytes = 4 * entries;
    const unsigned char *in = host_in();
    for (uint64_t done = 0; done < bytes;) {
        const uint64_t chunk = min_u64(bytes - done, AIODD_IN_SIZE);
        uint64_t got;
        uint32_t status = disk_read_in(handle, offset + done, chunk, &got);
        if (status != AIODD_OK) {
            return status;
        }
        if (got < chunk) {
            host_fault();
        }
        for (uint64_t i = 0; i < chunk / 4; i++) {
            const uint32_t word = be32(in + 4 * i);
            const uint32_t entry = little ? __builtin_bswap32(word) : word;
            const uint64_t index = done / 4 + i;
            if (keep != NULL) {
                keep[index] = entry;
            }
            if (visit != NULL && (status = visit(context, index, entry)) != AIODD_OK) {
                return status;
            }
        }
        done += chunk;
    }
    return AIODD_OK;
}

uint32_t disk_table_entry32(struct reader *r, const struct layer *layer, uint64_t offset,
                            uint64_t entries, uint64_t index, int little, uint32_t *entry) {
    /* the cache gives big-endian 64-bit words, each two entries, the first in the high
     * half */
    const uint64_t per_piece = disk_cluster_max() / 4;
    const uint64_t piece = index / per_piece;
    const uint64_t first = piece * per_piece;
    const uint64_t count = min_u64(per_piece, entries - first);
    const uint64_t *table;
    uint32_t status = disk_table(r, layer, piece << 1 | 1, layer->handle, layer->file_size,
                                 offset + first * 4, (count * 4 + 7) / 8 * 8, &table);
    if (status == AIODD_OK) {
        const uint64_t word = table[(index - first) / 2];
        const uint32_t half = (uint32_t)((index - first) % 2 == 0 ? word >> 32 : word);
        *entry = little ? __builtin_bswap32(half) : half;
    }
    return status;
}

uint32_t disk_read_name(uint32_t handle, uint64_t offset, uint64_t size, char **name,
                        size_t *length) {
    *name = NULL;
    *length = 0;
    uint64_t got;
    uint32_t status = disk_read_in(handle, offset, size, &got);
    if (status != AIODD_OK) {
        return status;
    }
    const unsigned char *in = host_in();
    uint64_t n = 0;
    while (n < got && in[n] != 0) {
        n++;
    }
    if (n == 0) {
        return AIODD_OK;
    }
    if ((*name = disk_alloc((size_t)n)) == NULL) {
        return AIODD_E_NOMEM;
    }
    memcpy(*name, in, (size_t)n);
    *length = (size_t)n;
    return AIODD_OK;
}

uint32_t disk_read(uint64_t offset, unsigned char *dest, uint64_t length) {
    if (!disk.open) {
        return AIODD_E_REQUEST;
    }
    struct reader r;
    uint32_t status = reader_init(&r);
    if (status == AIODD_OK) {
        status = disk_read_layer(&r, disk.top, offset, dest, length);
    }
    if (status == AIODD_OK) {
        status = reader_flush(&r);
    }
    return status;
}
