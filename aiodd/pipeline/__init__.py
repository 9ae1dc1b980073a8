"""The wiring that runs the stages: one task group joined by bounded streams.

See docs/architecture.md ("The flow").
"""
