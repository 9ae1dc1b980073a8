from aiodd.cli import run

run()
