from aiodd._command import run

run()
