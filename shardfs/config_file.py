"""The mount's settings: a TOML file, command-line flags, and their resolution.

Every setting of ``shardfs mount`` has a key in the file; most have a flag
too. `resolve` applies the one order of precedence: a value given on the
command line (a flag, or a ``-o`` option of the mount helper) wins over
the file, and the file wins over the defaults of the config dataclasses.
Only a value that was not given counts as absent. Unknown keys and
invalid values are rejected with a `UsageError` that names the key or
flag and the value as written.
"""

import dataclasses
import difflib
import json
import math
import os
import stat
import tomllib
import urllib.parse
from collections.abc import Callable
from typing import Any

from shardfs.config import (
    MiB,
    MountConfig,
    PrefetchConfig,
    RetryConfig,
    StoreConfig,
    default_cache_dir,
    parse_cache_size,
    parse_duration,
    parse_size,
)
from shardfs.errors import UsageError

DEFAULT_CONFIG_PATH = "/etc/shardfs/config.toml"
MIN_MEMORY_LIMIT = 16 * MiB
# Durations above this are typing mistakes (about 11 days), not settings.
MAX_DURATION_S = 1e6
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclasses.dataclass(frozen=True)
class SettingValue:
    """One setting's value as written, with a label that names where it was written."""

    value: Any
    # For messages: ``--cache-size '20x'``, ``option cache_size=20x`` or
    # ``cache_size = "20x" in /etc/shardfs/config.toml``.
    label: str
    # True for text typed on a command line; False for a typed TOML value.
    from_text: bool

    @classmethod
    def from_flag(cls, flag: str, value: Any) -> "SettingValue":
        if isinstance(value, bool):
            label = flag
        elif isinstance(value, list):
            # A repeated flag, labelled as it was typed.
            label = " ".join(f"{flag} {item!r}" for item in value)
        else:
            label = f"{flag} {value!r}"
        return cls(value, label, from_text=not isinstance(value, bool))

    @classmethod
    def from_option(cls, name: str, value: Any) -> "SettingValue":
        label = name if isinstance(value, bool) else f"{name}={value}"
        return cls(value, f"option {label}", from_text=not isinstance(value, bool))

    @classmethod
    def from_file(cls, key: str, value: Any, path: str) -> "SettingValue":
        return cls(value, f"{key} = {_toml_literal(value)} in {path}", from_text=False)


def _toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Every escape json.dumps writes is also a TOML escape, and escapes
        # keep control characters such as NUL or a newline out of a message.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        return "[...]"
    return str(value)


# Value parsers. Each takes a value and whether it is command-line text,
# and returns the typed value or raises ValueError with what was expected.


def _string(value: Any, from_text: bool) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    if "\0" in value:
        raise ValueError("expected a string without NUL characters")
    return value


def _path(value: Any, from_text: bool) -> str:
    text = _string(value, from_text)
    if "://" in text:
        raise ValueError("expected a path, not a URL")
    if from_text:
        return os.path.abspath(text)
    if not os.path.isabs(text):
        raise ValueError("expected an absolute path")
    return os.path.normpath(text)


def _store_url(value: Any, from_text: bool) -> str:
    text = _string(value, from_text)
    if "://" in text:
        return text
    return _path(text, from_text)


def _endpoint_url(value: Any, from_text: bool) -> str:
    text = _string(value, from_text)
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL, such as http://127.0.0.1:9000")
    return text


def _store_values(value: Any, from_text: bool) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(item, str) and item.strip() for item in values):
        raise ValueError(
            "expected one store, or two or more member stores, each "
            "URL[,endpoint=http://HOST:PORT][,weight=N][,id=NAME]"
        )
    # The daemon runs in /, so local member paths from the command line are
    # made absolute here. In a file, a relative path would depend on the
    # directory the mount was started from, so it is an error, as for _path.
    return [_absolute_member(item, from_text) for item in values]


def _absolute_member(value: str, from_text: bool) -> str:
    url, comma, options = value.partition(",")
    if "://" in url:
        return value
    if not from_text and not os.path.isabs(url):
        raise ValueError(f"expected an absolute path or a URL, not {url!r}")
    return os.path.abspath(url) + comma + options


def _boolean(value: Any, from_text: bool) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _count(minimum: int, maximum: int | None = None) -> Callable[[Any, bool], int]:
    def parse(value: Any, from_text: bool) -> int:
        if from_text and isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        too_large = maximum is not None and isinstance(value, int) and value > maximum
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or too_large:
            if maximum is None:
                raise ValueError(f"expected a whole number of at least {minimum}")
            raise ValueError(f"expected a whole number from {minimum} to {maximum}")
        return value

    return parse


def _size(minimum: int) -> Callable[[Any, bool], int]:
    expected = "expected a byte count such as 512M, 64MiB or 1048576"
    if minimum:
        expected += f", of at least {minimum // MiB}MiB"

    def parse(value: Any, from_text: bool) -> int:
        if isinstance(value, str):
            try:
                value = parse_size(value)
            except UsageError:
                raise ValueError(expected) from None
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(expected)
        return value

    return parse


def _cache_size(value: Any, from_text: bool) -> tuple[int | None, float]:
    expected = "expected a byte count such as 50G, or a share of the disk such as 20%"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, 0.0
    if not isinstance(value, str):
        raise ValueError(expected)
    try:
        return parse_cache_size(value)
    except UsageError:
        raise ValueError(expected) from None


def _duration(minimum_exclusive: bool) -> Callable[[Any, bool], float]:
    expected = "expected seconds, or a number with a unit s, m or h, such as 30 or 2m"
    expected += ", above 0" if minimum_exclusive else ", 0 or more"

    def parse(value: Any, from_text: bool) -> float:
        if isinstance(value, str):
            try:
                value = parse_duration(value)
            except UsageError:
                raise ValueError(expected) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(expected)
        seconds = float(value)
        if not math.isfinite(seconds) or not 0 <= seconds < MAX_DURATION_S:
            raise ValueError(expected)
        if minimum_exclusive and seconds == 0:
            raise ValueError(expected)
        return seconds

    return parse


def _log_level(value: Any, from_text: bool) -> str:
    if not isinstance(value, str) or value.upper() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT``, such as ``127.0.0.1:9464`` or ``[::1]:9464``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, such as 127.0.0.1:9464, or off")
    return host.strip("[]"), int(port)


def _metrics_address(value: Any, from_text: bool) -> tuple[str, int] | None:
    text = _string(value, from_text).strip()
    if text == "off":
        return None
    return parse_address(text)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One key of the config file, with its parser and its command-line flag."""

    key: str
    parse: Callable[[Any, bool], Any]
    # The ``shardfs mount`` flag; None for keys set only in the file. A
    # boolean's flag also has a ``--no-`` form.
    flag: str | None = None
    # The argparse attribute of the flag, if not the key with "_" for ".".
    attribute: str | None = None

    @property
    def dest(self) -> str:
        """The attribute that argparse stores the flag's value in."""
        return self.attribute or self.key.replace(".", "_")

    @property
    def is_boolean(self) -> bool:
        return self.parse is _boolean

    @property
    def option_name(self) -> str | None:
        """The name of the matching mount helper option, such as ``cache_size``."""
        return self.flag[2:].replace("-", "_") if self.flag else None


SETTINGS: dict[str, Setting] = {
    setting.key: setting
    for setting in (
        Setting("store", _store_url),
        Setting("stores", _store_values, "--store"),
        Setting("replicas", _count(1), "--replicas"),
        Setting("mountpoint", _path),
        Setting("endpoint_url", _endpoint_url, "--endpoint-url"),
        Setting("cache_dir", _path, "--cache-dir"),
        Setting("cache_size", _cache_size, "--cache-size"),
        Setting("memory_limit", _size(MIN_MEMORY_LIMIT), "--memory-limit"),
        Setting("max_connections", _count(1), "--max-connections"),
        Setting("decode_workers", _count(1)),
        Setting("read_timeout", _duration(minimum_exclusive=True), "--read-timeout"),
        Setting("refresh_interval", _duration(minimum_exclusive=False), "--refresh-interval"),
        Setting("metrics_address", _metrics_address, "--metrics-address"),
        Setting("allow_other", _boolean, "--allow-other"),
        # The global ``shardfs --log-level`` already stores to log_level.
        Setting("log_level", _log_level, "--log-level", "mount_log_level"),
        # 1 GiB of read-ahead, and the 16-bit field of FUSE's init reply.
        Setting("read_ahead_kb", _count(0, 1024 * 1024), "--read-ahead-kb"),
        Setting("max_background", _count(0, 65535), "--max-background"),
        Setting("prefetch.enabled", _boolean, "--prefetch"),
        Setting("prefetch.initial_chunks", _count(1)),
        Setting("prefetch.max_chunks", _count(1)),
        Setting("prefetch.crossing_margin", _size(0)),
        Setting("prefetch.max_streams", _count(1)),
    )
}
TABLES = frozenset(key.partition(".")[0] for key in SETTINGS if "." in key)
# The file's own path, which the mount helper's ``config=`` option also sets.
CONFIG_OPTION = "config"


def read_config_file(path: str | None) -> dict[str, SettingValue]:
    """Read the settings of the TOML file at *path*, checked against `SETTINGS`.

    With *path* None, reads `DEFAULT_CONFIG_PATH` if it exists; a missing
    default file means no settings. Values are parsed later, by `resolve`.
    """
    explicit = path is not None
    path = os.path.abspath(path) if explicit else DEFAULT_CONFIG_PATH
    try:
        # O_NONBLOCK keeps a FIFO in the file's place from blocking the open.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UsageError(f"config file {path} is not a regular file")
            _check_ownership(path, info)
            document = tomllib.load(file)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"config file {path} not found") from None
        return {}
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"invalid TOML in config file {path}: {exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"config file {path} is not UTF-8 text") from None
    return _flatten(document, path)


def _check_ownership(path: str, info: os.stat_result) -> None:
    # The daemon usually runs as root, and the file chooses the mountpoint
    # and the store, so only root or the user mounting may be able to
    # change it (the rule sshd applies to its own files).
    if info.st_uid not in (0, os.geteuid()):
        raise UsageError(
            f"config file {path} is owned by uid {info.st_uid}; it must belong to "
            "root or to the user mounting"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        raise UsageError(
            f"config file {path} is writable by other users (mode {mode:04o}); "
            f"run chmod go-w {path}"
        )


def _flatten(document: dict, path: str) -> dict[str, SettingValue]:
    values = {}
    for key, value in document.items():
        if key in TABLES:
            if not isinstance(value, dict):
                label = SettingValue.from_file(key, value, path).label
                raise UsageError(f"invalid {label}: expected a table")
            for sub_key, sub_value in value.items():
                full_key = f"{key}.{sub_key}"
                _check_known(full_key, path)
                values[full_key] = SettingValue.from_file(full_key, sub_value, path)
            continue
        _check_known(key, path)
        values[key] = SettingValue.from_file(key, value, path)
    return values


def _check_known(key: str, path: str) -> None:
    if key in SETTINGS:
        return
    message = f"unknown setting {key!r} in config file {path}"
    close = difflib.get_close_matches(key, list(SETTINGS), n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    raise UsageError(message)


def resolve(
    file_values: dict[str, SettingValue], command_line: dict[str, SettingValue]
) -> dict[str, Any]:
    """Return every setting that was given, parsed: command line over file.

    Settings given nowhere are left out, so the config dataclasses' own
    defaults apply to them.
    """
    merged = {**file_values, **command_line}
    resolved = {}
    for key, value in merged.items():
        try:
            resolved[key] = SETTINGS[key].parse(value.value, value.from_text)
        except ValueError as exc:
            raise UsageError(f"invalid {value.label}: {exc}") from None
    initial = resolved.get("prefetch.initial_chunks", PrefetchConfig.initial_chunks)
    maximum = resolved.get("prefetch.max_chunks", PrefetchConfig.max_chunks)
    if initial > maximum:
        raise UsageError(
            f"invalid prefetch settings: initial_chunks ({initial}) is above "
            f"max_chunks ({maximum})"
        )
    return resolved


def default_mount_cache_dir() -> str:
    """Return the cache directory of a mount that names none.

    Under systemd that is the unit's ``CacheDirectory=``, which systemd
    passes in ``$CACHE_DIRECTORY``; a list of several is not used.
    """
    from_systemd = os.environ.get("CACHE_DIRECTORY", "")
    if from_systemd and ":" not in from_systemd and os.path.isabs(from_systemd):
        return from_systemd
    return default_cache_dir()


def store_config(resolved: dict[str, Any], from_file: dict[str, str] | None = None):
    """Build the store's config from resolved settings; a store URL or members must be set.

    *from_file* maps the keys whose values came from a config file to that
    file's path, so messages name the key where it was set.
    """
    from_file = from_file or {}
    if "stores" in resolved:
        from shardfs.stores.members import store_from_values

        return store_from_values(
            resolved["stores"],
            resolved.get("replicas"),
            resolved.get("endpoint_url"),
            resolved.get("max_connections", StoreConfig.max_connections),
            members_file=from_file.get("stores"),
            replicas_file=from_file.get("replicas"),
        )
    replicas = resolved.get("replicas", 1)
    if replicas != 1:
        from shardfs.stores.members import SINGLE_STORE_REPLICAS

        path = from_file.get("replicas")
        label = f"--replicas {replicas}" if path is None else f"replicas = {replicas} in {path}"
        raise UsageError(f"invalid {label}: {SINGLE_STORE_REPLICAS}")
    options = {"url": resolved["store"]}
    if "endpoint_url" in resolved:
        options["endpoint_url"] = resolved["endpoint_url"]
    if "max_connections" in resolved:
        options["max_connections"] = resolved["max_connections"]
    return StoreConfig(**options)


# MountConfig fields set straight from the setting of the same meaning.
_MOUNT_FIELDS = {
    "allow_other": "allow_other",
    "memory_limit": "memory_limit",
    "decode_workers": "decode_workers",
    "read_ahead_kb": "read_ahead_kb",
    "max_background": "max_background",
    "refresh_interval": "refresh_interval_s",
    "metrics_address": "metrics_address",
}


def mount_config(resolved: dict[str, Any]) -> MountConfig:
    """Build the mount's config from resolved settings; the mountpoint must be set."""
    options = {
        field: resolved[key] for key, field in _MOUNT_FIELDS.items() if key in resolved
    }
    if "cache_size" in resolved:
        options["cache_bytes"], options["cache_share"] = resolved["cache_size"]
    prefetch = {
        key.partition(".")[2]: value
        for key, value in resolved.items()
        if key.startswith("prefetch.")
    }
    retry = {}
    if "read_timeout" in resolved:
        retry["deadline_s"] = resolved["read_timeout"]
    return MountConfig(
        mountpoint=resolved["mountpoint"],
        cache_dir=resolved.get("cache_dir") or default_mount_cache_dir(),
        prefetch=PrefetchConfig(**prefetch),
        retry=RetryConfig(**retry),
        **options,
    )
