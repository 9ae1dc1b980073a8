/* The open image, its layers, and how a command reads them (docs/kvm.md, "The
 * decoders").
 *
 * An image is a chain of layers, each a file the host opened (a handle) decoded by one
 * format: raw (aiodd/formats/raw/guest.c), qcow2 (aiodd/formats/qcow2/guest.c), vmdk
 * (aiodd/formats/vmdk/guest.c), vpc (aiodd/formats/vpc/guest.c), vhdx
 * (aiodd/formats/vhdx/guest.c), vdi (aiodd/formats/vdi/guest.c), parallels
 * (aiodd/formats/parallels/guest.c), qcow (aiodd/formats/qcow/guest.c) or qed
 * (aiodd/formats/qed/guest.c).  The
 * layers, their L1 tables and a cache of their tables live below the heap mark taken
 * after CMD_OPEN; a command's scratch above it.
 *
 * A command's reads are batched (struct reader): every read a decoder wants goes into one
 * list of segments, sent in one doorbell when the list or the IN window is full, when a
 * decoder needs the bytes (a table, a compressed cluster), or at the end.  Data lands
 * straight in the command's output; what must be decoded first (tables, compressed
 * clusters) lands in IN.  Decoders queue "jobs" over IN bytes (decompressing a cluster)
 * that run, in the order they were queued, right after the reads. */
#ifndef AIODD_DISK_H
#define AIODD_DISK_H

#include "heap.h"
#include "host.h"

#define INT64_MAX_U 0x7fffffffffffffffULL

/* Deeper than any chain the host allows (the policy stops at 64 layers). */
#define DISK_MAX_DEPTH 256u

struct qcow2;
struct qcow;
struct qed;
struct vmdk;
struct vpc;
struct vhdx;
struct vdi;
struct parallels;

struct layer {
    uint32_t handle;
    uint32_t format;  /* AIODD_FMT_RAW, _QCOW2, _VMDK, _VPC, _VHDX, _VDI, _PARALLELS, _QCOW or _QED */
    uint64_t file_size;
    uint64_t virtual_size;
    struct qcow2 *qcow2;
    struct vmdk *vmdk;
    struct vpc *vpc;
    struct vhdx *vhdx;
    struct vdi *vdi;
    struct parallels *parallels;
    struct qcow *qcow;
    struct qed *qed;
};

struct reader;

/* Work over bytes read into IN, run after the batch's reads, in queue order. */
struct reader_job {
    uint32_t (*run)(struct reader *r, const struct reader_job *job, const unsigned char *data,
                    uint64_t got);
    const void *owner;
    unsigned char *dest;
    uint64_t skip;
    uint64_t length;
    uint64_t where;
    size_t segment;  /* the segment whose bytes it works on */
};

struct reader {
    struct host_segment *segments;
    unsigned char *zero_tail;  /* per segment: zeros where the file ends short */
    size_t count;
    uint64_t in_used;
    struct reader_job *jobs;
    size_t job_count;
    /* The codecs' state for this command, made at the first compressed cluster. */
    void *zlib;
    void *zstd;
    unsigned char *cluster;
    void *grain;   /* vmdk's inflater, made at the first compressed grain */
    size_t span;   /* 1 + the index of the segment reader_span_job may grow, or 0 */
};

/* -- the open image ------------------------------------------------------------------- */

/* Open handle 0 as `format`; sets the virtual size.  AIODD_OK, or why not (an error
 * recorded with host_error, AIODD_E_REFUSED, AIODD_E_NOMEM, AIODD_E_IO, or
 * AIODD_E_REQUEST for a format the guest does not decode). */
uint32_t disk_open(uint32_t format, uint64_t file_size, uint64_t *virtual_size);

/* Whether an image is open. */
int disk_is_open(void);

/* Forget the open image (its memory goes with the heap's release). */
void disk_close(void);

/* Decode the virtual disk's [offset, offset + length) into dest; zeros past its end. */
uint32_t disk_read(uint64_t offset, unsigned char *dest, uint64_t length);

/* -- for the decoders ----------------------------------------------------------------- */

/* Whether the guest decodes `format` (AIODD_FMT_*) as a layer: what a host's answer to
 * an open of a backing file or a parent must be. */
int disk_layer_format(uint32_t format);

/* Open a layer named by another (depth: how many layers above it). */
uint32_t disk_open_layer(uint32_t handle, uint32_t format, uint64_t file_size, unsigned depth,
                         struct layer **out);

/* Ask the host for the layer that layer `referrer` names as `kind` (a backing file or a
 * parent), `format` the format the image declares for it (empty: none), and open it
 * `depth` layers down.  The host's answer must be a format the guest decodes, and
 * `declared` too when it is not AIODD_FMT_NONE; anything else is the host's fault. */
uint32_t disk_open_named(uint32_t referrer, uint32_t kind, const char *name,
                         size_t name_length, const char *format, size_t format_length,
                         uint32_t declared, unsigned depth, struct layer **out);

/* Memory that lasts as long as the open image; NULL when the heap is exhausted. */
void *disk_alloc(size_t n);

/* Ask for `bytes` of the budget for tables held whole (an L1); 1 granted, 0 refused:
 * the caller then reads the table through the cache (disk_table). */
int disk_take_table_budget(uint64_t bytes);

/* What the layers need, told while they open: tables (and clusters) of up to `bytes`
 * (the cache's slot size, the largest cluster), and a codec for compressed clusters
 * (zstd 1, zlib 0), made at a command's first compressed cluster. */
void disk_note_tables(uint64_t bytes);
void disk_note_codec(int zstd);
uint64_t disk_cluster_max(void);
int disk_uses_codec(int zstd);

/* A layer's read: `length` bytes at `offset` of the layer's virtual disk into dest. */
uint32_t disk_read_layer(struct reader *r, struct layer *layer, uint64_t offset,
                         unsigned char *dest, uint64_t length);

/* common.read_parent: the parent's bytes, zeros past its end (or all zeros without one). */
uint32_t disk_read_parent(struct reader *r, struct layer *parent, uint64_t offset,
                          unsigned char *dest, uint64_t length);

/* Queue a read of file `handle` (of `file_size` bytes) into dest; zeros where the file
 * ends.  May send the batch (and run its jobs). */
uint32_t reader_data(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                     unsigned char *dest, uint64_t length);

/* Queue a read into IN (length <= AIODD_IN_SIZE, the file's end clips it) and a job over
 * its bytes; the job's `segment` is set here. */
uint32_t reader_job(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                    uint64_t length, struct reader_job *job);

/* reader_job for reads that follow one another through a file (vmdk's compressed
 * grains, whose lengths are only known from their bytes): when the last segment was
 * queued here for the same file and reaches `offset`, it grows to cover the new range
 * (while IN has room) instead of a segment being added.  The job's bytes start at
 * segments[job->segment].dest + (offset - segments[job->segment].offset). */
uint32_t reader_span_job(struct reader *r, uint32_t handle, uint64_t file_size, uint64_t offset,
                         uint64_t length, struct reader_job *job);

/* Send the batch and run its jobs; the batch is empty after. */
uint32_t reader_flush(struct reader *r);

/* Run the queued jobs now (sending the batch first) if there are any: before anything
 * that can fail after them in the decoder's order. */
uint32_t reader_settle(struct reader *r);

/* A run of pieces a table-mapped layer reads from its parent (common.Runs' parent
 * runs): kept until a piece of another kind follows, or the read ends, where Python
 * reads it. */
struct parent_run {
    int pending;
    uint64_t pos;  /* in the command's dest */
    uint64_t length;
    int stale;     /* the parent was read: a table pointer taken before may have moved */
};

static inline void parent_run_add(struct parent_run *run, uint64_t pos, uint64_t n) {
    if (run->pending) {
        run->length += n;
    } else {
        *run = (struct parent_run){1, pos, n, run->stale};
    }
}

/* Read the pending run from `parent` (zeros without one) into dest + pos, at the virtual
 * offset base + pos; the jobs queued before it run first, as Python has run them by
 * then. */
uint32_t parent_run_flush(struct parent_run *run, struct reader *r, struct layer *parent,
                          uint64_t base, unsigned char *dest);

/* A read of a layer mapped by a two-level table (qcow2, qcow, qed): [base, base + stop)
 * of its virtual disk into dest, an L1 entry's span of clusters at a time, a run of the
 * parent's clusters read where Python flushes it. */
struct table_walk {
    struct reader *r;
    const void *format;  /* the layer's decoder (struct qcow2, qcow, qed) */
    struct layer *layer;
    struct layer *parent;  /* NULL: none, zeros */
    uint64_t base;         /* the virtual offset of dest[0] */
    unsigned char *dest;
    const uint64_t *table;  /* the L2 table looked up, for a decoder that holds one */
    struct parent_run run;  /* the parent's clusters waiting; stale: look the L2 table up again */
};

/* What a format says of its tables. */
struct table_walk_ops {
    /* The L2 table's offset in L1 entry `l1_index`; 0: none, the span is the parent's. */
    uint32_t (*l2_offset)(struct table_walk *w, uint64_t l1_index, uint64_t *offset);
    /* Check the L2 table at `offset` and look it up; again when the parent was read
     * (w->run.stale), as a pointer into the cache may have moved. */
    uint32_t (*l2_table)(struct table_walk *w, uint64_t offset, uint64_t l1_index);
    /* Entry `index` of that table: the n bytes at dest + pos, all in one cluster. */
    uint32_t (*entry)(struct table_walk *w, uint64_t l2_offset, uint64_t index, uint64_t pos,
                      uint64_t n);
};

/* The layer's read of `length` bytes at w->base into w->dest (zeros past its end), over
 * clusters of 2^cluster_bits bytes, 2^l2_bits of them to an L2 table. */
uint32_t table_walk(struct table_walk *w, const struct table_walk_ops *ops, uint32_t cluster_bits,
                    uint32_t l2_bits, uint64_t length);

/* Read the parent's pending run (Python's flush of a backing run). */
uint32_t walk_flush(struct table_walk *w);

/* An error of the tables: the jobs queued before it in Python's order run first. */
uint32_t walk_fail(struct table_walk *w, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/* An image error of layer `handle` found while reading: the jobs queued before it in
 * Python's order run first, and may fail first. */
uint32_t reader_vfail(struct reader *r, uint32_t handle, const char *format, va_list args);
uint32_t reader_fail(struct reader *r, uint32_t handle, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

/* An image error of layer `handle` (AIODD_E_IMAGE), found while opening it. */
uint32_t image_error(uint32_t handle, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/* A layer's read of [offset, offset + length): zeros dest past the virtual disk's end and
 * says how much of it lies inside (0: nothing left to decode). */
uint64_t disk_clip(const struct layer *layer, uint64_t offset, unsigned char *dest,
                   uint64_t length);

/* A table of `entries` 64-bit entries (big-endian, or little-endian with `little`) of
 * file `handle` at `offset`, held whole when the budget allows it; *table stays NULL when
 * not (read it through disk_table_entry).  *whole is 0 when the file ended before the
 * table did: what that means is the caller's to say. */
uint32_t disk_hold_table(uint32_t handle, uint64_t offset, uint64_t entries, int little,
                         uint64_t **table, int *whole);

/* Entry `index` of a table of `entries` 64-bit big-endian entries at `offset` of the
 * layer's file: from `held` when it is held whole, else through the cache a slot's worth
 * of entries at a time (keys with the low bit set, apart from L2 tables'). */
uint32_t disk_table_entry(struct reader *r, const struct layer *layer, const uint64_t *held,
                          uint64_t offset, uint64_t entries, uint64_t index, uint64_t *entry);

/* A table of `entries` 32-bit entries, kept whole in *table when the budget allows; when
 * not, *table stays NULL and the cache is told of slots of `piece` bytes. */
uint32_t disk_keep_table32(uint64_t entries, uint64_t piece, uint32_t **table);

/* Read a table of `entries` 32-bit entries (big-endian, or little-endian with `little`)
 * at `offset` of file `handle` through IN, outside a command: into `keep` unless it is
 * NULL, and each, in order, to `visit` (when given), whose error stops the scan.  The
 * table lies inside the file (the caller has checked): a short read is the host's
 * fault. */
uint32_t disk_scan_table32(uint32_t handle, uint64_t offset, uint64_t entries, int little,
                           uint32_t *keep,
                           uint32_t (*visit)(void *context, uint64_t index, uint32_t entry),
                           void *context);

/* Entry `index` of such a table of the layer's file through the cache, a slot's worth
 * of entries at a time (keys as disk_table_entry's). */
uint32_t disk_table_entry32(struct reader *r, const struct layer *layer, uint64_t offset,
                            uint64_t entries, uint64_t index, int little, uint32_t *entry);

/* A name of at most `size` bytes at `offset` of file `handle`, up to its first NUL, in
 * memory of the open image; *length 0 (and *name NULL) for an empty one. */
uint32_t disk_read_name(uint32_t handle, uint64_t offset, uint64_t size, char **name,
                        size_t *length);

/* A table through the cache: `length` bytes of big-endian 64-bit entries of file
 * `handle` at `offset` (zeros where the file ends), as host-order entries, cached under
 * (layer, key).  The pointer holds until the next disk_read_parent. */
uint32_t disk_table(struct reader *r, const struct layer *layer, uint64_t key, uint32_t handle,
                    uint64_t file_size, uint64_t offset, uint64_t length, const uint64_t **table);

/* Read [offset, offset + length) of a file into IN at 0, outside any command (opening);
 * sets got (short where the file ends). */
uint32_t disk_read_in(uint32_t handle, uint64_t offset, uint64_t length, uint64_t *got);

static inline uint64_t be64(const unsigned char *p) {
    return (uint64_t)p[0] << 56 | (uint64_t)p[1] << 48 | (uint64_t)p[2] << 40 |
           (uint64_t)p[3] << 32 | (uint64_t)p[4] << 24 | (uint64_t)p[5] << 16 |
           (uint64_t)p[6] << 8 | (uint64_t)p[7];
}

static inline uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | (uint32_t)p[3];
}

static inline uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static inline uint64_t min_u64(uint64_t a, uint64_t b) {
    return a < b ? a : b;
}

#endif
