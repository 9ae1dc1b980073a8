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
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "-h" or arg.startswith(("--h", "--vers")):
            return True
        # getopt takes any unambiguous prefix of --isolation, with = or a separate value.
        name, eq, value = arg.partition("=")
        if len(name) >= 3 and "--isolation".startswith(name):
            if not eq:
                value = args[i + 1] if i + 1 < len(args) else ""
            if value == "inline":
                return True
    return False


def run() -> NoReturn:
    if not needs_no_guest(sys.argv[1:]):
        from aiodd import _timing
        from aiodd.guest.spawn import prestart

        prestart()
        _timing.mark("guest spawned")
    from aiodd.cli import run as run_cli

    run_cli()
