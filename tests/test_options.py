"""aiodd.options: the one place operands and options are checked (docs/usage.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiodd import options
from aiodd.errors import UsageError

NOT_A_SIZE = "not a size (use a number with an optional k, M, G, T, P or E suffix, e.g. 4K or 1.5M)"
INT64_MAX = 2**63 - 1


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("bs", 1, 1),
        ("bs", "2147483647", 2**31 - 1),
        ("bs", "1M", 1 << 20),
        ("bs", "1.5K", 1536),
        ("count", 0, 0),
        ("count", "7E", 7 << 60),
        ("skip", INT64_MAX, INT64_MAX),
        ("skip", " +010", 10),
    ],
)
def test_sizes_in_range(name: str, value: int | str, expected: int) -> None:
    assert options.size_operand(name, value) == expected


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("bs", 0, "invalid bs '0': must be between 1 and 2147483647"),
        ("bs", "2G", "invalid bs '2G': must be between 1 and 2147483647"),
        ("bs", "1KB", f"invalid bs '1KB': {NOT_A_SIZE}"),
        ("skip", "-1", f"invalid skip '-1': {NOT_A_SIZE}"),
        ("skip", -1, f"invalid skip '-1': must be between 0 and {INT64_MAX}"),
        ("count", "8E", f"invalid count '8E': must be between 0 and {INT64_MAX}"),
        # beyond 64 bits: qemu says out of range, not "not a size"
        ("count", "16E", f"invalid count '16E': must be between 0 and {INT64_MAX}"),
        ("count", False, "invalid count False: must be an integer or a size string"),
        ("count", None, "invalid count None: must be an integer or a size string"),
        ("bs", b"1", "invalid bs b'1': must be an integer or a size string"),
        ("bs", "1\x1b[2J", f"invalid bs '1\\x1b[2J': {NOT_A_SIZE}"),
    ],
)
def test_size_errors(name: str, value: object, message: str) -> None:
    with pytest.raises(UsageError) as info:
        options.size_operand(name, value)
    assert str(info.value) == message
    assert info.value.option == name


def test_hex_suffix_warns_only_when_asked_to_collect() -> None:
    warnings: list[str] = []
    assert options.size_operand("bs", "0x1K", warnings) == 1024
    assert warnings == ["warning: using a multiplier suffix on hex numbers is deprecated: 0x1K"]
    assert options.size_operand("bs", "0x10", warnings) == 16
    assert options.size_operand("bs", "0x1K") == 1024  # no list: no warning, same value
    assert len(warnings) == 1


def test_isolation() -> None:
    for mode in ("auto", "kvm", "sandbox", "inline"):
        assert options.isolation(mode) == mode
    assert options.ISOLATION_MODES == ("auto", "kvm", "sandbox", "inline")
    for bad, shown in (("none", "'none'"), ("Sandbox", "'Sandbox'"), ("KVM", "'KVM'"),
                       (None, "None"), (b"kvm", "b'kvm'")):  # fmt: skip
        with pytest.raises(UsageError) as info:
            options.isolation(bad)
        assert str(info.value) == f"invalid isolation {shown}: use auto, kvm, sandbox or inline"
        assert info.value.naming("--isolation") == (
            f"invalid --isolation {shown}: use auto, kvm, sandbox or inline"
        )


def test_progress_mode() -> None:
    for mode in ("none", "percent", "bar", "json"):
        assert options.progress_mode(mode) == mode
    with pytest.raises(UsageError) as info:
        options.progress_mode("loud")
    assert str(info.value) == "invalid progress 'loud': use none, percent, bar or json"


def test_allow_backing_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path)
    assert options.allow_backing_dir(tmp_path) == str(tmp_path)
    assert options.allow_backing_dir(str(tmp_path / "link")) == str(tmp_path / "link")
    for bad in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(UsageError) as info:
            options.allow_backing_dir(bad)
        assert str(info.value) == f"invalid allow_backing '{bad}': not a directory"
        assert info.value.naming("--allow-backing") == (
            f"invalid --allow-backing '{bad}': not a directory"
        )


@pytest.mark.parametrize("good", [65536, 4 << 20, 69632])
def test_io_size_accepts(good: int) -> None:
    assert options.io_size(good) == good


@pytest.mark.parametrize(
    ("bad", "shown"),
    [(61440, "'61440'"), (65537, "'65537'"), ("4M", "'4M'"), (True, "True"), (65536.0, "65536.0")],
)
def test_io_size_refuses(bad: object, shown: str) -> None:
    with pytest.raises(UsageError) as info:
        options.io_size(bad)
    assert str(info.value) == (
        f"invalid io_size {shown}: must be a multiple of 4096 of at least 65536"
    )


def test_a_plain_usage_error_names_no_option() -> None:
    exc = UsageError("must specify both input (if=) and output (of=) files")
    assert exc.option is None
    assert exc.naming("--anything") == str(exc)
