"""scripts/demo.py, the README's first command, run against a store in a temporary directory."""

import os
import shlex
import subprocess
import sys

from conftest import needs_fuse
from shardfs.stores.base import list_models
from shardfs.stores.local import LocalStore

DEMO = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "demo.py")


@needs_fuse
def test_demo_prints_store_and_removal(tmp_path):
    store = str(tmp_path / "store")
    result = subprocess.run(
        [sys.executable, DEMO, "--store", store], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = (
        f"pushed both models to the store {store}; "
        "to remove them when no other push to it runs: "
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, result.stdout

    # The printed commands, run as they are, leave the store empty.
    for command in lines[0][len(prefix) :].split(" && "):
        program, *args = shlex.split(command)
        assert program == os.path.join(os.path.dirname(sys.executable), "shardfs"), command
        removed = subprocess.run([program, *args], capture_output=True, text=True, timeout=300)
        assert removed.returncode == 0, removed.stderr
    local = LocalStore(store)
    assert list_models(local) == []
    assert list(local.list("chunks/")) == []
