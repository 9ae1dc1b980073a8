"""aiodd's benchmark suite: ``python bench/run.py --help``."""
