"""The pipeline stages: guest reader → block windower → (digest, for ``--checksum``) →
format encoder → file sink.

A stage imports what flows (:mod:`aiodd.buffers`, :mod:`aiodd.progress`) and the
formats' types, never another stage or :mod:`aiodd.pipeline`: see
docs/architecture.md ("The flow").
"""
