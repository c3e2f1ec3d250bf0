"""The mount's config file and its precedence: defaults < file < flags."""

import os
import re
import subprocess
import textwrap

import pytest

from conftest import TINY_MODEL_FILE, TINY_MODEL_SIZE, needs_fuse, run_shardfs
from shardfs import cli, config_file
from shardfs.commands import mount_cmd
from shardfs.config import MiB, MountConfig, PrefetchConfig, RetryConfig, StoreConfig
from shardfs.errors import UsageError
from shardfs.stores.placed import PlacedStoreConfig

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "config.toml")
NOBODY = 65534


def write_config(tmp_path, text: str, name: str = "config.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return str(path)


def command_line(*argv: str) -> dict:
    """Return the settings that ``shardfs mount ARGV`` gives on its command line."""
    args = cli.build_parser().parse_args(["mount", *argv])
    return mount_cmd.given_on_command_line(args)


def resolve(tmp_path, text: str | None, *argv: str) -> dict:
    path = write_config(tmp_path, text) if text is not None else None
    return mount_cmd.resolve_settings(path, command_line(*argv))


def configs(tmp_path, text: str | None, *argv: str) -> tuple[StoreConfig, MountConfig]:
    resolved = resolve(tmp_path, text, *argv)
    return config_file.store_config(resolved), config_file.mount_config(resolved)


FULL_FILE = """\
    store = "s3://bucket/prefix"
    mountpoint = "/mnt/models"
    endpoint_url = "http://127.0.0.1:9000"
    max_connections = 32
    read_timeout = "2m"
    refresh_interval = 0
    cache_dir = "/srv/cache"
    cache_size = "50G"
    memory_limit = "1GiB"
    decode_workers = 3
    allow_other = true
    log_level = "debug"
    metrics_address = "127.0.0.1:9464"
    read_ahead_kb = 256
    max_background = 128

    [prefetch]
    enabled = false
    initial_chunks = 4
    max_chunks = 8
    crossing_margin = "16MiB"
    max_streams = 4
"""


def test_file_sets_every_field(tmp_path):
    store, mount = configs(tmp_path, FULL_FILE)
    assert store == StoreConfig(
        url="s3://bucket/prefix", endpoint_url="http://127.0.0.1:9000", max_connections=32
    )
    assert mount.mountpoint == "/mnt/models"
    assert mount.cache_dir == "/srv/cache"
    assert (mount.cache_bytes, mount.cache_share) == (50 * 1024**3, 0.0)
    assert mount.memory_limit == 1024 * MiB
    assert mount.decode_workers == 3
    assert mount.allow_other is True
    assert mount.metrics_address == ("127.0.0.1", 9464)
    assert mount.read_ahead_kb == 256
    assert mount.max_background == 128
    assert mount.refresh_interval_s == 0.0
    assert mount.retry == RetryConfig(deadline_s=120.0)
    assert mount.prefetch == PrefetchConfig(
        enabled=False, initial_chunks=4, max_chunks=8, crossing_margin=16 * MiB, max_streams=4
    )
    assert resolve(tmp_path, FULL_FILE)["log_level"] == "DEBUG"


def test_nothing_given_keeps_dataclass_defaults(tmp_path):
    store, mount = configs(tmp_path, None, "/srv/store", "/mnt/models")
    assert store == StoreConfig(url="/srv/store")
    default = MountConfig(mountpoint="/mnt/models", cache_dir=mount.cache_dir)
    assert mount == default


def test_flags_override_file(tmp_path):
    argv = [
        "--endpoint-url", "https://s3.example.test",
        "--max-connections", "4",
        "--read-timeout", "5",
        "--refresh-interval", "0.5",
        "--cache-dir", "/flag/cache",
        "--cache-size", "10%",
        "--memory-limit", "64M",
        "--no-allow-other",
        "--log-level", "warning",
        "--metrics-address", "off",
        "--read-ahead-kb", "0",
        "--max-background", "0",
        "--prefetch",
        "s3://other/root",
        "/mnt/flag",
    ]

    store, mount = configs(tmp_path, FULL_FILE, *argv)
    assert store == StoreConfig(
        url="s3://other/root", endpoint_url="https://s3.example.test", max_connections=4
    )
    assert mount.mountpoint == "/mnt/flag"
    assert mount.cache_dir == "/flag/cache"
    assert (mount.cache_bytes, mount.cache_share) == (None, 0.1)
    assert mount.memory_limit == 64 * MiB
    assert mount.allow_other is False
    assert mount.metrics_address is None
    assert mount.read_ahead_kb == 0
    assert mount.max_background == 0
    assert mount.refresh_interval_s == 0.5
    assert mount.retry.deadline_s == 5.0
    assert mount.prefetch.enabled is True

    # Keys without a flag keep the file's value.
    assert mount.decode_workers == 3
    assert mount.prefetch.max_chunks == 8
    assert resolve(tmp_path, FULL_FILE, *argv)["log_level"] == "WARNING"


def test_flag_absent_is_not_a_default(tmp_path):
    # A flag left out must not reset the file's value to the flag's default.
    _, mount = configs(tmp_path, "memory_limit = '512MiB'\nallow_other = true\n", "/s", "/m")
    assert mount.memory_limit == 512 * MiB
    assert mount.allow_other is True


def test_single_argument_is_mountpoint(tmp_path):
    store, mount = configs(tmp_path, 'store = "/srv/store"\n', "/mnt/one")
    assert store.url == "/srv/store"
    assert mount.mountpoint == "/mnt/one"


def test_relative_flag_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store, mount = configs(tmp_path, None, "--cache-dir", "cache", "store", "mnt")
    assert store.url == str(tmp_path / "store")
    assert mount.mountpoint == str(tmp_path / "mnt")
    assert mount.cache_dir == str(tmp_path / "cache")


def test_cache_directory_from_systemd(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHE_DIRECTORY", "/var/cache/shardfs/models")
    _, mount = configs(tmp_path, None, "/s", "/m")
    assert mount.cache_dir == "/var/cache/shardfs/models"
    _, mount = configs(tmp_path, 'cache_dir = "/srv/cache"\n', "/s", "/m")
    assert mount.cache_dir == "/srv/cache"


def test_missing_default_file_is_no_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(config_file, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.toml"))
    assert config_file.read_config_file(None) == {}


def test_default_file_is_read(tmp_path, monkeypatch):
    path = write_config(tmp_path, 'store = "/srv/default-store"\n')
    monkeypatch.setattr(config_file, "DEFAULT_CONFIG_PATH", path)
    store, mount = configs(tmp_path, None, "/mnt/models")
    assert store.url == "/srv/default-store"
    assert mount.mountpoint == "/mnt/models"


def test_missing_named_file_rejected(tmp_path):
    path = str(tmp_path / "absent.toml")
    with pytest.raises(UsageError, match=f"config file {re.escape(path)} not found"):
        config_file.read_config_file(path)


def test_directory_as_file_rejected(tmp_path):
    with pytest.raises(UsageError, match="cannot read config file .*: Is a directory"):
        config_file.read_config_file(str(tmp_path))


def test_fifo_as_file_rejected(tmp_path):
    path = tmp_path / "config.toml"
    os.mkfifo(path)
    with pytest.raises(UsageError, match="config file .* is not a regular file"):
        config_file.read_config_file(str(path))


def test_invalid_toml_rejected(tmp_path):
    path = write_config(tmp_path, "store = \n")
    expected = f"invalid TOML in config file {re.escape(path)}: .*line 1"
    with pytest.raises(UsageError, match=expected):
        config_file.read_config_file(path)


def test_binary_file_rejected(tmp_path):
    path = tmp_path / "config.toml"
    path.write_bytes(b"store = '\xff'\n")
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        config_file.read_config_file(str(path))


def test_writable_file_rejected(tmp_path):
    path = write_config(tmp_path, 'store = "/s"\n')
    os.chmod(path, 0o666)
    with pytest.raises(UsageError, match=r"writable by other users \(mode 0666\); run chmod go-w"):
        config_file.read_config_file(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_file_of_other_user_rejected(tmp_path):
    path = write_config(tmp_path, 'store = "/s"\n')
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"owned by uid {NOBODY}"):
        config_file.read_config_file(path)


UNKNOWN_KEYS = {
    "misspelled": ("cache_sise = '1G'\n", "unknown setting 'cache_sise'", "'cache_size'"),
    "in-table": ("[prefetch]\nmax_chunk = 3\n", "unknown setting 'prefetch.max_chunk'",
                 "'prefetch.max_chunks'"),
    "unknown-table": ("[cache]\nsize = 3\n", "unknown setting 'cache'", ""),
    "flag-name": ("cache-size = '1G'\n", "unknown setting 'cache-size'", "'cache_size'"),
}


@pytest.mark.parametrize("text, mention, suggestion", UNKNOWN_KEYS.values(), ids=UNKNOWN_KEYS)
def test_unknown_key_rejected(tmp_path, text, mention, suggestion):
    path = write_config(tmp_path, text)
    with pytest.raises(UsageError) as info:
        config_file.read_config_file(path)
    assert mention in str(info.value)
    assert path in str(info.value)
    assert suggestion in str(info.value)


# Each case: the file's text and the start of the message, which names the
# key and the value as written.
BAD_FILE_VALUES = {
    "store-relative": ('store = "models"', 'store = "models"'),
    "store-empty": ('store = ""', 'store = ""'),
    "store-number": ("store = 3", "store = 3"),
    "mountpoint-relative": ('mountpoint = "mnt"', 'mountpoint = "mnt"'),
    "endpoint-no-scheme": ('endpoint_url = "127.0.0.1:9000"', 'endpoint_url = "127.0.0.1:9000"'),
    "endpoint-ftp": ('endpoint_url = "ftp://host"', 'endpoint_url = "ftp://host"'),
    "cache-dir-relative": ('cache_dir = "cache"', 'cache_dir = "cache"'),
    "cache-size-word": ('cache_size = "big"', 'cache_size = "big"'),
    "cache-size-share": ('cache_size = "120%"', 'cache_size = "120%"'),
    "cache-size-negative": ("cache_size = -1", "cache_size = -1"),
    "cache-size-float": ("cache_size = 1.5", "cache_size = 1.5"),
    "memory-small": ('memory_limit = "1M"', 'memory_limit = "1M"'),
    "memory-bool": ("memory_limit = true", "memory_limit = true"),
    "connections-zero": ("max_connections = 0", "max_connections = 0"),
    "connections-string": ('max_connections = "16"', 'max_connections = "16"'),
    "connections-float": ("max_connections = 1.5", "max_connections = 1.5"),
    "connections-bool": ("max_connections = true", "max_connections = true"),
    "workers-zero": ("decode_workers = 0", "decode_workers = 0"),
    "timeout-zero": ("read_timeout = 0", "read_timeout = 0"),
    "timeout-negative": ("read_timeout = -5", "read_timeout = -5"),
    "timeout-infinite": ("read_timeout = inf", "read_timeout = inf"),
    "timeout-unit": ('read_timeout = "5 minutes"', 'read_timeout = "5 minutes"'),
    "refresh-huge": ("refresh_interval = 1e9", "refresh_interval = 1000000000.0"),
    "metrics-no-port": ('metrics_address = "localhost"', 'metrics_address = "localhost"'),
    "metrics-bad-port": ('metrics_address = "::1:70000"', 'metrics_address = "::1:70000"'),
    "allow-other-string": ('allow_other = "yes"', 'allow_other = "yes"'),
    "log-level": ('log_level = "verbose"', 'log_level = "verbose"'),
    "read-ahead-negative": ("read_ahead_kb = -1", "read_ahead_kb = -1"),
    "background-string": ('max_background = "64"', 'max_background = "64"'),
    "background-huge": ("max_background = 99999999999", "max_background = 99999999999"),
    "read-ahead-huge": ("read_ahead_kb = 1048577", "read_ahead_kb = 1048577"),
    "store-nul": ('store = "/srv/a\\u0000b"', 'store = "/srv/a\\u0000b"'),
    "cache-dir-url": ('cache_dir = "file:///var/cache/x"', 'cache_dir = "file:///var/cache/x"'),
    "prefetch-not-table": ("prefetch = false", "prefetch = false"),
    "prefetch-enabled": ('[prefetch]\nenabled = "no"', 'prefetch.enabled = "no"'),
    "prefetch-chunks": ("[prefetch]\nmax_chunks = 0", "prefetch.max_chunks = 0"),
    "prefetch-margin": ('[prefetch]\ncrossing_margin = "x"', 'prefetch.crossing_margin = "x"'),
    "stores-empty": ("stores = []", "stores = [...]"),
    "stores-number": ("stores = [1, 2]", "stores = [...]"),
}


@pytest.mark.parametrize("text, mention", BAD_FILE_VALUES.values(), ids=BAD_FILE_VALUES)
def test_bad_file_value_rejected(tmp_path, text, mention):
    path = write_config(tmp_path, text + "\n")
    with pytest.raises(UsageError) as info:
        mount_cmd.resolve_settings(path, command_line())
    message = str(info.value)
    assert message.startswith(f"invalid {mention} in {path}: expected"), message


BAD_FLAG_VALUES = {
    "cache-size": (["--cache-size", "big"], "--cache-size 'big'"),
    "memory-limit": (["--memory-limit", "8M"], "--memory-limit '8M'"),
    "connections-negative": (["--max-connections", "-1"], "--max-connections '-1'"),
    "connections-word": (["--max-connections", "many"], "--max-connections 'many'"),
    "read-timeout": (["--read-timeout", "0"], "--read-timeout '0'"),
    "refresh-interval": (["--refresh-interval", "soon"], "--refresh-interval 'soon'"),
    "metrics-address": (["--metrics-address", "nowhere"], "--metrics-address 'nowhere'"),
    "log-level": (["--log-level", "loud"], "--log-level 'loud'"),
    "read-ahead": (["--read-ahead-kb", "1.5"], "--read-ahead-kb '1.5'"),
    "endpoint": (["--endpoint-url", "localhost:9000"], "--endpoint-url 'localhost:9000'"),
    "store-empty": (["--store", "/srv/a", "--store", " "], "--store '/srv/a' --store ' '"),
}


@pytest.mark.parametrize("argv, mention", BAD_FLAG_VALUES.values(), ids=BAD_FLAG_VALUES)
def test_bad_flag_value_rejected(argv, mention):
    with pytest.raises(UsageError) as info:
        mount_cmd.resolve_settings(None, command_line(*argv, "/s", "/m"))
    assert str(info.value).startswith(f"invalid {mention}: expected"), str(info.value)


def test_flag_error_wins_over_valid_file(tmp_path):
    with pytest.raises(UsageError, match="invalid --max-background 'x'"):
        resolve(tmp_path, "max_background = 8\n", "--max-background", "x", "/s", "/m")


def test_initial_chunks_above_max_rejected(tmp_path):
    text = "[prefetch]\ninitial_chunks = 20\n"
    with pytest.raises(UsageError, match=r"initial_chunks \(20\) is above max_chunks \(16\)"):
        resolve(tmp_path, text, "/s", "/m")


# The store: STORE, --store once or once per member, or store or stores in the file.


def mount_store(tmp_path, text: str | None, *argv: str):
    """Return the store config of ``shardfs mount ARGV`` with a config file of *text*."""
    path = write_config(tmp_path, text) if text is not None else None
    overrides = command_line(*argv)
    resolved = mount_cmd.resolve_settings(path, overrides)
    return mount_cmd.store_config(path, overrides, resolved)


def test_single_store_flag_is_plain_store(tmp_path):
    store = mount_store(tmp_path, None, "--store", "/srv/a", "/mnt/m")
    assert store == StoreConfig("/srv/a")


def test_single_stores_entry_is_plain_store(tmp_path):
    store = mount_store(tmp_path, 'stores = ["/srv/a"]\n', "/mnt/m")
    assert store == StoreConfig("/srv/a")


def test_store_flags_build_placed_store(tmp_path):
    store = mount_store(tmp_path, None, "--store", "/srv/a", "--store", "/srv/b", "/mnt/m")
    assert isinstance(store, PlacedStoreConfig)
    assert [member.store.url for member in store.members] == ["/srv/a", "/srv/b"]


# Each case: the file's text, the command line, and the message.
BAD_STORES = {
    "replicas-flag-plain-store": (
        None, ["--replicas", "2", "/srv/a", "/mnt/m"],
        "invalid --replicas 2: a single store keeps one copy of each chunk",
    ),
    "replicas-flag-single-store-flag": (
        None, ["--replicas", "2", "--store", "/srv/a", "/mnt/m"],
        "invalid --replicas 2: a single store keeps one copy of each chunk",
    ),
    "replicas-key-plain-store": (
        'store = "/srv/a"\nreplicas = 2\n', ["/mnt/m"],
        "invalid replicas = 2 in CONFIG: a single store keeps one copy of each chunk",
    ),
    "both-keys": (
        'store = "/srv/a"\nstores = ["/srv/b", "/srv/c"]\n', ["/mnt/m"],
        "config file CONFIG sets both store and stores; keep one of them",
    ),
    "store-argument-and-stores-key": (
        'stores = ["/srv/b", "/srv/c"]\n', ["/srv/a", "/mnt/m"],
        "store given twice, as STORE '/srv/a' and as stores in CONFIG; give one of them",
    ),
    "store-key-and-store-flags": (
        'store = "/srv/a"\n', ["--store", "/srv/b", "--store", "/srv/c", "/mnt/m"],
        "store given twice, as store in CONFIG and as --store; give one of them",
    ),
    "store-argument-and-store-flag": (
        None, ["--store", "/srv/b", "/srv/a", "/mnt/m"],
        "store given twice, as STORE '/srv/a' and as --store; give one of them",
    ),
    "stores-key-relative-path": (
        'stores = ["/srv/a", "srv/b"]\n', ["/mnt/m"],
        "invalid stores = [...] in CONFIG: expected an absolute path or a URL, not 'srv/b'",
    ),
    "stores-key-listed-twice": (
        'stores = ["/srv/a", "/srv/a/"]\n', ["/mnt/m"],
        "stores entries '/srv/a' and '/srv/a' in CONFIG are the same store listed twice",
    ),
    "stores-key-weights-zero": (
        'stores = ["/srv/a,weight=0", "/srv/b,weight=0"]\nreplicas = 1\n', ["/mnt/m"],
        "no stores entry in CONFIG has a positive weight",
    ),
    "replicas-key-above-members": (
        'stores = ["/srv/a", "/srv/b"]\nreplicas = 3\n', ["/mnt/m"],
        "invalid replicas = 3 in CONFIG: expected 1 to 2, because there are 2 entries "
        "of stores in CONFIG with a positive weight",
    ),
    "replicas-flag-above-members": (
        'stores = ["/srv/a", "/srv/b"]\n', ["--replicas", "3", "/mnt/m"],
        "invalid --replicas 3: expected 1 to 2",
    ),
}


@pytest.mark.parametrize("text, argv, message", BAD_STORES.values(), ids=BAD_STORES)
def test_bad_store_settings_rejected(tmp_path, text, argv, message):
    with pytest.raises(UsageError) as info:
        mount_store(tmp_path, text, *argv)
    assert str(info.value).startswith(message.replace("CONFIG", str(tmp_path / "config.toml")))


@pytest.mark.parametrize(
    "text, argv, missing",
    [("", ["/m"], "STORE"), ('store = "/s"\n', [], "MOUNTPOINT")],
    ids=["store", "mountpoint"],
)
def test_missing_store_or_mountpoint(tmp_path, text, argv, missing):
    with pytest.raises(UsageError, match=f"missing {missing}: give it as an argument"):
        resolve(tmp_path, text, *argv)


def test_example_config_loads():
    resolved = mount_cmd.resolve_settings(EXAMPLE, {})
    assert resolved == {"store": "s3://models-bucket/shardfs", "mountpoint": "/mnt/models"}


def test_example_shows_every_key(tmp_path):
    """Uncomments every ``# key = value`` line of the example; all must be valid keys."""
    lines = []
    with open(EXAMPLE) as file:
        example = file.read()
    for line in example.splitlines():
        if re.fullmatch(r"# (\[\w+\]|\w+ = .+)", line):
            line = line[2:]
        lines.append(line)
    path = write_config(tmp_path, "\n".join(lines) + "\n")
    file_values = config_file.read_config_file(path)
    assert set(file_values) == set(config_file.SETTINGS)
    resolved = config_file.resolve(file_values, {})
    store = config_file.store_config(resolved)
    mount = config_file.mount_config(resolved)
    assert store.max_connections == StoreConfig.max_connections
    assert mount.prefetch == PrefetchConfig()
    assert mount.retry == RetryConfig()
    assert mount.memory_limit == MountConfig.memory_limit
    assert mount.read_ahead_kb == MountConfig.read_ahead_kb


# Through the command line: one line on stderr, exit status 2, no traceback.


def assert_usage_error(result: subprocess.CompletedProcess, mention: str) -> None:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("shardfs: error: "), lines[0]
    assert mention in lines[0], lines[0]
    assert result.returncode == 2


@pytest.mark.parametrize("mode", [[], ["--foreground"]], ids=["background", "foreground"])
def test_command_rejects_bad_file(tmp_path, mode):
    path = write_config(tmp_path, 'memory_limit = "lots"\n')
    result = run_shardfs("mount", *mode, "--config", path, str(tmp_path), str(tmp_path))
    assert_usage_error(result, f'invalid memory_limit = "lots" in {path}')


def test_command_rejects_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    result = run_shardfs("mount", "--config", path, str(tmp_path), str(tmp_path))
    assert_usage_error(result, f"config file {path} not found")


def test_command_rejects_bad_log_level():
    result = run_shardfs("mount", "--log-level", "loud", "/s", "/m")
    assert_usage_error(result, "invalid --log-level 'loud'")


# Through a real mount: the settings reach the kernel.


def read_ahead_kb(mountpoint: str) -> int:
    device = os.stat(mountpoint).st_dev
    path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
    with open(path) as file:
        return int(file.read())


@needs_fuse
@pytest.mark.skipif(os.geteuid() != 0, reason="setting a mount's read-ahead needs root")
@pytest.mark.parametrize("flags, expected", [([], 256), (["--read-ahead-kb", "512"], 512)],
                         ids=["file", "flag"])
def test_mount_applies_file_and_flags(tiny_store, tmp_path, flags, expected):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    path = write_config(tmp_path, f"""\
        store = "{tiny_store}"
        mountpoint = "{mountpoint}"
        cache_dir = "{tmp_path / 'cache'}"
        read_ahead_kb = 256
    """)
    result = run_shardfs("mount", "--config", path, *flags)
    assert result.returncode == 0, result.stderr
    try:
        assert (mountpoint / TINY_MODEL_FILE).stat().st_size == TINY_MODEL_SIZE
        assert read_ahead_kb(str(mountpoint)) == expected
    finally:
        assert run_shardfs("unmount", str(mountpoint)).returncode == 0
