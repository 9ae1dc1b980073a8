"""QED, input only (docs/formats.md#qed): ``layout`` parses the header and the table
entries, ``decode`` reads an image."""
