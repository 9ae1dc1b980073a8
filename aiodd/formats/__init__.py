"""Disk image formats: one sans-IO package per format (``layout``, ``decode``,
``encode``), listed by :mod:`aiodd.formats.registry` (docs/architecture.md, "The formats").

The names are here, apart from the modules, so that checking ``-f``/``-O`` does not
import any decoder or encoder (the CLI's start-up time is part of every copy).
"""

from __future__ import annotations

from aiodd.errors import UsageError

INPUT_FORMATS = ("parallels", "qcow", "qcow2", "qed", "raw", "vdi", "vhdx", "vmdk", "vpc")
# The order qemu-img's users know them in; raw is the default.
OUTPUT_FORMATS = ("raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi")
# What aiodd reads, as its refusals say it: the formats it writes, then those it only reads.
_READ_ORDER = (*OUTPUT_FORMATS, *(f for f in INPUT_FORMATS if f not in OUTPUT_FORMATS))
READS = f"{', '.join(_READ_ORDER[:-1])} and {_READ_ORDER[-1]}"
# Formats qemu-img writes that aiodd only reads, and why it does not write them.
READ_ONLY = {
    "qcow": "qcow (version 1) is kept in qemu for old images only",
    "qed": "QED is kept in qemu for old images only",
    "parallels": "aiodd reads parallels images and does not write them",
}

# Every format name qemu-img 7.2 accepts for -f (its --help lists them): one aiodd does
# not read is a known format it refuses, not an unknown name.
QEMU_FORMATS = frozenset(
    {
        "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress",
        "copy-before-write", "copy-on-read", "dmg", "file", "ftp", "ftps", "gluster",
        "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks", "nbd", "nfs",
        "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed",
        "quorum", "raw", "rbd", "replication", "snapshot-access", "ssh", "throttle", "vdi",
        "vhdx", "vmdk", "vpc", "vvfat",
    }
)  # fmt: skip


def check_input_format(name: str) -> str:
    if name in INPUT_FORMATS:
        return name
    if name in QEMU_FORMATS:
        raise UsageError(f"input format '{name}' is not supported: aiodd reads {READS}")
    raise UsageError(
        f"unknown input format '{name}': supported formats are {', '.join(INPUT_FORMATS)}"
    )


def check_output_format(name: str) -> str:
    if name in READ_ONLY:
        raise UsageError(
            f"output format '{name}' is not supported: {READ_ONLY[name]}; write qcow2 instead"
            " (-O qcow2)"
        )
    if name not in OUTPUT_FORMATS:
        raise UsageError(
            f"unknown output format '{name}': supported formats are {', '.join(OUTPUT_FORMATS)}"
        )
    return name
