"""``shardfs mount`` and ``shardfs unmount``.

Settings come from the config file (``--config``, by default
/etc/shardfs/config.toml if it exists) and from flags, which win; see
`shardfs.config_file`. Without ``--foreground``, mount starts the daemon as
a new session and waits on a pipe: the daemon writes ``ready`` once the
mount responds to a stat, or one line with the reason it failed. So the
command's exit status means mounted.
"""

import argparse
import logging
import os
import select
import shutil
import subprocess
import sys
from typing import Any

from shardfs import config_file, paths
from shardfs.config import MiB, MountConfig, RetryConfig, StoreConfig, default_cache_dir
from shardfs.config_file import SETTINGS, SettingValue
from shardfs.errors import ShardfsError, UsageError
from shardfs.mount.disk_cache import DiskCache
from shardfs.mount.mount_table import SHARDFS_TYPE, mount_at
from shardfs.stores import LocalStore, open_store
from shardfs.stores.placed import PlacedStore

log = logging.getLogger(__name__)

# Time for the daemon to read every manifest and respond to the first stat.
READY_TIMEOUT_S = 120.0
READY = b"ready\n"
USAGE = "%(prog)s [options] [[STORE] MOUNTPOINT]"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "mount",
        help="mount a store as a read-only filesystem",
        usage=USAGE,
        description="Mount a store. STORE and MOUNTPOINT may instead be set as store "
        "and mountpoint in the config file; a single argument is the MOUNTPOINT. "
        "Every option below overrides the config file's key of the same name "
        "(--cache-size sets cache_size, --prefetch sets prefetch.enabled).",
    )
    parser.add_argument(
        "store", nargs="?", metavar="STORE",
        help="store URL: a directory, file:///path or s3://bucket/prefix",
    )
    parser.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT", help="an empty directory")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"TOML file with the mount's settings (default: {config_file.DEFAULT_CONFIG_PATH} "
        "if it exists)",
    )
    parser.add_argument(
        "--foreground", action="store_true", help="serve in this process until unmounted"
    )
    _add_setting_flags(parser)
    # The write end of the readiness pipe, set only by a parent mount command.
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(run=run_mount)

    unmount = subparsers.add_parser("unmount", help="unmount a shardfs mount")
    unmount.add_argument("mountpoint", metavar="MOUNTPOINT")
    unmount.set_defaults(run=run_unmount)


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; each defaults to None, meaning not given."""
    store = parser.add_argument_group("store")
    store.add_argument(
        "--store", dest="stores", action="append", metavar="URL",
        help="the store, in place of STORE; repeat it once per member for a store "
        "placed over several, each value "
        "URL[,endpoint=http://HOST:PORT][,weight=N][,id=NAME]",
    )
    store.add_argument(
        "--replicas", dest="replicas", metavar="N",
        help="copies of each chunk when --store is repeated; a single store keeps "
        "one (default: 2)",
    )
    store.add_argument(
        "--endpoint-url", dest="endpoint_url", metavar="URL",
        help="S3-compatible server to use instead of AWS (default: boto3's own, "
        "which reads AWS_ENDPOINT_URL)",
    )
    store.add_argument(
        "--max-connections", dest="max_connections", metavar="N",
        help="concurrent store requests of the whole mount; a request still running "
        "when its read's deadline passes gives its slot back, and up to N such "
        f"requests may run on top (default: {StoreConfig.max_connections})",
    )
    store.add_argument(
        "--read-timeout", dest="read_timeout", metavar="SECONDS",
        help="a read fails with EIO once its data has not arrived for this long, "
        f"retries included (default: {RetryConfig.deadline_s:.0f})",
    )
    store.add_argument(
        "--refresh-interval", dest="refresh_interval", metavar="SECONDS",
        help="how often to re-read the model listing; 0 reads it only at start "
        f"(default: {MountConfig.refresh_interval_s:.0f})",
    )

    cache = parser.add_argument_group("cache")
    cache.add_argument(
        "--cache-dir", dest="cache_dir", metavar="DIR",
        help="SSD cache, daemon log and statistics (default: $CACHE_DIRECTORY under "
        f"systemd, else {default_cache_dir()})",
    )
    cache.add_argument(
        "--cache-size", dest="cache_size", metavar="SIZE",
        help="SSD cache cap: bytes such as 50G, or a share of the cache directory's "
        "disk such as 20%%; 0 keeps no chunks on disk and deletes those cached "
        f"before (default: {MountConfig.cache_share * 100:.0f}%%)",
    )
    cache.add_argument(
        "--memory-limit", dest="memory_limit", metavar="SIZE",
        help="decoded chunks kept in memory, such as 512M (default: "
        f"{MountConfig.memory_limit // MiB}MiB)",
    )

    daemon = parser.add_argument_group("daemon")
    daemon.add_argument(
        "--allow-other", dest="allow_other", action=argparse.BooleanOptionalAction,
        help="let users other than the one mounting read the files (needs "
        "user_allow_other in /etc/fuse.conf unless run as root; default: off)",
    )
    daemon.add_argument(
        "--log-level", dest=SETTINGS["log_level"].dest, metavar="LEVEL",
        help="messages the daemon logs: DEBUG, INFO, WARNING or ERROR (default: "
        "the global --log-level)",
    )
    daemon.add_argument(
        "--metrics-address", dest="metrics_address", metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, such as "
        "127.0.0.1:9464; off turns them off (default: off)",
    )

    tuning = parser.add_argument_group("tuning")
    tuning.add_argument(
        "--prefetch", dest="prefetch_enabled", action=argparse.BooleanOptionalAction,
        help="fetch chunks ahead of sequential readers (default: on)",
    )
    tuning.add_argument(
        "--read-ahead-kb", dest="read_ahead_kb", metavar="KB",
        help="kernel read-ahead of the mount in KiB; 0 keeps the kernel default "
        f"(default: {MountConfig.read_ahead_kb})",
    )
    tuning.add_argument(
        "--max-background", dest="max_background", metavar="N",
        help="background requests the kernel queues to the mount; 0 keeps the "
        f"kernel default of 12 (default: {MountConfig.max_background})",
    )



def given_on_command_line(args) -> dict[str, SettingValue]:
    """Return the settings that *args* gives, keyed as in the config file."""
    store, mountpoint = args.store, args.mountpoint
    if mountpoint is None and store is not None:
        store, mountpoint = None, store
    overrides = {}
    if store is not None:
        overrides["store"] = SettingValue(store, f"STORE {store!r}", from_text=True)
    if mountpoint is not None:
        label = f"MOUNTPOINT {mountpoint!r}"
        overrides["mountpoint"] = SettingValue(mountpoint, label, from_text=True)
    for setting in SETTINGS.values():
        value = getattr(args, setting.dest, None) if setting.flag else None
        if value is not None:
            overrides[setting.key] = SettingValue.from_flag(_flag_form(setting.flag, value), value)
    return overrides


def _flag_form(flag: str, value: Any) -> str:
    """Return the flag as written for *value*: ``--no-prefetch`` for False."""
    return f"--no-{flag[2:]}" if value is False else flag


def run_mount(args) -> int:
    overrides = given_on_command_line(args)
    return mount(args.config, overrides, foreground=args.foreground, ready_fd=args.ready_fd)


def mount(
    config_path: str | None,
    overrides: dict[str, SettingValue],
    *,
    foreground: bool,
    ready_fd: int | None = None,
) -> int:
    """Mount with the settings of *config_path* overridden by *overrides*.

    In the foreground this serves until unmounted; otherwise it returns
    once a background daemon reports the mount ready.
    """
    resolved = resolve_settings(config_path, overrides)
    if "log_level" in resolved:
        logging.getLogger().setLevel(resolved["log_level"])
    store = store_config(config_path, overrides, resolved)
    config = config_file.mount_config(resolved)
    _check_cache_dir(config, open_store(store))
    if foreground:
        return _serve_foreground(store, config, ready_fd)
    return _start_daemon(config, _forwarded_arguments(config_path, overrides, resolved))


def resolve_settings(
    config_path: str | None, overrides: dict[str, SettingValue]
) -> dict[str, Any]:
    """Return the mount's settings from *config_path* and *overrides*, checked.

    Raises `UsageError` for an invalid value or a missing store or mountpoint.
    """
    file_values = config_file.read_config_file(config_path)
    resolved = config_file.resolve(file_values, overrides)
    if "stores" in resolved and "store" in resolved:
        raise UsageError(_store_given_twice(_config_path(config_path), overrides))
    for key, argument in (("store", "STORE"), ("mountpoint", "MOUNTPOINT")):
        if key == "store" and "stores" in resolved:
            continue
        if key not in resolved:
            where = config_path or config_file.DEFAULT_CONFIG_PATH
            raise UsageError(f"missing {argument}: give it as an argument or set {key} in {where}")
    return resolved


def _config_path(config_path: str | None) -> str:
    """Return the config file's path as messages name it."""
    return os.path.abspath(config_path) if config_path else config_file.DEFAULT_CONFIG_PATH


def _store_given_twice(path: str, overrides: dict[str, SettingValue]) -> str:
    """Return the message for a store given both as ``store`` and as ``stores``."""
    if "store" not in overrides and "stores" not in overrides:
        return f"config file {path} sets both store and stores; keep one of them"
    single = f"STORE {overrides['store'].value!r}" if "store" in overrides else f"store in {path}"
    members = "--store" if "stores" in overrides else f"stores in {path}"
    return f"store given twice, as {single} and as {members}; give one of them"


def store_config(
    config_path: str | None, overrides: dict[str, SettingValue], resolved: dict[str, Any]
):
    """Return the store config of the resolved settings.

    Its messages name the config file for each setting read from it.
    """
    path = _config_path(config_path)
    from_file = {key: path for key in resolved if key not in overrides}
    return config_file.store_config(resolved, from_file)


def _serve_foreground(store: StoreConfig, config: MountConfig, ready_fd: int | None) -> int:
    from shardfs.mount.daemon import serve
    from shardfs.mount.notify import use_journal_format

    if not use_journal_format() and ready_fd:
        # A daemon started in the background writes to its log file, where
        # each line needs its time.
        timestamped = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        for handler in logging.getLogger().handlers:
            handler.setFormatter(timestamped)
    ready_pipe = os.fdopen(ready_fd, "wb", buffering=0) if ready_fd else None

    def on_ready() -> None:
        if ready_pipe is not None:
            ready_pipe.write(READY)
            ready_pipe.close()

    try:
        serve(store, config, on_ready)
    except ShardfsError as exc:
        if ready_pipe is not None and not ready_pipe.closed:
            kind = "usage" if isinstance(exc, UsageError) else "failed"
            ready_pipe.write(f"{kind} {exc}\n".encode())
        raise
    return 0


def _forwarded_arguments(
    config_path: str | None, overrides: dict[str, SettingValue], resolved: dict[str, Any]
) -> list[str]:
    """Return the mount arguments that make a daemon resolve the same settings.

    The daemon reads the same config file itself. Paths are passed
    absolute, because it runs in the root directory.
    """
    arguments = []
    if config_path is not None:
        arguments += ["--config", os.path.abspath(config_path)]
    for key, item in overrides.items():
        setting = SETTINGS[key]
        if setting.flag is None:
            continue
        if isinstance(item.value, list):
            for value in resolved[key]:
                arguments += [setting.flag, value]
        elif isinstance(item.value, bool):
            arguments.append(_flag_form(setting.flag, item.value))
        elif key == "cache_dir":
            arguments += [setting.flag, resolved[key]]
        else:
            arguments += [setting.flag, item.value]
    # Both or only the mountpoint: a single argument is the mountpoint.
    arguments += [resolved[key] for key in ("store", "mountpoint") if key in overrides]
    return arguments


def _start_daemon(config: MountConfig, arguments: list[str]) -> int:
    from shardfs.mount.daemon import check_mountpoint

    # Cheap checks first, so the common mistakes fail here and not in the log.
    check_mountpoint(config.mountpoint)
    log_path = _open_log_dir(config.cache_dir)
    # A second daemon on the directory would fail, after logging to the log
    # of the mount that uses it.
    DiskCache(config.cache_dir, 0).check_free()

    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "shardfs", "--log-level", "INFO", "mount", *arguments]
    command += ["--foreground", "--ready-fd", str(write_fd)]
    # The daemon is not the process a service manager started, so it must
    # not send readiness on that process's behalf.
    environment = {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}
    with open(log_path, "ab") as log_file:
        subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            pass_fds=(write_fd,),
            start_new_session=True,
            cwd="/",
            env=environment,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb", buffering=0) as ready_pipe:
        message = _read_until_closed(ready_pipe, READY_TIMEOUT_S)
    if message is None:
        raise UsageError(
            f"the daemon did not report the mount ready within {READY_TIMEOUT_S:.0f} s; "
            f"see {log_path}"
        )
    if message == READY:
        return 0
    kind, _, reason = message.decode(errors="replace").strip().partition(" ")
    if kind == "usage":
        raise UsageError(reason)
    if kind == "failed":
        raise ShardfsError(reason)
    raise ShardfsError(f"the daemon exited before the mount was ready; see {log_path}")


def _read_until_closed(pipe, timeout_s: float) -> bytes | None:
    """Return what *pipe* delivers until its writer closes it, or None on timeout."""
    data = b""
    while True:
        readable, _, _ = select.select([pipe], [], [], timeout_s)
        if not readable:
            return None
        block = pipe.read(4096)
        if not block:
            return data
        data += block


def _check_cache_dir(config: MountConfig, store) -> None:
    """Raise `UsageError` unless the cache directory, the mountpoint and the
    local stores are apart from each other and from other caches and stores.

    The cache deletes files it does not know at start, so sharing a
    directory with a store would delete stored chunks, and a mount inside
    a store would list itself.
    """
    cache_dir = config.cache_dir
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise UsageError(f"cache directory {cache_dir!r} exists and is not a directory")
    own = "give the cache a directory of its own"
    if paths.is_within(cache_dir, config.mountpoint):
        raise UsageError(
            f"cache directory {cache_dir!r} is inside the mountpoint {config.mountpoint!r}; {own}"
        )
    members = store.members if isinstance(store, PlacedStore) else []
    for local in [member.store for member in members] or [store]:
        if not isinstance(local, LocalStore):
            continue
        if paths.overlap(cache_dir, local.root):
            raise UsageError(f"cache directory {cache_dir!r} overlaps the store {local.root!r}; {own}")
        if paths.overlap(config.mountpoint, local.root):
            raise UsageError(
                f"mountpoint {config.mountpoint!r} overlaps the store {local.root!r}; "
                "mount outside the store"
            )
    if _is_store_layout(cache_dir):
        raise UsageError(f"cache directory {cache_dir!r} is a shardfs store; {own}")
    outer = _enclosing_cache_or_store(cache_dir)
    if outer is not None:
        raise UsageError(
            f"cache directory {cache_dir!r} is inside {outer!r}, which is a shardfs "
            f"cache or store; {own}"
        )


def _enclosing_cache_or_store(cache_dir: str) -> str | None:
    """Return the nearest directory above *cache_dir* laid out as a mount's
    cache (a lock file and chunks/) or as a store (models/ and chunks/), if any."""
    current = os.path.realpath(cache_dir)
    while True:
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent
        is_cache = os.path.isfile(os.path.join(current, "lock")) and os.path.isdir(
            os.path.join(current, "chunks")
        )
        if is_cache or _is_store_layout(current):
            return current


def _is_store_layout(directory: str) -> bool:
    return all(os.path.isdir(os.path.join(directory, name)) for name in ("models", "chunks"))


def _open_log_dir(cache_dir: str) -> str:
    """Create the cache directory and return the path of a writable daemon log in it."""
    try:
        os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create cache directory {cache_dir!r}: {exc.strerror}") from None
    log_path = os.path.join(cache_dir, "daemon.log")
    try:
        with open(log_path, "ab"):
            pass
    except OSError as exc:
        raise UsageError(
            f"cannot write the daemon log {log_path!r}: {exc.strerror}; "
            "choose a writable --cache-dir"
        ) from None
    return log_path


def run_unmount(args) -> int:
    mountpoint = os.path.abspath(args.mountpoint)
    # The mount table, not os.path.ismount, because a mount whose daemon
    # was killed fails every stat but can still be unmounted.
    entry = mount_at(mountpoint)
    if entry is None:
        raise UsageError(f"{mountpoint!r} is not mounted")
    if entry.fstype != SHARDFS_TYPE:
        raise UsageError(f"{mountpoint!r} is a {entry.fstype} mount, not a shardfs mount")
    fusermount = shutil.which("fusermount3") or shutil.which("fusermount")
    if fusermount is None:
        raise UsageError("fusermount3 not found; install the fuse3 package")
    # fusermount3 prints strerror, which is only English text in the C locale.
    environment = {**os.environ, "LC_ALL": "C"}
    result = subprocess.run(
        [fusermount, "-u", mountpoint], capture_output=True, text=True, check=False,
        env=environment,
    )
    if result.returncode == 0:
        return 0
    detail = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    if "Device or resource busy" in detail:
        lazy = "umount -l" if os.geteuid() == 0 else "fusermount3 -u -z"
        raise UsageError(
            f"unmounting {mountpoint!r} failed: the mount is busy, because files on it "
            f"are open or mapped; close them, or run '{lazy} {mountpoint}' to detach it "
            "now and stop the daemon once they are closed"
        )
    raise UsageError(f"unmounting {mountpoint!r} failed: {detail}")
