"""vpc: Microsoft VHD, fixed, dynamic and differencing (docs/formats.md#vpc-vhd):
``layout`` parses and builds the structures, ``decode`` reads an image, ``encode``
plans an output."""
