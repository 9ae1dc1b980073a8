"""The ``aiodd`` command's entry point: start the guest reader, then load the CLI.

The guest's interpreter and imports take longer than the host's own start-up, and the
host waits for them before it can open the input (docs/performance.md, "Start-up").
Starting the guest here, before :mod:`aiodd.cli` and what it imports, moves that wait
off a short copy's path.  The command line is not parsed yet, so this looks only for
what certainly needs no guest (``--isolation=inline``, help, the version); anything
else starts one, and :func:`aiodd.cli.main` stops it if the parsed command line does
not take it (a usage error, a signal).
"""

from __future__ import annotations

import sys

# typing.TYPE_CHECKING without typing, nor collections.abc, before the guest is started
# (aiodd/__init__.py says why).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import NoReturn


def needs_no_guest(args: Sequence[str]) -> bool:
    """Whether ``args`` certainly run without a guest (a wrong ``False`` costs a spare
    process that the CLI stops; a wrong ``True`` only the early start)."""
    if any(arg == "-h" or arg.startswith(("--h", "--vers")) for arg in _options(args)):
        return True
    return isolation_named(args) == "inline"


def isolation_named(args: Sequence[str]) -> str:
    """The ``--isolation`` that ``args`` name, as far as can be told before parsing them
    (``auto`` when none): what the guest started now prepares for."""
    named = "auto"
    for i, arg in enumerate(_options(args)):
        # getopt takes any unambiguous prefix of --isolation, with = or a separate value.
        name, eq, value = arg.partition("=")
        if len(name) >= 3 and "--isolation".startswith(name):
            named = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    return named


def input_format_named(args: Sequence[str]) -> str:
    """The input format that ``args`` name with ``-f`` (``""`` when none), as far as can
    be told before parsing them: what the guest started now prepares for."""
    named = ""
    options = _options(args)
    i = 0
    while i < len(options):
        arg = options[i]
        i += 1
        if not arg.startswith("-") or arg.startswith("--"):
            continue
        # getopt's short options: flags run together, and one taking a value ends the
        # run, the value being the rest of the word or the next one (-pf raw, -fraw).
        for j, letter in enumerate(arg[1:], start=2):
            if letter in _SHORT_WITH_VALUE:
                if j < len(arg):
                    value = arg[j:]
                else:
                    value = options[i] if i < len(options) else ""
                    i += 1  # the next word is the value, not an option
                if letter == "f":
                    named = value
                break
    return named


_SHORT_WITH_VALUE = "fOt"  # the short options that take a value (aiodd.cli)


def _options(args: Sequence[str]) -> Sequence[str]:
    return args[: args.index("--")] if "--" in args else args


def run() -> NoReturn:
    args = sys.argv[1:]
    if not needs_no_guest(args):
        from aiodd import _timing
        from aiodd.guest.spawn import prestart

        prestart(isolation_named(args), input_format_named(args))
        _timing.mark("guest spawned")
    from aiodd.cli import run as run_cli

    run_cli()
