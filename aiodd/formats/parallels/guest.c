/* parallels in the KVM guest: the twin of decode.py and layout.py, which say what each
 * step means.  Every check runs in the Python decoder's order with its message byte for
 * byte; a change there is a change here (tests/test_kvm_decoder_parallels.py holds the
 * two together).
 *
 * A read fails only on a cluster that starts past the file's end or inside the header
 * or BAT, checked cluster by cluster in Python's order (a run of clusters is looked at
 * ahead of its read, as Python looks); where a cluster ends past the file the reader
 * gives zeros, as Python does. */
#include "parallels/guest.h"

#define HEADER_SIZE 64u
#define SECTOR 512u
#define VERSION 2u
#define MAX_TRACKS (0x7FFFFFFFu / 513u)
#define MAX_BAT_ENTRIES (0x7FFFFFFFu / 4u)
#define MAX_SECTORS ((INT64_MAX_U + 1u - SECTOR) / SECTOR)
/* A BAT too large to hold is read through the cache in pieces of this many bytes. */
#define BAT_PIECE 4096u

struct parallels {
    uint64_t cluster_size;
    uint64_t unit;     /* bytes per unit of a BAT entry */
    uint64_t bat_end;
    uint64_t entries;  /* the entries the virtual disk reaches */
    uint32_t *bat;     /* NULL: too large to hold, read through the cache */
};

uint32_t parallels_open(struct layer *layer) {
    const uint32_t handle = layer->handle;
    const uint64_t file_size = layer->file_size;
    const unsigned char *in = host_in();
    uint64_t got;
    uint32_t status = disk_read_in(handle, 0, HEADER_SIZE, &got);
    if (status != AIODD_OK) {
        return status;
    }
    /* layout.parse_header */
    if (got < HEADER_SIZE) {
        return image_error(handle, "parallels header is truncated (%lu bytes of %u)",
                           (unsigned long)got, HEADER_SIZE);
    }
    const int old = memcmp(in, "WithoutFreeSpace", 16) == 0;
    if (le32(in + 16) != VERSION || (!old && memcmp(in, "WithouFreSpacExt", 16) != 0)) {
        return image_error(handle,
                           "not in parallels format: no 'WithoutFreeSpace' or"
                           " 'WithouFreSpacExt' magic with version 2");
    }
    const uint32_t tracks = le32(in + 28);
    const uint32_t bat_entries = le32(in + 32);
    uint64_t nb_sectors = le64(in + 36);
    const uint32_t data_off = le32(in + 48);
    if (old) {
        nb_sectors &= 0xFFFFFFFFu;
    }
    if (tracks == 0) {
        return image_error(handle, "parallels cluster size is zero");
    }
    if (tracks > MAX_TRACKS) {
        return image_error(handle, "parallels cluster of %u sectors is too large (at most %u)",
                           tracks, MAX_TRACKS);
    }
    if (bat_entries > MAX_BAT_ENTRIES) {
        return image_error(handle, "parallels BAT of %u entries is too large (at most %u)",
                           bat_entries, MAX_BAT_ENTRIES);
    }
    if (nb_sectors > MAX_SECTORS) {
        return image_error(handle, "parallels virtual size of %lu sectors is too large",
                           (unsigned long)nb_sectors);
    }
    /* layout.check_extents */
    const uint64_t bat_end = HEADER_SIZE + 4ULL * bat_entries;
    if (bat_end > file_size) {
        return image_error(handle, "parallels BAT (%u entries) lies past the end of the file",
                           bat_entries);
    }
    if (data_off != 0) {
        const uint64_t at = (uint64_t)data_off * SECTOR;
        if (at < bat_end) {
            return image_error(handle, "parallels data area at %#lx overlaps the header or BAT",
                               (unsigned long)at);
        }
        if (at > file_size) {
            return image_error(handle,
                               "parallels data area at %#lx lies past the end of the file",
                               (unsigned long)at);
        }
    }

    struct parallels *p = disk_alloc(sizeof *p);
    if (p == NULL) {
        return AIODD_E_NOMEM;
    }
    memset(p, 0, sizeof *p);
    layer->parallels = p;
    p->cluster_size = (uint64_t)tracks * SECTOR;
    p->unit = old ? SECTOR : p->cluster_size;
    const uint64_t reached = (nb_sectors + tracks - 1) / tracks;
    p->entries = reached < bat_entries ? reached : bat_entries;
    layer->virtual_size = nb_sectors * SECTOR;

    p->bat_end = bat_end;

    /* The BAT the disk reaches, kept when the budget allows. */
    if ((status = disk_keep_table32(p->entries, BAT_PIECE, &p->bat)) != AIODD_OK ||
        p->bat == NULL) {
        return status;
    }
    return disk_scan_table32(handle, HEADER_SIZE, p->entries, 1, p->bat, NULL, NULL);
}

/* -- reading (decode.ParallelsDisk.read_into) ------------------------------------------ */

/* layout.cluster_at: a cluster a read reaches starts inside the file, after the BAT. */
static uint32_t cluster_at(const struct layer *layer, uint64_t index, uint32_t entry,
                           uint64_t *at) {
    const struct parallels *p = layer->parallels;
    *at = (uint64_t)entry * p->unit;
    if (*at >= layer->file_size) {
        return image_error(layer->handle,
                           "parallels BAT entry %lu (cluster at %#lx) lies past the end of the"
                           " file",
                           (unsigned long)index, (unsigned long)*at);
    }
    if (*at < p->bat_end) {
        return image_error(layer->handle,
                           "parallels BAT entry %lu (cluster at %#lx) overlaps the header or BAT",
                           (unsigned long)index, (unsigned long)*at);
    }
    return AIODD_OK;
}

/* Where cluster `index` starts in the file; 0 for an absent cluster. */
static uint32_t host_offset(struct reader *r, const struct layer *layer, uint64_t index,
                            uint64_t *at) {
    const struct parallels *p = layer->parallels;
    *at = 0;
    if (index >= p->entries) {
        return AIODD_OK;
    }
    if (p->bat != NULL) {
        return p->bat[index] == 0 ? AIODD_OK : cluster_at(layer, index, p->bat[index], at);
    }
    uint32_t entry;
    uint32_t status = disk_table_entry32(r, layer, HEADER_SIZE, p->entries, index, 1, &entry);
    if (status != AIODD_OK) {
        return status;
    }
    return entry == 0 ? AIODD_OK : cluster_at(layer, index, entry, at);
}

uint32_t parallels_read(struct reader *r, struct layer *layer, uint64_t offset,
                        unsigned char *dest, uint64_t length) {
    const struct parallels *p = layer->parallels;
    const uint64_t stop = disk_clip(layer, offset, dest, length);
    const uint64_t cs = p->cluster_size;
    for (uint64_t pos = 0; pos < stop;) {
        uint64_t index = (offset + pos) / cs;
        const uint64_t within = (offset + pos) % cs;
        uint64_t at;
        uint32_t status = host_offset(r, layer, index, &at);
        if (status != AIODD_OK) {
            return status;
        }
        uint64_t n = min_u64(cs - within, stop - pos);
        /* Clusters that follow each other in the file are one read. */
        for (uint64_t prev = at; pos + n < stop;) {
            uint64_t next;
            if ((status = host_offset(r, layer, index + 1, &next)) != AIODD_OK) {
                return status;
            }
            if ((prev == 0) != (next == 0) || (prev != 0 && next != prev + cs)) {
                break;
            }
            index++;
            prev = next;
            n = min_u64(n + cs, stop - pos);
        }
        if (at == 0) {
            memset(dest + pos, 0, (size_t)n);
        } else {
            status = reader_data(r, layer->handle, layer->file_size, at + within, dest + pos, n);
            if (status != AIODD_OK) {
                return status;
            }
        }
        pos += n;
    }
    return AIODD_OK;
}
