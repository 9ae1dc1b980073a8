"""raw: the file is the disk (docs/formats.md#raw)."""
