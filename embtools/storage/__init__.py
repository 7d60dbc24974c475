"""Storage layer: data file format, schema, manifest and commits, snapshots."""
