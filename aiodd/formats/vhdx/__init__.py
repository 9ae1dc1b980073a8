"""vhdx: Hyper-V's VHDX (docs/formats.md#vhdx): ``layout`` parses and builds the
structures, ``decode`` reads an image, ``encode`` plans an output."""
