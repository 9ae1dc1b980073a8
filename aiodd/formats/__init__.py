"""Disk image formats: sans-IO decoders (input) and encoders (output plans)."""
