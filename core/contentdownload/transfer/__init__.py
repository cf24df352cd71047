"""The transfer layer: the HTTP client, URL handling, files and the part store every plugin writes through."""
