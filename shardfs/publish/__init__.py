"""The write side: cut files into chunks, upload them, write manifests."""
