"""qcow2, versions 2 and 3 (docs/formats.md#qcow2): ``layout`` parses and builds the
structures, ``decode`` reads an image, ``encode`` plans an output."""
