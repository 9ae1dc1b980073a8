"""vdi: VirtualBox Disk Image, dynamic and static (docs/formats.md#vdi): ``layout``
parses and builds the structures, ``decode`` reads an image, ``encode`` plans an
output."""
