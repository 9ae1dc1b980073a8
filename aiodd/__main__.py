import sys

from aiodd.cli import main

sys.exit(main())
