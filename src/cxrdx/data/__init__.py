"""The ChestX-ray14 data layer: metadata, splits, download, image decoding, the cache, datasets, phantoms."""
