"""Data: the embedded "shapes" dataset (shapes.py, shards.py), raw image sources (raw.py,
images.py), aspect buckets, webdataset tars (tars.py, tar_headers.py, tar_reads.py: the one
reader; shard_writer.py: the one writer), token shards and the training stream with its
prefetch worker."""
