"""vmdk: VMware's sparse, streamOptimized, COWD and descriptor-based disks
(docs/formats.md#vmdk): ``layout`` parses and builds the structures, ``decode`` reads
an image, ``encode`` plans an output."""
