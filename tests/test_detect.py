"""Format detection as qemu-img 7.2's: every format it probes is recognised as its probe
recognises it, and one aiodd does not read is refused, never copied as raw
(docs/formats.md#format-detection-and--f)."""

from __future__ import annotations

import base64
import re
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiodd.errors import UnsupportedImageError, UsageError
from aiodd.formats import QEMU_FORMATS, check_input_format
from aiodd.formats import foreign as probes
from aiodd.formats.base import RandomAccessFile, Reference, VirtualDisk
from aiodd.formats.foreign import PROBE_SIZE
from aiodd.formats.parallels.layout import probe as parallels_probe
from aiodd.formats.qcow import layout as qcow_layout
from aiodd.formats.qcow2.layout import EXT_BACKING_FORMAT
from aiodd.formats.qed import layout as qed_layout
from aiodd.formats.registry import PROBE_ORDER, PROBES, detect, open_disk
from aiodd.formats.vdi import layout as vdi_layout
from aiodd.io import LocalFile
from tests.conftest import needs_qemu, qemu_img, qemu_io
from tests.harness import aiodd_run, aiodd_subprocess, leftovers, qemu_dd

MiB = 1 << 20
READS = "aiodd reads raw, qcow2, vmdk, vpc, vhdx, vdi, parallels, qcow and qed"
ISOLATIONS = ["sandbox", "inline"]


def refused(name: str, title: str) -> str:
    return f"aiodd: {name}: this is {title}; {READS}\n"


def qemu_probe(path: Path) -> str:
    """The format qemu-img's probe picks for ``path``, opened by its bare name from its
    directory (dmg goes by the name): the first format driver qemu opens on it."""
    proc = subprocess.run(
        ["qemu-img", "--trace", "bdrv_open_common", "info", path.name],
        capture_output=True,
        text=True,
        cwd=path.parent,
    )
    drivers: list[str] = re.findall(r'format_name "([^"]+)"', proc.stderr + proc.stdout)
    chosen = [d for d in drivers if d != "file"]
    assert chosen, proc.stderr
    return chosen[0]


# --- hand-built images qemu 7.2 opens -----------------------------------------------

CLOOP_MAGIC = probes.CLOOP_MAGIC


def cloop_image(blocks: list[bytes], block_size: int = 4096) -> bytes:
    """cloop 2.0: the shell header padded to 128, block size, block count, offsets, and
    the zlib-compressed blocks."""
    head = CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", block_size, len(blocks))
    packed = [zlib.compress(b) for b in blocks]
    offsets = [len(head) + 8 * (len(blocks) + 1)]
    for p in packed:
        offsets.append(offsets[-1] + len(p))
    return head + b"".join(struct.pack(">Q", o) for o in offsets) + b"".join(packed)


def bochs_image(version: int = 0x00020000, disk: int = 64 * 1024) -> bytes:
    """A growing Bochs redolog with 4 KiB extents; the first extent holds 0x5a."""
    h = bytearray(512)
    h[0:22] = probes.BOCHS_MAGIC
    h[32:39] = b"Redolog"
    h[48:55] = b"Growing"
    catalog = disk // 4096
    struct.pack_into("<IIIII", h, 64, version, 512, catalog, 512, 4096)
    struct.pack_into("<Q", h, 88 if version == 0x00020000 else 84, disk)
    table = struct.pack("<I", 0) + b"\xff\xff\xff\xff" * (catalog - 1)
    return bytes(h) + table + b"\xff" + bytes(511) + b"\x5a" * 4096


def dmg_image(data: bytes = b"\x5a" * 4096) -> bytes:
    """UDIF: the data as one uncompressed chunk, a plist with its mish block, and the
    koly trailer."""
    sectors = len(data) // 512
    mish = bytearray(204 + 2 * 40)
    mish[0:4] = b"mish"
    struct.pack_into(">IIQQQQ", mish, 204, 1, 0, 0, sectors, 0, len(data))
    struct.pack_into(">I", mish, 244, 0xFFFFFFFF)
    xml = b"<plist><dict><data>" + base64.b64encode(bytes(mish)) + b"</data></dict></plist>\n"
    koly = bytearray(512)
    koly[0:4] = b"koly"
    struct.pack_into(">II", koly, 4, 4, 512)
    struct.pack_into(">QQ", koly, 0xD8, len(data), len(xml))
    struct.pack_into(">Q", koly, 0x1EC, sectors)
    return data + xml + bytes(koly)


def create(d: Path, name: str, *args: str) -> Path:
    path = d / name
    qemu_img("create", *args, path, "8M")
    return path


def create_luks(d: Path, name: str) -> Path:
    path = d / name
    args = ["create", "--object", "secret,id=sec0,data=abc", "-f", "luks"]
    args += ["-o", "key-secret=sec0,iter-time=10", str(path), "8M"]
    for _ in range(20):
        # qemu times its key derivation with the thread's CPU clock; where that clock is
        # coarse it may read no time at all ("Unable to get accurate CPU usage"): retry.
        proc = qemu_img(*args, check=False)
        if proc.returncode == 0:
            return path
        assert b"Unable to get accurate CPU usage" in proc.stderr, proc.stderr
        # Spread over seconds: 20 attempts back to back all failed once in a CI run.
        time.sleep(0.25)
    pytest.fail("qemu-img could not create a luks image")


def write(d: Path, name: str, data: bytes) -> Path:
    path = d / name
    path.write_bytes(data)
    return path


# (name, qemu format, the refusal's words, builder)
Builder = Callable[[Path, str], Path]
FOREIGN: list[tuple[str, str, str, Builder]] = [
    ("t.luks", "luks", "a LUKS encrypted image", create_luks),
    ("t.bochs", "bochs", "a Bochs image", lambda d, n: write(d, n, bochs_image())),
    ("t1.bochs", "bochs", "a Bochs image", lambda d, n: write(d, n, bochs_image(0x00010000))),
    (
        "t.cloop",
        "cloop",
        "a cloop image",
        lambda d, n: write(d, n, cloop_image([b"\x11" * 4096, b"\x22" * 4096])),
    ),
    (
        "t.dmg",
        "dmg",
        "a DMG image (qemu-img goes by the .dmg name)",
        lambda d, n: write(d, n, dmg_image()),
    ),
]
FOREIGN_IDS = [case[0] for case in FOREIGN]


# --- the CLI refuses every format aiodd does not read --------------------------------


@needs_qemu
@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize(("name", "fmt", "title", "build"), FOREIGN, ids=FOREIGN_IDS)
def test_refused_by_name(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    isolation: str,
    name: str,
    fmt: str,
    title: str,
    build: Builder,
) -> None:
    monkeypatch.chdir(tmp_path)
    image = build(tmp_path, name)
    assert qemu_probe(image) == fmt
    if fmt != "luks":  # qemu opens the others (luks wants the key)
        info = qemu_img("info", name).stdout.decode()
        assert f"file format: {fmt}\n" in info
    out = tmp_path / "o.raw"
    got = aiodd_run([f"--isolation={isolation}", f"if={name}", "of=o.raw", "bs=1M"], out)
    assert (got.status, got.stderr, got.output) == (1, refused(name, title), None)
    assert leftovers(tmp_path) == []


@needs_qemu
def test_refused_by_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "t.bochs", bochs_image())
    got = aiodd_subprocess(["if=t.bochs", "of=o.raw"], tmp_path / "o.raw")
    assert (got.status, got.stderr, got.output) == (1, refused("t.bochs", "a Bochs image"), None)


@needs_qemu
@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("magic", [b"WithouFreSpacExt", b"WithoutFreeSpace"])
def test_parallels_is_detected_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str, magic: bytes
) -> None:
    """Either magic probes as parallels, as in qemu; ``-f parallels`` reads the same and
    ``-f raw`` copies the container."""
    from tests.formats_corpus import to_old_magic

    monkeypatch.chdir(tmp_path)
    image = create(tmp_path, "t.prl", "-f", "parallels", "-o", "cluster_size=64K")
    subprocess.run(["qemu-io", "-f", "parallels", "-c", "write -P 0x5c 64k 100k", "t.prl"],
                   check=True, capture_output=True)  # fmt: skip
    if magic == b"WithoutFreeSpace":
        to_old_magic(image)
    assert image.read_bytes()[:16] == magic
    assert qemu_probe(image) == "parallels" == detect(image.read_bytes(), "t.prl")
    for forced in ([], ["-f", "parallels"], ["-f", "raw"]):
        args = [*forced, "if=t.prl", "bs=64k"]
        got = aiodd_run([f"--isolation={isolation}", *args, "of=a.raw"], tmp_path / "a.raw")
        want = qemu_dd([*args, "of=q.raw"], tmp_path / "q.raw")
        assert (got.status, got.stderr, want.status) == (0, "", 0)
        assert got.output == want.output
    assert got.output is not None and got.output[: image.stat().st_size] == image.read_bytes()


@needs_qemu
@pytest.mark.parametrize("forced", [False, True], ids=["probed", "forced"])
@pytest.mark.parametrize("fmt", ["qcow", "qed"])
def test_qcow_and_qed_are_detected_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, forced: bool
) -> None:
    """Formerly refused, now read: detected as qemu detects them, or named by ``-f``."""
    monkeypatch.chdir(tmp_path)
    image = create(tmp_path, f"t.{fmt}", "-f", fmt)
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 0x5c 4000 70000", image.name], check=True,
        capture_output=True,
    )  # fmt: skip
    assert qemu_probe(image) == fmt
    assert detect(image.read_bytes()[:PROBE_SIZE], image.name) == fmt
    flags = ["-f", fmt] if forced else []
    got = aiodd_run([*flags, f"if={image.name}", "of=o.raw", "bs=64k"], tmp_path / "o.raw")
    want = qemu_dd([*flags, f"if={image.name}", "of=q.raw", "bs=64k"], tmp_path / "q.raw")
    assert (got.status, want.status) == (0, 0), got.stderr
    assert got.output == want.output
    assert got.output is not None and got.output[4000:74000] == b"\x5c" * 70000


@needs_qemu
@pytest.mark.parametrize(("name", "fmt", "title", "build"), FOREIGN, ids=FOREIGN_IDS)
def test_forced_raw_copies_the_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, fmt: str, title: str, build: Builder
) -> None:
    """``-f raw`` reads any file as a raw disk, as qemu-img does."""
    monkeypatch.chdir(tmp_path)
    image = build(tmp_path, name)
    ours = aiodd_run(["-f", "raw", f"if={name}", "of=a.raw", "bs=64k"], tmp_path / "a.raw")
    theirs = qemu_dd(["-f", "raw", f"if={name}", "of=q.raw", "bs=64k"], tmp_path / "q.raw")
    assert (ours.status, ours.stderr) == (0, "")
    assert theirs.status == 0, theirs.stderr
    assert ours.output == theirs.output
    assert ours.output is not None and ours.output[: image.stat().st_size] == image.read_bytes()


@needs_qemu
def test_a_dmg_by_name_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same bytes are a DMG named *.dmg and a raw disk under another name."""
    monkeypatch.chdir(tmp_path)
    data = dmg_image()
    dmg, img = write(tmp_path, "a.dmg", data), write(tmp_path, "a.img", data)
    assert (qemu_probe(dmg), qemu_probe(img)) == ("dmg", "raw")
    got = aiodd_run(["if=a.img", "of=o.raw"], tmp_path / "o.raw")
    want = qemu_dd(["if=a.img", "of=q.raw"], tmp_path / "q.raw")
    assert (got.status, want.status) == (0, 0)
    assert got.output == want.output
    # Any content is a DMG by that name, and an empty file is nothing (qemu: raw).
    noise = write(tmp_path, "noise.dmg", bytes(range(256)) * 8)
    empty = write(tmp_path, "empty.dmg", b"")
    assert (qemu_probe(noise), qemu_probe(empty)) == ("dmg", "raw")
    got = aiodd_run(["if=noise.dmg", "of=o.raw"], tmp_path / "o.raw")
    assert (got.status, got.stderr) == (1, refused("noise.dmg", probes.TITLES["dmg"]))
    got = aiodd_run(["if=empty.dmg", "of=o.raw"], tmp_path / "o.raw")
    assert (got.status, got.stderr, got.output) == (0, "", b"")


# --- -f with a name qemu knows ------------------------------------------------------


@pytest.mark.parametrize("fmt", ["luks", "dmg", "bochs", "cloop", "vvfat", "nbd"])
def test_forcing_a_format_aiodd_does_not_read(tmp_path: Path, fmt: str) -> None:
    got = aiodd_run(["-f", fmt, "if=whatever", "of=o.raw"], tmp_path / "o.raw")
    want = f"aiodd: input format '{fmt}' is not supported: {READS}\n"
    assert (got.status, got.stderr, got.output) == (1, want, None)


def test_format_names() -> None:
    assert check_input_format("raw") == "raw"
    with pytest.raises(UsageError, match=r"^unknown input format 'qcow3': supported formats"):
        check_input_format("qcow3")
    for fmt in PROBE_ORDER:
        assert fmt in QEMU_FORMATS


# --- backing files ------------------------------------------------------------------


def drop_backing_format(image: Path) -> None:
    """Turn the backing format extension into an unknown one, as images written before
    qemu-img insisted on -F have none: qemu and aiodd then probe the backing file."""
    data = bytearray(image.read_bytes())
    at = data.find(struct.pack(">I", EXT_BACKING_FORMAT), 72, 65536)
    assert at > 0
    data[at : at + 4] = struct.pack(">I", 0x0BADF00D)
    image.write_bytes(bytes(data))


@needs_qemu
@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "probed"])
def test_backing_file_vdi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str, declared: bool
) -> None:
    """A VDI under a qcow2, declared or probed (as images written before qemu-img insisted
    on -F have it), reads as qemu reads it."""
    monkeypatch.chdir(tmp_path)
    create(tmp_path, "base.vdi", "-f", "vdi")
    qemu_io(tmp_path / "base.vdi", ["write -P 0x5d 1M 64k"], "vdi")
    qemu_img("create", "-f", "qcow2", "-b", "base.vdi", "-F", "vdi", "top.qcow2")
    qemu_io(tmp_path / "top.qcow2", ["write -P 0x6e 3M 4k"], "qcow2")
    if not declared:
        drop_backing_format(tmp_path / "top.qcow2")
        info = qemu_img("info", "--backing-chain", "top.qcow2").stdout.decode()
        assert "image: base.vdi\nfile format: vdi\n" in info
    got = aiodd_run([f"--isolation={isolation}", "if=top.qcow2", "of=o.raw"], tmp_path / "o.raw")
    want = qemu_dd(["if=top.qcow2", "of=q.raw"], tmp_path / "q.raw")
    assert (got.status, got.stderr, want.status) == (0, "", 0)
    assert got.output == want.output
    assert got.output is not None and got.output[MiB : MiB + 1] == b"\x5d"


@needs_qemu
@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_backing_format_raw_stays_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolation: str
) -> None:
    """A backing format the referring image gives is not second-guessed: backing_fmt=raw
    over a VDI reads the VDI's container bytes, as qemu does."""
    monkeypatch.chdir(tmp_path)
    create(tmp_path, "base.vdi", "-f", "vdi")
    qemu_img("create", "-u", "-f", "qcow2", "-b", "base.vdi", "-F", "raw", "top.qcow2", "1M")
    got = aiodd_run([f"--isolation={isolation}", "if=top.qcow2", "of=o.raw"], tmp_path / "o.raw")
    want = qemu_dd(["if=top.qcow2", "of=q.raw"], tmp_path / "q.raw")
    assert (got.status, got.stderr, want.status) == (0, "", 0)
    assert got.output == want.output
    assert got.output is not None and got.output[:1024] == (tmp_path / "base.vdi").read_bytes()


# --- near misses and ties, against qemu's own probe ----------------------------------

VDI_SIGNATURE = vdi_layout.SIGNATURE.to_bytes(4, "little")
VDI_AT_64 = bytes(64) + VDI_SIGNATURE


def with_vdi(head: bytes) -> bytes:
    """``head`` with the VDI signature at offset 64 (a tie at score 100)."""
    buf = bytearray(head.ljust(4096, b"\0"))
    buf[64:68] = VDI_SIGNATURE
    return bytes(buf)


def bochs_head(version: int = 0x00020000, magic: bytes = probes.BOCHS_MAGIC) -> bytes:
    h = bytearray(512)
    h[0 : len(magic)] = magic
    h[32:39] = b"Redolog"
    h[48:55] = b"Growing"
    struct.pack_into("<I", h, 64, version)
    return bytes(h)


NEAR: dict[str, bytes] = {
    "qcow-v0": b"QFI\xfb" + struct.pack(">I", 0) + bytes(600),
    "qcow-v1-8-bytes": b"QFI\xfb" + struct.pack(">I", 1),
    "qcow2-v2": b"QFI\xfb" + struct.pack(">I", 2) + bytes(600),
    "qed-4-bytes": b"QED\0",
    "qed-no-nul": b"QEDX" + bytes(600),
    "parallels-v1": b"WithoutFreeSpace" + struct.pack("<I", 1) + bytes(600),
    "parallels-v3": b"WithoutFreeSpace" + struct.pack("<I", 3) + bytes(600),
    "parallels-magic2": b"WithouFreSpacExt" + struct.pack("<I", 2) + bytes(600),
    "luks-v2": b"LUKS\xba\xbe\x00\x02" + bytes(600),
    "luks-v1-8-bytes": b"LUKS\xba\xbe\x00\x01",
    "vdi-68-bytes": VDI_AT_64,
    "vdi-sig-at-0": VDI_SIGNATURE + bytes(600),
    "bochs-v3": bochs_head(0x00030000),
    "bochs-v1": bochs_head(0x00010000),
    "bochs-no-nul": bochs_head(magic=probes.BOCHS_MAGIC + b"!"),
    "bochs-undoable": bochs_head().replace(b"Growing", b"Undoabl"),
    "cloop-prefix": CLOOP_MAGIC[:50],
    "cloop-exact": CLOOP_MAGIC,
    "cloop-v1": CLOOP_MAGIC.replace(b"V2.0", b"V1.0"),
    "tie-vdi-qcow": with_vdi(b"QFI\xfb\0\0\0\1"),
    "tie-vdi-qcow2": with_vdi(b"QFI\xfb\0\0\0\3"),
    "tie-vdi-qed": with_vdi(b"QED\0"),
    "tie-vdi-parallels": with_vdi(b"WithoutFreeSpace\2\0\0\0"),
    "tie-vdi-luks": with_vdi(b"LUKS\xba\xbe\0\1"),
    "tie-vdi-vpc": with_vdi(b"conectix"),
    "tie-vdi-vhdx": with_vdi(b"vhdxfile"),
    "tie-vdi-kdmv": with_vdi(b"KDMV"),
    "tie-vdi-vmdk-text": with_vdi(b"version=1\n"),
}


@needs_qemu
@pytest.mark.parametrize("case", list(NEAR))
def test_near_misses_as_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """aiodd picks what qemu picks; where that is raw, both copy the same bytes, and where
    it is a format aiodd does not read, aiodd refuses it."""
    monkeypatch.chdir(tmp_path)
    data = NEAR[case]
    image = write(tmp_path, "near.img", data)
    fmt = qemu_probe(image)
    assert detect(data, "near.img") == fmt
    if fmt == "raw":
        got = aiodd_run(["if=near.img", "of=o.raw"], tmp_path / "o.raw")
        want = qemu_dd(["if=near.img", "of=q.raw"], tmp_path / "q.raw")
        assert (got.status, got.stderr, want.status) == (0, "", 0)
        assert got.output == want.output
    elif fmt in probes.TITLES:
        got = aiodd_run(["if=near.img", "of=o.raw"], tmp_path / "o.raw")
        assert (got.status, got.stderr) == (1, refused("near.img", probes.TITLES[fmt]))
    elif fmt == "parallels":  # a header of zero-sector clusters: both refuse it
        got = aiodd_run(["if=near.img", "of=o.raw"], tmp_path / "o.raw")
        want = qemu_dd(["if=near.img", "of=q.raw"], tmp_path / "q.raw")
        assert (got.status, want.status) == (1, 1)
        assert got.stderr == "aiodd: near.img: parallels cluster size is zero\n"


def test_ties_resolved_in_qemu_order() -> None:
    """Measured with qemu (test_near_misses_as_qemu checks each against it)."""
    assert detect(NEAR["tie-vdi-qcow2"]) == "vdi"
    assert detect(NEAR["tie-vdi-parallels"]) == "parallels"
    assert detect(NEAR["tie-vdi-qed"]) == "qed"
    assert detect(CLOOP_MAGIC, "x.dmg") == "dmg"
    assert detect(CLOOP_MAGIC, "x.img") == "cloop"


# --- the probes themselves ------------------------------------------------------------


def pad(head: bytes) -> bytes:
    return head[:PROBE_SIZE].ljust(PROBE_SIZE, b"\0")


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """A probe buffer that starts with one format's magic, whose version (or the byte
    after the magic) is often right and sometimes not."""
    magic, version = draw(
        st.sampled_from(
            [
                (b"QFI\xfb", st.sampled_from([b"\0\0\0\1", b"\0\0\0\2", b"\0\0\0\3"])),
                (b"QED\0", st.just(b"")),
                (b"WithoutFreeSpace", st.sampled_from([b"\2\0\0\0", b"\1\0\0\0"])),
                (b"WithouFreSpacExt", st.sampled_from([b"\2\0\0\0", b"\2\0\0\1"])),
                (b"LUKS\xba\xbe", st.sampled_from([b"\0\1", b"\0\2", b"\1\0"])),
                (b"", st.just(b"")),
            ]
        )
    )
    body = draw(st.binary(max_size=PROBE_SIZE))
    buf = bytearray(magic + draw(version) + body)
    if draw(st.booleans()):
        buf[64:68] = VDI_SIGNATURE
    if draw(st.booleans()) and buf:  # a near miss: one byte of the magic changed
        i = draw(st.integers(0, max(0, min(len(buf), len(magic) + 4) - 1)))
        buf[i] ^= draw(st.integers(1, 255))
    return bytes(buf[: draw(st.integers(0, PROBE_SIZE))])


@given(headers(), st.sampled_from(["a.img", "a.dmg", ".dmg", "x.DMG", "dmg"]))
def test_detect_is_the_best_score_padded(head: bytes, name: str) -> None:
    """The first highest score over a zero-padded buffer; raw when nothing else scores."""
    got = detect(head, name)
    if not head:
        assert got == "raw"
        return
    buf = pad(head)
    assert detect(buf, name) == got  # a short file is read as if zero-padded
    scores = {fmt: probe(buf, name) for fmt, probe in PROBES}
    best = max(scores.values())
    assert scores["raw"] == 1 and scores[got] == best
    for fmt in PROBE_ORDER[: PROBE_ORDER.index(got)]:
        assert scores[fmt] < best


@given(headers())
def test_probes_read_their_fields(head: bytes) -> None:
    buf = pad(head)
    u32le = int.from_bytes(buf[16:20], "little")
    assert qcow_layout.probe(buf) == (100 if buf[:8] == b"QFI\xfb\0\0\0\1" else 0)
    assert qed_layout.probe(buf) == (100 if buf[:4] == b"QED\0" else 0)
    magic_ok = buf[:16] in (b"WithoutFreeSpace", b"WithouFreSpacExt")
    assert parallels_probe(buf) == (100 if magic_ok and u32le == 2 else 0)
    assert probes.luks(buf, "") == (100 if buf[:8] == b"LUKS\xba\xbe\0\1" else 0)
    assert vdi_layout.probe(buf) == (100 if buf[64:68] == b"\x7f\x10\xda\xbe" else 0)


@given(st.binary(max_size=64), st.text(max_size=20))
def test_dmg_goes_by_the_name_alone(head: bytes, name: str) -> None:
    want = 2 if len(name) > 4 and name[-4:] == ".dmg" else 0
    assert probes.dmg(head, name) == want
    assert probes.dmg(b"", name) == want


@given(st.integers(0, len(CLOOP_MAGIC)), st.binary(max_size=64))
def test_cloop_needs_the_whole_shell_header(cut: int, tail: bytes) -> None:
    head = CLOOP_MAGIC[:cut] + tail
    whole = head.startswith(CLOOP_MAGIC)
    assert (probes.cloop(pad(head), "") == 2) == whole
    assert (detect(head, "c.img") == "cloop") == whole


def test_bochs_strings_end_in_nul() -> None:
    assert probes.bochs(pad(bochs_head()), "") == 100
    assert probes.bochs(pad(bochs_head(0x00010000)), "") == 100
    assert probes.bochs(pad(bochs_head(0x00020001)), "") == 0
    assert probes.bochs(pad(bochs_head(magic=probes.BOCHS_MAGIC + b"\x01")), "") == 0
    assert probes.bochs(bochs_head()[:511], "") == 0  # shorter than qemu's header


# --- every layer goes through the same detection -------------------------------------


class NoReferences:
    def open_file(self, ref: Reference) -> RandomAccessFile:
        raise AssertionError("no reference expected")

    def open_disk(self, ref: Reference) -> VirtualDisk:
        raise AssertionError("no reference expected")

    def open_layer(self, ref: Reference) -> tuple[RandomAccessFile, NoReferences]:
        raise AssertionError("no reference expected")


@pytest.mark.parametrize("fmt", sorted(probes.TITLES))
def test_open_disk_refuses_what_it_cannot_read(tmp_path: Path, fmt: str) -> None:
    """The decoders' entry point, which the guest reader and every backing layer use."""
    data = {
        "luks": b"LUKS\xba\xbe\0\1",
        "bochs": bochs_head(),
        "cloop": CLOOP_MAGIC,
        "dmg": b"anything",
    }[fmt]
    path = tmp_path / f"layer-{fmt}.dmg" if fmt == "dmg" else tmp_path / f"layer-{fmt}"
    path.write_bytes(data)
    file = LocalFile.open(str(path), path.name)
    try:
        with pytest.raises(UnsupportedImageError) as info:
            open_disk(file, NoReferences())
    finally:
        file.close()
    assert info.value.fmt == fmt
    assert str(info.value) == f"{path.name}: this is {probes.TITLES[fmt]}; {READS}"
