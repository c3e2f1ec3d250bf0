"""Mount a pushed directory and check listing, attributes and bytes."""

import errno
import os
import stat

import pytest

from conftest import mounted, needs_fuse, run_shardfs

pytestmark = needs_fuse


@pytest.fixture
def pushed_minilm(local_store, minilm_dir):
    result = run_shardfs("push", "--store", local_store, minilm_dir, "org/minilm")
    assert result.returncode == 0, result.stderr
    return local_store


def test_directory_push_lists_every_file(pushed_minilm, minilm_dir, tmp_path):
    with mounted(pushed_minilm, str(tmp_path / "mnt")) as mount:
        model = os.path.join(mount.path, "org", "minilm")
        seen = set()
        for directory, _, files in os.walk(model):
            for name in files:
                seen.add(os.path.relpath(os.path.join(directory, name), model))
        expected = set()
        for directory, _, files in os.walk(minilm_dir):
            for name in files:
                expected.add(os.path.relpath(os.path.join(directory, name), minilm_dir))
        assert seen == expected


def test_stat_matches_source(pushed_minilm, minilm_dir, tmp_path):
    with mounted(pushed_minilm, str(tmp_path / "mnt")) as mount:
        source = os.stat(os.path.join(minilm_dir, "model.safetensors"))
        mounted_stat = os.stat(os.path.join(mount.path, "org/minilm/model.safetensors"))
        assert mounted_stat.st_size == source.st_size
        assert stat.S_IMODE(mounted_stat.st_mode) == stat.S_IMODE(source.st_mode)
        assert mounted_stat.st_mtime_ns == source.st_mtime_ns
        assert mounted_stat.st_blocks * 512 >= mounted_stat.st_size
        assert stat.S_ISDIR(os.stat(os.path.join(mount.path, "org")).st_mode)


def test_write_calls_fail_with_erofs(pushed_minilm, tmp_path):
    with mounted(pushed_minilm, str(tmp_path / "mnt")) as mount:
        model = os.path.join(mount.path, "org/minilm")
        with pytest.raises(OSError) as info:
            os.mkdir(os.path.join(model, "new"))
        assert info.value.errno == errno.EROFS
