"""The backing-file policy (docs/security.md#the-backing-file-policy), tested on real
directory trees in tmp_path."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
from pathlib import Path

import pytest

from aiodd import policy as policy_mod
from aiodd.errors import ImageError, PolicyError, UsageError
from aiodd.formats.base import Reference
from aiodd.io import filesystem_magic
from aiodd.policy import MAX_CHAIN, Layer, Policy

SECRET = b"TOP-SECRET-HOST-BYTES-0123456789"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/images/{top.img, base.img, sub/deep.img}, tmp/outside/secret."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for name in ("top.img", "base.img", "sub/deep.img"):
        (images / name).write_bytes(b"\0" * 512)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(SECRET)
    return tmp_path


def top_layer(pol: Policy, path: Path) -> Layer:
    fd = os.open(path, os.O_RDONLY)
    try:
        return pol.top(str(path), fd)
    finally:
        os.close(fd)


def resolve(
    pol: Policy, layer: Layer, name: str, *, disk: bool = True, kind: str = "backing"
) -> tuple[str, Layer]:
    """Resolve ``name``; returns the opened file's real path and its layer."""
    ref = Reference(kind, name, layer.name)  # type: ignore[arg-type]
    fd, new = pol.open_reference(layer, ref, disk=disk)
    try:
        return os.readlink(f"/proc/self/fd/{fd}"), new
    finally:
        os.close(fd)


def refusal(pol: Policy, layer: Layer, name: str, **kw: object) -> str:
    with pytest.raises(PolicyError) as info:
        resolve(pol, layer, name, **kw)  # type: ignore[arg-type]
    text = str(info.value)
    assert "\n" not in text
    assert SECRET.decode() not in text
    return text


def test_plain_name_subdir_and_absolute_inside_are_allowed(tree: Path) -> None:
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    real, layer = resolve(pol, top, "base.img")
    assert real == str(tree / "images/base.img")
    assert layer.depth == 1 and layer.directory == str(tree / "images")
    real, layer = resolve(pol, top, "sub/deep.img")
    assert real == str(tree / "images/sub/deep.img")
    assert layer.directory == str(tree / "images/sub")
    real, _ = resolve(pol, top, str(tree / "images/sub/deep.img"))
    assert real == str(tree / "images/sub/deep.img")
    real, _ = resolve(pol, top, "./sub/../base.img")
    assert real == str(tree / "images/base.img")


def test_references_resolve_against_the_referrers_directory(tree: Path) -> None:
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    _, deep = resolve(pol, top, "sub/deep.img")
    (tree / "images/sub/next.img").write_bytes(b"x")
    assert resolve(pol, deep, "next.img")[0] == str(tree / "images/sub/next.img")
    # the deeper image's own tree is sub/: its parent directory is not allowed
    text = refusal(pol, deep, "../base.img")
    assert "'../base.img'" in text and "allow_backing=[DIR]" in text
    pol2 = Policy([str(tree / "images")])
    assert resolve(pol2, deep, "../base.img")[0] == str(tree / "images/base.img")


@pytest.mark.parametrize("spelling", ["abs", "dotdot", "deep-dotdot"])
def test_outside_is_refused_and_allow_backing_widens(tree: Path, spelling: str) -> None:
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    name = {
        "abs": str(tree / "outside/secret"),
        "dotdot": "../outside/secret",
        "deep-dotdot": "sub/../../outside/secret",
    }[spelling]
    text = refusal(pol, top, name)
    assert f"backing file '{name}' is refused" in text
    assert "outside the allowed directories" in text
    assert text.startswith(str(tree / "images/top.img") + ": ")
    assert text.endswith("(allow it with allow_backing=[DIR])")
    with pytest.raises(PolicyError) as info:
        resolve(pol, top, name)
    assert info.value.allowable is True
    assert "allow it" not in info.value.rule
    assert info.value.naming("--allow-backing DIR") == text.replace(
        "allow_backing=[DIR]", "--allow-backing DIR"
    )
    wide = Policy([str(tree / "outside")])
    assert resolve(wide, top_layer(wide, tree / "images/top.img"), name)[0] == str(
        tree / "outside/secret"
    )


def test_lexical_refusal_touches_nothing_outside(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No oracle: a path outside is refused by its spelling, before any syscall on it."""
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    calls: list[object] = []

    def spy(real: object) -> object:
        def wrapper(*args: object, **kwargs: object) -> object:
            calls.append(args)
            return real(*args, **kwargs)  # type: ignore[operator]

        return wrapper

    for name in ("stat", "lstat", "open", "readlink"):
        monkeypatch.setattr(os, name, spy(getattr(os, name)))
    monkeypatch.setattr(os.path, "realpath", spy(os.path.realpath))
    texts = []
    for name in (str(tree / "outside/secret"), str(tree / "outside/missing"), "/etc/shadow",
                 "/nonexistent/x", "../outside/secret", "../outside/missing"):  # fmt: skip
        texts.append(refusal(pol, top, name).replace(name, "NAME"))
    assert calls == []
    assert len(set(texts)) == 1  # existing or not, the same answer


def test_symlinks_followed_only_while_inside(tree: Path) -> None:
    images = tree / "images"
    (images / "in-link").symlink_to("sub/deep.img")
    (images / "abs-in-link").symlink_to(images / "base.img")
    (images / "dir-link").symlink_to("sub")
    (images / "out-link").symlink_to(tree / "outside/secret")
    (images / "rel-out-link").symlink_to("../outside/secret")
    (images / "out-dir").symlink_to(tree / "outside")
    (images / "sub/up-link").symlink_to("../base.img")
    pol = Policy()
    top = top_layer(pol, images / "top.img")
    real, layer = resolve(pol, top, "in-link")
    assert real == str(images / "sub/deep.img") and layer.directory == str(images / "sub")
    assert resolve(pol, top, "abs-in-link")[0] == str(images / "base.img")
    assert resolve(pol, top, "dir-link/deep.img")[0] == str(images / "sub/deep.img")
    # up-link stays in the top image's tree, which is where the walk started
    assert resolve(pol, top, "sub/up-link")[0] == str(images / "base.img")
    for name in ("out-link", "rel-out-link", "out-dir/secret"):
        text = refusal(pol, top, name)
        assert "a symlink on its path leads outside" in text
        assert "outside/secret" not in text.split("allowed directories")[0].replace(name, "")
        assert "allow_backing=[DIR]" in text
    wide = Policy([str(tree / "outside")])
    assert resolve(wide, top_layer(wide, images / "top.img"), "out-link")[0] == str(
        tree / "outside/secret"
    )


def test_symlink_loop(tree: Path) -> None:
    images = tree / "images"
    (images / "la").symlink_to("lb")
    (images / "lb").symlink_to("la")
    pol = Policy()
    assert "too many levels" in refusal(pol, top_layer(pol, images / "top.img"), "la")


def test_special_files_are_refused(tree: Path) -> None:
    images = tree / "images"
    os.mkfifo(images / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(images / "sock"))
    try:
        pol = Policy()
        top = top_layer(pol, images / "top.img")
        assert "it is a FIFO" in refusal(pol, top, "fifo")  # and it did not block
        assert "it is a socket" in refusal(pol, top, "sock")
        assert "it is a directory" in refusal(pol, top, "sub")
        assert "names a directory" in refusal(pol, top, "sub/..", kind="extent", disk=False)
    finally:
        sock.close()


def test_devices_and_proc(tree: Path) -> None:
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    assert "outside the allowed" in refusal(pol, top, "/dev/zero")
    dev = Policy(["/dev"])
    assert "character device" in refusal(dev, top_layer(dev, tree / "images/top.img"), "/dev/zero")
    root = Policy(["/"])
    rtop = top_layer(root, tree / "images/top.img")
    for name in ("/proc/self/environ", "/proc/self/root/etc/hostname", "/sys/kernel/uevent_helper"):
        assert "/proc or /sys" in refusal(root, rtop, name)
    (tree / "images/env-link").symlink_to("/proc/self/environ")
    assert "leads into /proc or /sys" in refusal(root, rtop, str(tree / "images/env-link"))


def test_kernel_filesystems_recognised_by_magic() -> None:
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        assert filesystem_magic(fd) == 0x9FA0
    finally:
        os.close(fd)
    fd = os.open("/", os.O_RDONLY)
    try:
        assert filesystem_magic(fd) not in policy_mod._PSEUDO_FS_MAGIC
    finally:
        os.close(fd)


def test_missing_inside_is_an_image_error_not_a_policy_error(tree: Path) -> None:
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    with pytest.raises(ImageError) as info:
        resolve(pol, top, "nope.img")
    assert not isinstance(info.value, PolicyError)
    assert "cannot open backing file 'nope.img': No such file or directory" in str(info.value)


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ('json:{"file.filename": "/etc/passwd"}', "json: pseudo-protocol"),
        ("nbd://localhost:10809/x", "protocol prefix 'nbd:'"),
        ("nbd:localhost:10809", "protocol prefix 'nbd:'"),
        ("http://example.com/x.qcow2", "protocol prefix 'http:'"),
        ("file:base.img", "protocol prefix 'file:'"),
        ("", "not a file name"),
        ("a\0b", "not a file name"),
    ],
)
def test_non_paths_are_refused(tree: Path, name: str, rule: str) -> None:
    pol = Policy()
    text = refusal(pol, top_layer(pol, tree / "images/top.img"), name)
    assert rule in text and "no option allows this" in text


def test_colon_after_a_slash_is_a_path(tree: Path) -> None:
    (tree / "images/sub/a:b.img").write_bytes(b"x")
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    assert resolve(pol, top, "sub/a:b.img")[0].endswith("sub/a:b.img")


def test_loops_by_device_and_inode(tree: Path) -> None:
    images = tree / "images"
    os.link(images / "top.img", images / "hard.img")
    pol = Policy()
    top = top_layer(pol, images / "top.img")
    assert "loops" in refusal(pol, top, "top.img")
    assert "loops" in refusal(pol, top, "hard.img")  # another spelling, the same inode
    _, base = resolve(pol, top, "base.img")
    assert "loops" in refusal(pol, base, "top.img")
    # a data file / extent is not a layer: the same file twice is fine
    resolve(pol, top, "base.img", disk=False, kind="extent")


def test_chain_depth_limit(tree: Path) -> None:
    pol = Policy()
    layer = top_layer(pol, tree / "images/top.img")
    images = tree / "images"
    for i in range(MAX_CHAIN):
        (images / f"l{i}.img").write_bytes(b"x")
    for i in range(MAX_CHAIN - 1):
        _, layer = resolve(pol, layer, f"l{i}.img")
    assert layer.depth == MAX_CHAIN - 1
    assert f"exceed {MAX_CHAIN} layers" in refusal(pol, layer, f"l{MAX_CHAIN - 1}.img")


def test_control_characters_are_escaped(tree: Path) -> None:
    pol = Policy()
    text = refusal(pol, top_layer(pol, tree / "images/top.img"), "/x\n\x1b[31mred")
    assert "\\n\\x1b[31mred" in text and "\x1b" not in text


def test_allow_dirs_must_exist(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        Policy([str(tmp_path / "nope")])


def test_opened_read_only_regular(tree: Path) -> None:
    pol = Policy()
    top = top_layer(pol, tree / "images/top.img")
    fd, _ = pol.open_reference(top, Reference("backing", "base.img", "top.img"), disk=True)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert stat.S_ISREG(os.fstat(fd).st_mode)
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
