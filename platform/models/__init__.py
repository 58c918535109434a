"""The networks: fliqs' own models (`registry`: by name, then timm's) and the FLIQNAS supernet (`supernet`: elastic
layers, a per-block architecture, extraction of a standalone network)."""
