"""``python -m bench``: the same as ``python bench/run.py``."""

from bench.cli import main

raise SystemExit(main())
