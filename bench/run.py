"""Run the benchmark: ``python bench/run.py [--quick] [--only raw,inputs,outputs,isolation]``.

See ``python bench/run.py --help`` and docs/performance.md.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
