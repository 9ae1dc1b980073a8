"""parallels: Parallels (and OpenVZ ploop) expanding images, read only
(docs/formats.md#parallels): ``layout`` parses the header and the BAT, ``decode``
reads an image."""
