"""Data: the embedded "shapes" dataset (shapes.py, shards.py), raw image sources, aspect buckets,
token shards and the training stream."""
