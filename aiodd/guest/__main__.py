"""``python -m aiodd.guest FD``: run the guest reader on control socket FD."""

import sys

from aiodd.guest.child import main

main(int(sys.argv[1]))
