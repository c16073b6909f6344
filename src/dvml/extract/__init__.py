"""Stage one: images (or a generator) -> HDF5 feature cache."""
