"""Parts of scripts/reliability.py: servers and mounts, readers, the runs and the report."""
