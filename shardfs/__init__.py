"""shardfs: serve model files from a chunk store as a read-only filesystem.

A read travels down these layers; each module imports only the ones below it::

    mount.fsops          kernel requests -> plain calls, errors -> errno
    mount.tree           inodes and directories built from manifests
    layout               byte range -> chunk slices
    mount.chunk_source   memory LRU, single-flight fetch, decode
    stores               local directory or S3: opaque bytes by key
    codec                verify xxh3-128, zstd, transforms (pure functions)

The write side (``publish``) cuts files into chunks with the same codec and
writes them through the same stores.
"""

__version__ = "0.1.0"
