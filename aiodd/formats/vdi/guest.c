/* vdi (VirtualBox) in the KVM guest: the twin of decode.py and layout.py, which say what
 * each step means.  Every check runs in the Python decoder's order with its message byte
 * for byte; a change there is a change here (tests/test_kvm_decoder_vdi.py holds the two
 * together).
 *
 * Once open, a VDI's reads cannot fail: every block the disk reads was found inside the
 * file, and a VDI has no parent. */
#include "vdi/guest.h"

#define HEADER_SIZE 512u
#define SECTOR 512u
#define SIGNATURE 0xBEDA107Fu
#define VERSION_1_1 0x00010001u
#define BLOCK_SIZE (1u << 20)
#define DISCARDED 0xFFFFFFFEu
#define MAX_BLOCKS ((0x80000000u - SECTOR) / 4u)
#define MAX_DISK_SIZE ((uint64_t)MAX_BLOCKS * BLOCK_SIZE)
/* A block map too large to hold is read through the cache in pieces of this many bytes. */
#define BMAP_PIECE 4096u

struct vdi {
    uint64_t offset_bmap;
    uint64_t offset_data;
    uint64_t entries;
    uint32_t *bmap;  /* NULL: too large to hold, read through the cache */
};

static int is_null_uuid(const unsigned char *uuid) {
    for (unsigned i = 0; i < 16; i++) {
        if (uuid[i] != 0) {
            return 0;
        }
    }
    return 1;
}

/* -- the header (layout.parse_header) ------------------------------------------------- */

static uint32_t parse_header(const unsigned char *h, uint64_t got, uint32_t handle,
                             struct vdi *v, uint64_t *virtual_size) {
    if (got < HEADER_SIZE) {
        return host_error(AIODD_E_IMAGE, handle, "vdi header is truncated");
    }
    uint64_t disk_size = le64(h + 368);
    if (disk_size > MAX_DISK_SIZE) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi disk size %lu is larger than %lu bytes", (unsigned long)disk_size,
                          (unsigned long)MAX_DISK_SIZE);
    }
    disk_size = (disk_size + SECTOR - 1) / SECTOR * SECTOR;
    const uint32_t signature = le32(h + 64);
    const uint32_t version = le32(h + 68);
    const uint32_t offset_bmap = le32(h + 340);
    const uint32_t offset_data = le32(h + 344);
    const uint32_t sector_size = le32(h + 360);
    const uint32_t block_size = le32(h + 376);
    const uint32_t blocks = le32(h + 384);
    if (signature != SIGNATURE) {
        return host_error(AIODD_E_IMAGE, handle, "not in vdi format: bad signature 0x%08x",
                          signature);
    }
    if (version != VERSION_1_1) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi version %u.%u is not supported (qemu reads 1.1)", version >> 16,
                          version & 0xFFFFu);
    }
    if (offset_bmap % SECTOR != 0) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi block map offset %#x is not a multiple of 512", offset_bmap);
    }
    if (offset_data % SECTOR != 0) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi data offset %#x is not a multiple of 512", offset_data);
    }
    if (sector_size != SECTOR) {
        return host_error(AIODD_E_UNSUPPORTED, handle, "vdi sector size %u is not 512",
                          sector_size);
    }
    if (block_size != BLOCK_SIZE) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi block size %u is not supported (qemu reads 1 MiB blocks)",
                          block_size);
    }
    if (disk_size > (uint64_t)blocks * BLOCK_SIZE) {
        return host_error(AIODD_E_IMAGE, handle,
                          "vdi block map of %u entries is too small for the disk size %lu", blocks,
                          (unsigned long)disk_size);
    }
    if (!is_null_uuid(h + 424)) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi differencing images are not supported (link UUID set)");
    }
    if (!is_null_uuid(h + 440)) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi differencing images are not supported (parent UUID set)");
    }
    if (blocks > MAX_BLOCKS) {
        return host_error(AIODD_E_UNSUPPORTED, handle,
                          "vdi block map of %u entries is larger than %u", blocks, MAX_BLOCKS);
    }
    const uint64_t entries = (disk_size + BLOCK_SIZE - 1) / BLOCK_SIZE;
    if (entries > 0 && offset_bmap < HEADER_SIZE) {
        return host_error(AIODD_E_IMAGE, handle, "vdi block map at %#x overlaps the header",
                          offset_bmap);
    }
    if (entries > 0 && offset_data < offset_bmap + 4 * entries) {
        return host_error(AIODD_E_IMAGE, handle, "vdi data at %#x overlaps the block map",
                          offset_data);
    }
    v->offset_bmap = offset_bmap;
    v->offset_data = offset_data;
    v->entries = entries;
    *virtual_size = disk_size;
    return AIODD_OK;
}

/* -- opening (decode.open_disk) ------------------------------------------------------- */

/* decode.open_disk's check of one entry. */
static uint32_t check_block(void *context, uint64_t index, uint32_t entry) {
    const struct layer *layer = context;
    const struct vdi *v = layer->vdi;
    if (entry >= DISCARDED) {
        return AIODD_OK;
    }
    const uint64_t at = v->offset_data + (uint64_t)entry * BLOCK_SIZE;
    const uint64_t need = min_u64(BLOCK_SIZE, layer->virtual_size - index * BLOCK_SIZE);
    if (at + need > layer->file_size) {
        return host_error(AIODD_E_IMAGE, layer->handle,
                          "vdi block map entry %lu (block at %#lx) lies past the end of the file",
                          (unsigned long)index, (unsigned long)at);
    }
    return AIODD_OK;
}

/* The block map, checked entry by entry as Python checks it (the first entry whose
 * block, as far as the disk reads it, lies past the end of the file), and kept when the
 * budget allows. */
static uint32_t load_bmap(struct layer *layer, struct vdi *v) {
    uint32_t status = disk_keep_table32(v->entries, BMAP_PIECE, &v->bmap);
    if (status != AIODD_OK) {
        return status;
    }
    return disk_scan_table32(layer->handle, v->offset_bmap, v->entries, 1, v->bmap, check_block,
                             layer);
}

uint32_t vdi_open(struct layer *layer) {
    const uint32_t handle = layer->handle;
    unsigned char header[HEADER_SIZE];
    uint64_t got;
    uint32_t status = disk_read_in(handle, 0, HEADER_SIZE, &got);
    if (status != AIODD_OK) {
        return status;
    }
    memcpy(header, host_in(), (size_t)got);
    struct vdi *v = disk_alloc(sizeof *v);
    if (v == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(v, 0, sizeof *v);
    layer->vdi = v;
    uint64_t size = 0;
    if ((status = parse_header(header, got, handle, v, &size)) != AIODD_OK) {
        return status;
    }
    const uint64_t bytes = 4 * v->entries;
    if (v->offset_bmap + bytes > layer->file_size) {
        return host_error(AIODD_E_IMAGE, handle,
                          "vdi block map at %#lx (%lu entries) lies past the end of the file",
                          (unsigned long)v->offset_bmap, (unsigned long)v->entries);
    }
    layer->virtual_size = size;
    return load_bmap(layer, v);
}

/* -- reading (decode.VdiDisk.read_into) ----------------------------------------------- */

static uint32_t bmap_entry(struct reader *r, const struct layer *layer, uint64_t index,
                           uint32_t *entry) {
    const struct vdi *v = layer->vdi;
    if (index >= v->entries) {
        *entry = DISCARDED;
        return AIODD_OK;
    }
    if (v->bmap != NULL) {
        *entry = v->bmap[index];
        return AIODD_OK;
    }
    return disk_table_entry32(r, layer, v->offset_bmap, v->entries, index, 1, entry);
}

uint32_t vdi_read(struct reader *r, struct layer *layer, uint64_t offset, unsigned char *dest,
                  uint64_t length) {
    const struct vdi *v = layer->vdi;
    const uint64_t stop = disk_clip(layer, offset, dest, length);
    for (uint64_t pos = 0; pos < stop;) {
        const uint64_t index = (offset + pos) / BLOCK_SIZE;
        const uint64_t within = (offset + pos) % BLOCK_SIZE;
        const uint64_t n = min_u64(BLOCK_SIZE - within, stop - pos);
        uint32_t entry;
        uint32_t status = bmap_entry(r, layer, index, &entry);
        if (status != AIODD_OK) {
            return status;
        }
        if (entry >= DISCARDED) {
            memset(dest + pos, 0, (size_t)n);
        } else {
            status = reader_data(r, layer->handle, layer->file_size,
                                 v->offset_data + (uint64_t)entry * BLOCK_SIZE + within,
                                 dest + pos, n);
            if (status != AIODD_OK) {
                return status;
            }
        }
        pos += n;
    }
    return AIODD_OK;
}
