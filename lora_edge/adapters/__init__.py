"""Adapters on both sides (numpy only): reading PEFT directories, laying an adapter out as a package's graph inputs,
storing it as the package stores adapters, blending adapters, and the fingerprint that ties a file to its package."""
