"""A strict loader for the guest's ELF: our own binary, but checked as if it were not.

Only a static x86-64 executable with page-aligned ``PT_LOAD`` segments inside
``[IMAGE_BASE, IMAGE_END)``, none both writable and executable, none overlapping, is
accepted; anything else is a :class:`ValueError`.
"""

from __future__ import annotations

import itertools
import struct

from aiodd.guest.kvm.layout import IMAGE_BASE, IMAGE_END, PAGE

PT_LOAD = 1
PT_GNU_STACK = 0x6474E551
PF_X, PF_W, PF_R = 1, 2, 4

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_MAX_FILE = IMAGE_END - IMAGE_BASE + PAGE


# Plain classes: the guest's process imports this module, and neither typing (for a
# NamedTuple) nor dataclasses (docs/performance.md, "Start-up").
class Segment:
    __slots__ = ("data", "flags", "memsz", "vaddr")

    def __init__(self, vaddr: int, data: bytes, memsz: int, flags: int) -> None:
        self.vaddr = vaddr
        self.data = data  # p_filesz bytes; the rest of memsz is zero
        self.memsz = memsz
        self.flags = flags  # PF_*

    @property
    def writable(self) -> bool:
        return bool(self.flags & PF_W)

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)


class Image:
    __slots__ = ("entry", "segments")

    def __init__(self, entry: int, segments: tuple[Segment, ...]) -> None:
        self.entry = entry
        self.segments = segments


def parse(data: bytes) -> Image:
    """The loadable image of ``data``; raises ValueError on anything unexpected."""
    if len(data) > _MAX_FILE or len(data) < _EHDR.size:
        raise ValueError("bad size")
    (ident, e_type, machine, version, entry, phoff, _shoff, _flags, ehsize, phentsize,
     phnum, *_rest) = _EHDR.unpack_from(data)  # fmt: skip
    if ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1 or ident[6] != 1:
        raise ValueError("not a little-endian ELF64")
    if e_type != 2 or machine != 62 or version != 1 or ehsize != _EHDR.size:
        raise ValueError("not a static x86-64 executable")
    if phentsize != _PHDR.size or not 1 <= phnum <= 16:
        raise ValueError("bad program headers")
    if phoff > len(data) or phnum * _PHDR.size > len(data) - phoff:
        raise ValueError("program headers outside the file")
    segments: list[Segment] = []
    for index in range(phnum):
        p_type, flags, offset, vaddr, _paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + index * _PHDR.size
        )
        if p_type == PT_GNU_STACK:
            if flags & PF_X:
                raise ValueError("executable stack")
            continue
        if p_type != PT_LOAD:
            raise ValueError(f"unexpected program header type {p_type:#x}")
        if flags & ~(PF_R | PF_W | PF_X) or not flags & PF_R:
            raise ValueError("bad segment flags")
        if flags & PF_W and flags & PF_X:
            raise ValueError("segment both writable and executable")
        if vaddr % PAGE or offset % PAGE or filesz > memsz or memsz == 0:
            raise ValueError("segment not page-aligned or inconsistent")
        if not IMAGE_BASE <= vaddr < IMAGE_END or memsz > IMAGE_END - vaddr:
            raise ValueError("segment outside the image region")
        if offset > len(data) or filesz > len(data) - offset:
            raise ValueError("segment outside the file")
        segments.append(Segment(vaddr, data[offset : offset + filesz], memsz, flags))
    segments.sort(key=lambda s: s.vaddr)
    for before, after in itertools.pairwise(segments):
        # Pages, not bytes: two segments sharing a page would share its rights.
        if before.vaddr + -(-before.memsz // PAGE) * PAGE > after.vaddr:
            raise ValueError("segments share a page")
    if not any(s.executable and s.vaddr <= entry < s.vaddr + s.memsz for s in segments):
        raise ValueError("entry point outside the text")
    return Image(entry, tuple(segments))
