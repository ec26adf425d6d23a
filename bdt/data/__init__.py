"""Data: the embedded "shapes" dataset (shapes.py, shards.py), raw image sources (raw.py,
images.py), aspect buckets, webdataset tars (tars.py: the one reader and shard writer), token
shards and the training stream with its prefetch worker."""
