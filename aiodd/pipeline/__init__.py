"""The streaming pipeline: buffer pool, progress accounting and the task-group wiring."""
