"""The package on disk (device side): the typed manifest, atomic writes and checksums, and inspect."""
