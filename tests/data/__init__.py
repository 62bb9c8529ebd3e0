"""Tests of vision_mamba.data: transforms, loaders, bad files, the data check (and the awkward-file fixtures)."""
