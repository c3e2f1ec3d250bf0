"""The read side: inode tree, chunk source, FUSE operations and the daemon."""
