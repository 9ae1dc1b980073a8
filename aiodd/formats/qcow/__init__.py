"""qcow version 1, input only (docs/formats.md#qcow-version-1): ``layout`` parses the
header and the clusters, ``decode`` reads an image."""
