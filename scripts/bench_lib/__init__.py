"""Parts of the load benchmark in scripts/bench.py."""
